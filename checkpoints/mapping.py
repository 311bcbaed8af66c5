"""Restored buffers as chunk files mapped side by side, and which of their chunks were written since.

Restore: a chunked buffer (``chunking.py``) becomes one private anonymous
region with each chunk's blob mapped over its place (``MAP_PRIVATE |
MAP_FIXED``): nothing is copied, pages are read when used, and clean pages
stay reclaimable page cache instead of anonymous memory.  The user writes to
the region as to any array; the blob files never change (a private mapping).

Save: a page of such a mapping that the user wrote turns anonymous (bit 61 of
``/proc/self/pagemap`` goes from 1 to 0), so a checkpoint child can tell,
without reading a byte, which chunks still hold their blob's bytes and reuse
their digests.  This is what Linux's soft-dirty bits would give, and it works
on kernels built without them (these machines) and for unprivileged users.
Before trusting a chunk the child checks, in ``/proc/self/maps``, that the
address still maps that very file (same inode): memory freed and reused since
is hashed like any other.

Where mapping cannot be used (another OS, too many mappings for the process's
limit, a failing call) a chunked buffer is read into the region instead: one
copy, no tracking, the same bytes.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import weakref
from typing import Any

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
#: Chunk maps this process may make at most: each is a kernel memory area, and
#: ``vm.max_map_count`` (65530 by default) bounds them all, malloc's included.
_MAP_BUDGET_SHARE = 0.25

#: Mapped chunk start address -> (size, digest, inode of its blob): what a child checks and reuses.
_mapped: dict[int, tuple[int, str, int]] = {}
_maps_made = 0


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
_CAN_MAP = _libc is not None and os.path.exists("/proc/self/pagemap") and hasattr(mmap, "MAP_PRIVATE")


def _map_budget() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(int(f.read()) * _MAP_BUDGET_SHARE)
    except (OSError, ValueError):
        return 8192


def address_of(buffer: Any) -> int | None:
    """The start address of a writable buffer's memory, or None (read-only, or not contiguous)."""
    try:
        holder = ctypes.c_char.from_buffer(buffer)
    except (TypeError, ValueError):
        return None
    address = ctypes.addressof(holder)
    del holder
    return address


def assemble(pieces: list[tuple[int, int, str, int]]) -> Any:
    """One writable buffer made of chunk files: ``pieces`` are ``(fd, size, digest, inode)`` in order.

    Every size but the last must be a page multiple.  The caller keeps the fds
    and closes them (a mapping outlives its fd).  Returns an mmap object.
    """
    global _maps_made
    total = sum(size for _, size, _, _ in pieces)
    region = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address_of(region)
    mapped = (
        _CAN_MAP
        and base is not None
        and _maps_made + len(pieces) <= _map_budget()
        and all(size % PAGE == 0 for _, size, _, _ in pieces[:-1])
    )
    offset = 0
    made: list[int] = []
    for fd, size, digest_hex, inode in pieces:
        if mapped and size:
            assert base is not None
            at = base + offset
            got = _libc.mmap(at, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
            if got == at:
                _mapped[at] = (size, digest_hex, inode)
                made.append(at)
            else:
                # The region's pages there are still the anonymous ones: fill them instead.
                log.info("mapping a chunk failed (errno %s); reading it instead", ctypes.get_errno())
                mapped = False
                _read_into(region, offset, fd, size)
        elif size:
            _read_into(region, offset, fd, size)
        offset += size
    if made:
        _maps_made += len(made)
        weakref.finalize(region, _forget, made)
    return region


def _forget(addresses: list[int]) -> None:
    global _maps_made
    for at in addresses:
        _mapped.pop(at, None)
    _maps_made -= len(addresses)


def _read_into(region: Any, offset: int, fd: int, size: int) -> None:
    view = memoryview(region)[offset : offset + size]
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n <= 0:
            raise OSError(f"chunk file ended after {done} of {size} bytes")
        done += n


# --- in the checkpoint child ------------------------------------------------


_DIRTY = bytes(1 if (b & 0x20) == 0 and (b & 0xC0) != 0 else 0 for b in range(256))


class CleanChunks:
    """Which mapped chunks still hold their blob's bytes in this process (read once per checkpoint)."""

    def __init__(self) -> None:
        self._vmas: dict[int, tuple[int, int]] | None = None
        self._pagemap: int | None = None

    def digest_if_clean(self, address: int, size: int) -> str | None:
        """The digest of the chunk mapped at ``address`` if none of its pages was written since; else None."""
        found = _mapped.get(address)
        if found is None or found[0] != size:
            return None
        if self._vmas is None:
            self._vmas = _file_vmas()
        vma = self._vmas.get(address)
        if vma is None or vma[1] != found[2] or vma[0] < address + size:
            return None  # unmapped, or something else lives there now
        return found[1] if self._untouched(address, size) else None

    def _untouched(self, address: int, size: int) -> bool:
        if self._pagemap is None:
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        pages = (size + PAGE - 1) // PAGE
        entries = os.pread(self._pagemap, pages * 8, (address // PAGE) * 8)
        if len(entries) != pages * 8:
            return False
        # Bits 56-63 are the eighth byte of each entry: written (anonymous, present or swapped) pages are dirty.
        return 1 not in entries[7::8].translate(_DIRTY)

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None


def _file_vmas() -> dict[int, tuple[int, int]]:
    """start -> (end, inode) of this process's file mappings."""
    found = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 5 or fields[4] == "0":
                    continue
                start, end = fields[0].split("-")
                found[int(start, 16)] = (int(end, 16), int(fields[4]))
    except OSError:
        return {}
    return found


def tracked() -> int:
    """How many chunk maps this process holds (for tests and status)."""
    return len(_mapped)
