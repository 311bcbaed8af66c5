"""In a checkpoint child: the kernel's large buffers let go of first, before the commit reads a manifest or pickles.

Why: while a forked child holds the kernel's pages, every page the kernel
writes is copied for one of them.  A child that pickles every variable before
it saves any buffer holds all of them for as long as pickling the small
objects takes (0.2 s for 200k dicts): long enough for the user's next cell to
rewrite a 2 GiB array, and the fork then costs 2 GiB more memory.

So, first thing, the child goes through the chunks the last committed
checkpoint recorded for the kernel's large buffers (the index of
``tracking.Unwritten``), by their addresses, largest buffer first
(:func:`give_up_first`):

* a chunk written-page tracking vouches for, whose blob file is there, needs
  nothing from memory (one chunk per buffer is hashed anyway, as in the
  commit);
* any other chunk is copied to a spool file, from the end of its buffer
  backwards (a cell rewriting an array usually goes from its start: the two
  meet early), except that chunks the kernel has written since the fork go
  first, as soon as they are seen (``/proc/self/pagemap``: pages the child
  alone maps): their originals are memory that exists for the checkpoint
  alone, so such a cell is followed closely instead of met halfway;
* then its pages are given up (``mapping.let_go``): the kernel's writes to
  them are no longer copied.  What the child keeps is in the page cache, which
  the system can write out and reclaim.

Then, under the notebook's lock (:meth:`BuffersFirst.store`), a vouched chunk
whose blob file turns out damaged fails the commit, and each spooled chunk is
hashed and stored.  The commit takes each chunk's digest from here
(:meth:`BuffersFirst.digest`): that of its bytes as of the fork, whichever
object owns it now, so a buffer cut as before is saved exactly.

Given-up pages are replaced by an inaccessible reservation, never by zeros:
nothing is ever saved from them.  If something other than a buffer's own
out-of-band pickle reads them (an in-band pickle of memory no saved array
owns), the child dies of SIGSEGV; if the commit must read them (a buffer now
cut differently, a stored chunk damaged), it raises :class:`ReleasedTooEarly`.
Either way the previous checkpoint stands, and the kernel takes this one again
without letting go early.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import mapping
from .blobs import digest
from .errors import ReleasedTooEarly
from .files import TMP_PREFIX

if TYPE_CHECKING:
    from .blobs import BlobWriter
    from .folder import NotebookFolder
    from .tracking import Unwritten

log = logging.getLogger(__name__)

__all__ = ["BuffersFirst", "give_up_first"]

Chunk = tuple[int, int, "str | None"]

_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
#: Seconds between two looks at which chunks the kernel wrote since the fork (a look at 2 GiB reads 4 MiB of
#: page map, a few ms; the kernel rewrites about 50 MiB of an array meanwhile)
_LOOK_EVERY = 0.05


class BuffersFirst:
    """What :func:`give_up_first` let go of: each chunk's digest by address (once :meth:`store` ran), the
    memory given up, and the spool holding the chunks tracking did not vouch for."""

    def __init__(self, folder: Path) -> None:
        #: where the spool file goes (the blobs' folder)
        self.digests: dict[tuple[int, int], str] = {}
        #: bytes of memory read and hashed
        self.hashed = 0
        #: bytes of memory given up
        self.released = 0
        self._folder = folder
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._vouched: list[tuple[int, int, str]] = []
        self._spool: int | None = None
        self._spooled: list[tuple[int, int, int]] = []
        self._spool_end = 0
        self._spool_failed = False

    def digest(self, address: int, size: int) -> str | None:
        """The digest of the chunk ``[address, address + size)`` as of the fork, if it was saved here."""
        return self.digests.get((address, size))

    def check_readable(self, address: int, size: int, name: str) -> None:
        """Raise :class:`ReleasedTooEarly` if any of ``[address, address + size)`` was given up."""
        i = bisect.bisect_right(self._starts, address + size - 1) - 1
        if i >= 0 and self._ends[i] > address:
            raise ReleasedTooEarly(f"the memory of {name} was let go before it was saved")

    def store(self, writing: BlobWriter) -> None:
        """Under the notebook's lock: check that every vouched chunk is stored, and store the spooled ones.

        The spool goes from the page cache to blob files a chunk at a time, each
        chunk's part of it punched out after: it adds no more page cache than
        the chunks in flight, and it is gone before anything flushes it.
        """
        for address, size, known in self._vouched:
            if writing.reuse(known, size, "") is None:
                raise ReleasedTooEarly("a stored chunk of an array is damaged, and its memory was let go")
            self.digests[(address, size)] = known
        if self._spool is None or not self._spooled:
            return
        buffer = bytearray(max(size for _, size, _ in self._spooled))
        for address, size, offset in self._spooled:
            view = memoryview(buffer)[:size]
            if os.preadv(self._spool, [view], offset) != size:
                raise OSError(errno.EIO, "the spool file came back short")
            found = digest(view)
            writing.put(found, view, "", durable=False)
            self.digests[(address, size)] = found
            self.hashed += size
            _punch(self._spool, offset, size)

    def close(self) -> None:
        """Drop the spool (unflushed: it was never linked into a folder)."""
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None

    def _spool_chunk(self, address: int, size: int) -> bool:
        """Copy a chunk to the spool and give up its pages; False (memory kept) if there is no spool.

        One file takes chunks at the speed of memory (2.2 GB/s here, faster than
        the kernel rewrites an array whose pages a child shares); hashing them
        too, or a blob file each, goes at half that or less.
        """
        if self._spool_failed:
            return False
        if self._spool is None:
            self._spool = _spool_file(self._folder)
            if self._spool is None:
                self._spool_failed = True
                return False
        try:
            _write_all(self._spool, _memory(address, size), self._spool_end)
        except OSError:  # a full disk, say: what is spooled stays, the rest stays in memory
            log.info("the spool file could not take more; the other chunks are saved from memory", exc_info=True)
            self._spool_failed = True
            return False
        self._spooled.append((address, size, self._spool_end))
        self._spool_end += size
        self._given_up(address, size)
        return True

    def _spool_chunks(self, chunks: list[tuple[int, int]], pagemap: int | None) -> None:
        """Copy adjacent chunks (listed from the last one backwards) to the spool, each given up as soon
        as it is copied; empties ``chunks``.

        From the end backwards, except for chunks the kernel has written since
        the fork, which go first, lowest first, as soon as they are seen
        (``pagemap``, read every ``_LOOK_EVERY`` seconds): the kernel got a copy
        of each page it wrote, so the original this child holds is memory that
        exists for the checkpoint alone, and giving it up frees it at once.  A
        cell rewriting the array from its start is so followed closely, instead
        of being met halfway with half the array copied.
        """
        order = chunks[::-1]  # lowest address first
        chunks.clear()
        copied = [False] * len(order)
        lo, hi = 0, len(order) - 1  # the lowest and the highest not copied yet
        written: list[int] = []  # chunks the kernel wrote, highest first (taken from the end: lowest first)
        looked = -_LOOK_EVERY
        while lo <= hi:
            # A look while chunks seen written are left would find them again: copied first anyway.
            if pagemap is not None and not written and time.monotonic() - looked >= _LOOK_EVERY:
                looked = time.monotonic()
                written = _written_since_fork(pagemap, order, copied, lo, hi)
            i = hi
            while written:
                j = written.pop()
                if not copied[j]:
                    i = j
                    break
            copied[i] = True
            while lo <= hi and copied[lo]:
                lo += 1
            while hi >= lo and copied[hi]:
                hi -= 1
            if not self._spool_chunk(*order[i]):
                return  # no spool, or it takes no more: the others stay in memory, saved from there

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


def give_up_first(unwritten: Unwritten, nb: NotebookFolder) -> BuffersFirst:
    """Let go of the memory of every chunk of the large buffers the last checkpoint recorded, keeping
    what is needed to store them (see the module's docstring); then call :meth:`BuffersFirst.store`.

    Only for a forked child that exits after its commit, before it reads a
    manifest or pickles anything, for the notebook folder ``nb``.  Memory that
    is no longer plain private memory of this process is left alone.
    """
    done = BuffersFirst(nb.blobs_dir)
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
    # Largest buffer first, and in each the chunks from its end backwards (those written since first).
    try:
        pagemap: int | None = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pagemap = None  # chunks are then copied from the end backwards only
    try:
        for buffer in buffers:
            run: list[tuple[int, int]] = []  # vouched chunks side by side: given up in one call
            copies: list[tuple[int, int]] = []  # the others, side by side: copied to the spool together
            for address, size, known in reversed(buffer):
                if known is None or not _stored(nb, known, size):
                    done._give_up_run(run)
                    copies.append((address, size))
                else:
                    done._spool_chunks(copies, pagemap)
                    done._vouched.append((address, size, known))
                    run.append((address, size))
            done._give_up_run(run)
            done._spool_chunks(copies, pagemap)
    finally:
        if pagemap is not None:
            os.close(pagemap)
    log.debug("%d bytes of large buffers let go first, %d spooled", done.released, done._spool_end)
    return done


def _written_since_fork(pagemap: int, order: list[tuple[int, int]], copied: list[bool], lo: int, hi: int) -> list[int]:
    """Indices of the chunks ``order[lo:hi + 1]`` not yet copied that hold a page this process alone maps
    (the kernel wrote or freed it since the fork), highest first; [] if the page map cannot be read."""
    start, end = order[lo][0], order[hi][0] + order[hi][1]
    try:
        alone = mapping.held_alone(pagemap, start, end)
    except OSError:
        return []
    page = mapping.PAGE
    found = [
        i
        for i in range(lo, hi + 1)
        if not copied[i] and 1 in alone[(order[i][0] - start) // page : (order[i][0] + order[i][1] - start) // page]
    ]
    found.reverse()
    return found


def _spool_file(folder: Path) -> int | None:
    """An unlinked file on the store's file system, in the blobs' folder or the nearest one above it
    that exists (a new notebook's has none yet); None if none can be made (then no spool)."""
    for place in (folder, *folder.parents[:2]):
        try:
            return os.open(place, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except AttributeError:
            break  # no O_TMPFILE here
        except OSError:
            continue
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


def _stored(nb: NotebookFolder, digest_hex: str, size: int) -> bool:
    """Is there a file of the right size for blob ``digest_hex`` (its stamp is checked under the lock)?
    A vouched chunk stored in another folder (the notebook was renamed, or its state moved) is not."""
    try:
        return os.lstat(nb.blob_file(digest_hex)).st_size == size
    except OSError:
        return False


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
