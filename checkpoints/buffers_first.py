"""In a checkpoint child: the kernel's large buffers saved first, straight from memory, and let go of chunk by chunk.

Why: while a forked child holds the kernel's pages, every page the kernel
writes is copied for one of them.  A child that pickles every variable before
it saves any buffer holds all of them for as long as pickling the small
objects takes (0.2 s for 200k dicts): long enough for the user's next cell to
rewrite a 2 GiB array, and the fork then costs 2 GiB more memory.

So before anything is pickled, the child saves the chunks the last committed
checkpoint recorded for the kernel's large buffers (the index of
``tracking.Unwritten``), by their addresses, largest buffer first:

* a chunk written-page tracking vouches for is only checked to be stored
  (one per buffer is hashed anyway, as in the commit);
* any other chunk is hashed and written as a blob, from the end of its buffer
  backwards (a cell rewriting an array usually goes from its start: the two
  meet halfway);
* then its pages are given up (``mapping.let_go``): the kernel's writes to
  them are no longer copied, and what the child saved is already in the
  page cache, which the system can write out and reclaim.

The commit then takes each chunk's digest from here (:meth:`BuffersFirst.digest`).
A chunk's digest is that of its bytes as of the fork, whichever object owns
it now, so a buffer cut as before is saved exactly.

Given-up pages are replaced by an inaccessible reservation, never by zeros:
nothing is ever saved from them.  If something other than a buffer's own
out-of-band pickle reads them (an in-band pickle of memory no saved array
owns), the child dies of SIGSEGV; if the commit must read them (a buffer
now cut differently), it raises :class:`ReleasedTooEarly`.  Either way the
previous checkpoint stands, and the kernel takes this one again without
letting go early.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from . import mapping
from .blobs import digest
from .errors import ReleasedTooEarly
from .files import TMP_PREFIX

if TYPE_CHECKING:
    from .blobs import BlobWriter
    from .tracking import Unwritten

log = logging.getLogger(__name__)

__all__ = ["BuffersFirst", "save_buffers_first"]

Chunk = tuple[int, int, "str | None"]

_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


class BuffersFirst:
    """What :func:`save_buffers_first` saved: each chunk's digest by address, and the memory given up."""

    def __init__(self) -> None:
        self.digests: dict[tuple[int, int], str] = {}
        #: bytes of memory read and hashed
        self.hashed = 0
        #: bytes of memory given up
        self.released = 0
        self._starts: list[int] = []
        self._ends: list[int] = []

    def digest(self, address: int, size: int) -> str | None:
        """The digest of the chunk ``[address, address + size)`` as of the fork, if it was saved here."""
        return self.digests.get((address, size))

    def check_readable(self, address: int, size: int, name: str) -> None:
        """Raise :class:`ReleasedTooEarly` if any of ``[address, address + size)`` was given up."""
        i = bisect.bisect_right(self._starts, address + size - 1) - 1
        if i >= 0 and self._ends[i] > address:
            raise ReleasedTooEarly(f"the memory of {name} was let go before it was saved")

    def _give_up_run(self, run: list[tuple[int, int]]) -> None:
        """Give up adjacent chunks (listed from the last one backwards) in one call; empties ``run``."""
        if run:
            start = run[-1][0]
            self._given_up(start, run[0][0] + run[0][1] - start)
            run.clear()

    def _given_up(self, start: int, size: int) -> None:
        if mapping.let_go(start, size):
            i = bisect.bisect_left(self._starts, start)
            self._starts.insert(i, start)
            self._ends.insert(i, start + size)
            self.released += size


def save_buffers_first(writing: BlobWriter, unwritten: Unwritten) -> BuffersFirst:
    """Save every chunk of the large buffers the last checkpoint recorded, and give up its pages.

    Only for a forked child that exits after its commit, before it pickles
    anything (see the module's docstring).  Chunks of memory that is no longer
    plain private memory of this process are left alone.
    """
    done = BuffersFirst()
    buffers = _buffers(unwritten.layout())
    if not buffers:
        return done
    areas = mapping._memory_areas()
    buffers = [b for b in buffers if mapping.private_anonymous(areas, b[0][0], b[-1][0] + b[-1][1])]
    buffers.sort(key=lambda b: b[0][0] - (b[-1][0] + b[-1][1]))
    # Defence in depth, as in the commit: one vouched chunk per buffer is hashed anyway.
    for buffer in buffers:
        vouched = [c for c in buffer if c[2] is not None]
        if not vouched:
            continue
        address, size, known = random.choice(vouched)
        done.hashed += size
        if digest(_memory(address, size)) != known:
            log.error("written-page tracking vouched for a chunk that changed; hashing everything")
            unwritten.distrust()
            buffers = [[(a, s, None) for a, s, _ in b] for b in buffers]
            break
    # Largest buffer first, and in each the chunks from its end backwards (see the module's docstring).
    spool = _Spool(writing, done)
    try:
        for buffer in buffers:
            run: list[tuple[int, int]] = []  # vouched chunks side by side: given up in one call
            for address, size, known in reversed(buffer):
                if known is None:
                    done._give_up_run(run)
                    spool.add(address, size)
                    continue
                # Reads the memory only if the stored file is missing or damaged.
                writing.put(known, _memory(address, size), "", durable=False)
                done.digests[(address, size)] = known
                run.append((address, size))
            done._give_up_run(run)
        spool.store()
    finally:
        spool.close()
    log.debug("saved %d chunks first, %d bytes given up", len(done.digests), done.released)
    return done


class _Spool:
    """Chunks that tracking does not vouch for: hashed, and written where the store lacks them, each
    one's pages given up as soon as its bytes are in the page cache.

    They are first copied to a spool file (an unlinked file beside the blobs),
    giving up each chunk's pages as it goes: one file takes them at the speed
    of memory (2.2 GB/s here, faster than the kernel rewrites an array whose
    pages a child shares), while hashing too, or a blob file each, goes at half
    that or less.  Then (:meth:`store`) each chunk is read back, hashed and
    stored, and its part of the spool is punched out: the spool adds no more
    page cache than the chunks in flight, and it is gone before anything
    flushes it.  Where no spool file can be made, each chunk is stored from
    memory at once.
    """

    def __init__(self, writing: BlobWriter, done: BuffersFirst):
        self._writing, self._done = writing, done
        self._fd = _spool_file(writing.nb.blobs_dir)
        self._chunks: list[tuple[int, int, int]] = []
        self._at = 0

    def add(self, address: int, size: int) -> None:
        if self._fd is None:
            self._put(address, size, _memory(address, size))
            self._done._given_up(address, size)
            return
        _write_all(self._fd, _memory(address, size), self._at)
        self._done._given_up(address, size)
        self._chunks.append((address, size, self._at))
        self._at += size

    def store(self) -> None:
        if self._fd is None or not self._chunks:
            return
        buffer = bytearray(max(size for _, size, _ in self._chunks))
        for address, size, offset in self._chunks:
            view = memoryview(buffer)[:size]
            if os.preadv(self._fd, [view], offset) != size:
                raise OSError(errno.EIO, "the spool file came back short")
            self._put(address, size, view)
            _punch(self._fd, offset, size)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _put(self, address: int, size: int, view: memoryview) -> None:
        found = digest(view)
        self._writing.put(found, view, "", durable=False)
        self._done.digests[(address, size)] = found
        self._done.hashed += size


def _spool_file(folder: Path) -> int | None:
    """An unlinked file on the store's file system (None if it cannot be made: then no spool)."""
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):
        pass
    path = folder / f"{TMP_PREFIX}spool-{os.getpid()}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    with contextlib.suppress(OSError):
        os.unlink(path)
    return fd


def _punch(fd: int, offset: int, size: int) -> None:
    """Free a part of the spool that is no longer needed (where the file system can)."""
    if mapping._libc is not None:
        mapping._libc.fallocate(fd, _FALLOC_PUNCH_HOLE, ctypes.c_long(offset), ctypes.c_long(size))


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _buffers(layout: list[Chunk]) -> list[list[Chunk]]:
    """The chunks, in runs of adjacent whole-page chunks (one run per buffer, or per part of one)."""
    runs: list[list[Chunk]] = []
    for chunk in layout:
        address, size, _ = chunk
        if address % mapping.PAGE or size % mapping.PAGE:
            continue
        if runs and runs[-1][-1][0] + runs[-1][-1][1] == address:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


def _memory(address: int, size: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")
