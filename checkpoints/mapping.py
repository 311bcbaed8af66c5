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

import bisect
import ctypes
import errno
import logging
import mmap
import os
import re
import stat
import time
import weakref
from typing import Any

from .files import foreign

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
#: Chunk maps this process may make at most: each is a kernel memory area, and
#: ``vm.max_map_count`` (65530 by default) bounds them all, malloc's included.
_MAP_BUDGET_SHARE = 0.25

#: Mapped chunk start address -> (size, digest, stamp of its blob file when mapped): what a child checks and reuses.
_mapped: dict[int, tuple[int, str, tuple[int, int]]] = {}
#: Regions made by :func:`assemble`: start -> end (this module's own memory, safe to map chunks into).
_regions: dict[int, int] = {}


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
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        # For written-page tracking (tracking.py).
        libc.syscall.restype = ctypes.c_long
        libc.ioctl.restype = ctypes.c_int
        libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
#: Not in Python's mmap module before 3.13 (its value on Linux).
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if os.uname().sysname == "Linux" else None)
_CAN_MAP = _libc is not None and os.path.exists("/proc/self/pagemap") and hasattr(mmap, "MAP_PRIVATE")


def _map_budget() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(int(f.read()) * _MAP_BUDGET_SHARE)
    except (OSError, ValueError):
        return 8192


#: File systems whose files may vanish or fail under a mapping (a server gone): a page read then kills the
#: process with SIGBUS, so buffers are read into memory rather than mapped from files there.
_REMOTE_FILESYSTEMS = ("nfs", "cifs", "smb", "fuse", "9p", "ceph", "glusterfs", "afs", "lustre", "gpfs", "sshfs")
_local_cache: dict[str, bool] = {}


def local_filesystem(path: Any) -> bool:
    """Is ``path`` on a local file system (where mapping files is safe)?  False where it cannot be told."""
    key = os.path.realpath(path)
    if key not in _local_cache:
        best, fstype = "", ""
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    if " - " not in line or len(fields) < 10:
                        continue
                    mount = fields[4].replace("\\040", " ")
                    kind = line.split(" - ", 1)[1].split()[0]
                    inside = key == mount or key.startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) >= len(best):
                        best, fstype = mount, kind
        except OSError:
            pass
        _local_cache[key] = bool(fstype) and not fstype.startswith(_REMOTE_FILESYSTEMS)
    return _local_cache[key]


def address_of(buffer: Any) -> int | None:
    """The start address of a writable buffer's memory, or None (read-only, or not contiguous)."""
    try:
        holder = ctypes.c_char.from_buffer(buffer)
    except (TypeError, ValueError):
        return None
    address = ctypes.addressof(holder)
    del holder
    return address


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def where(buffer: Any) -> int | None:
    """The start address of any contiguous buffer's memory, read-only too (None if it has none)."""
    address = address_of(buffer)
    if address is not None:
        return address
    view = _PyBuffer()
    try:
        if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(buffer), ctypes.byref(view), 0) != 0:
            return None
    except (TypeError, ValueError, BufferError):
        return None
    try:
        return view.buf
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


def assemble(pieces: list[tuple[int, int, str, os.stat_result]], lead: int = 0, may_map: bool = True) -> Any:
    """One writable buffer made of chunk files: ``pieces`` are ``(fd, size, digest, its fstat)`` in order.

    The buffer starts ``lead`` bytes into its first page (``chunking.page_offset``),
    so that every chunk that starts on a page boundary is mapped from its file;
    the others (a head shorter than a page) are read.  The caller closes the fds
    (a mapping outlives its fd).  Returns a writable buffer object.
    """
    total = sum(size for _, size, _, _ in pieces)
    region = mmap.mmap(-1, max(lead + total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address_of(region)
    mapped = may_map and _CAN_MAP and base is not None and len(_mapped) + len(pieces) <= _map_budget()
    if not mapped:
        _prefault(region)
    offset = lead
    made: list[int] = []
    for i, (fd, size, digest_hex, info) in enumerate(pieces):
        at = (base or 0) + offset
        whole_pages = size % PAGE == 0 or i == len(pieces) - 1
        if mapped and size and at % PAGE == 0 and whole_pages:
            got = _libc.mmap(at, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
            if got == at:
                _mapped[at] = (size, digest_hex, (info.st_ino, info.st_ctime_ns))
                made.append(at)
            else:
                # The region's pages there are still the anonymous ones: fill them instead.
                log.info("mapping a chunk failed (errno %s); reading it instead", ctypes.get_errno())
                mapped = False
                _read_into(region, offset, fd, size)
        elif size:
            _read_into(region, offset, fd, size)
        offset += size
    if base is not None:
        _regions[base] = base + lead + total
    weakref.finalize(region, _forget, made, base)
    return memoryview(region)[lead : lead + total] if lead else region


def _forget(addresses: list[int], base: int | None) -> None:
    for at in addresses:
        _mapped.pop(at, None)
    _regions.pop(base or 0, None)


def _prefault(region: Any) -> None:
    """Back a region that is about to be filled, all at once: page by page, the first writes into a fresh
    region cost more than reading the files (measured: 2.3 s against 0.25 s for 512 MiB).  Not with huge
    pages: finding gigabytes of them can stall on compaction."""
    if _MADV_POPULATE_WRITE is not None:
        try:
            region.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # an older kernel (Linux 5.14+): the reads fault the pages in instead
            pass


def _read_into(region: Any, offset: int, fd: int, size: int) -> None:
    view = memoryview(region)[offset : offset + size]
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n <= 0:
            raise OSError(f"chunk file ended after {done} of {size} bytes")
        done += n


# --- in the checkpoint child ------------------------------------------------


def release(buffers: list[Any]) -> None:
    """Let go of the whole pages of these buffers in this process (``MADV_DONTNEED``).

    For a forked checkpoint child that has written them and exits: while it
    holds the kernel's pages, every page the kernel writes is copied for it.
    The pages read as zeros (or as their file) afterwards: never call this in a
    process that goes on using the buffers.
    """
    if not _CAN_MAP:
        return
    for buffer in buffers:
        address = address_of(buffer)
        if address is None:
            continue
        start = -(-address // PAGE) * PAGE
        end = (address + memoryview(buffer).nbytes) // PAGE * PAGE
        if end > start:
            _libc.madvise(start, end - start, getattr(mmap, "MADV_DONTNEED", 4))


def let_go(start: int, size: int) -> bool:
    """Give up the pages ``[start, start + size)`` (whole pages) of this process for good: they are
    replaced by an inaccessible reservation, so no later allocation lands there and any read faults
    (SIGSEGV) instead of seeing zeros.  For a forked checkpoint child only (``buffers_first.py``).
    False if it could not be done (the pages are then still there)."""
    if not _CAN_MAP or start % PAGE or size % PAGE or size <= 0:
        return False
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | getattr(mmap, "MAP_NORESERVE", 0x4000)
    return bool(_libc.mmap(start, size, 0, flags, -1, 0) == start)  # PROT_NONE


#: One line of /proc/self/maps: start-end perms offset dev inode [name].
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+) *(.*)$", re.MULTILINE)
_DIRTY = bytes(1 if (b & 0x20) == 0 and (b & 0xC0) != 0 else 0 for b in range(256))


class CleanChunks:
    """Which mapped chunks still hold their blob's bytes in this process (read once per checkpoint)."""

    def __init__(self) -> None:
        self._vmas: dict[int, tuple[int, int]] | None = None
        self._pagemap: int | None = None
        #: address -> digest of chunks whose pages are untouched but whose blob file changed since it was
        #: mapped (written in place): the memory may have changed with it
        self.suspect: dict[int, str] = {}

    def digest_if_clean(self, address: int, size: int, blob_path: Any) -> str | None:
        """The digest of the chunk mapped at ``address`` if none of its pages was written since and its
        file (``blob_path(digest)``) is the one mapped, unchanged; else None (the chunk is then hashed)."""
        found = _mapped.get(address)
        if found is None or found[0] != size:
            return None
        if self._vmas is None:
            self._vmas = _file_vmas()
        vma = self._vmas.get(address)
        if vma is None or vma[1] != found[2][0] or vma[0] < address + size:
            return None  # unmapped, or something else lives there now
        if not self._untouched(address, size):
            return None
        try:
            info = os.lstat(blob_path(found[1]))
        except OSError:
            return None
        if (info.st_ino, info.st_ctime_ns) != found[2]:
            if info.st_ino == found[2][0]:
                self.suspect[address] = found[1]
            return None
        return found[1]

    def _untouched(self, address: int, size: int) -> bool:
        if self._pagemap is None:
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        dirty = _page_flags(self._pagemap, address, (size + PAGE - 1) // PAGE, _DIRTY)
        return dirty is not None and 1 not in dirty

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None


#: Eighth byte of a pagemap entry -> 1 for a page present and mapped by this process alone (bits 63 and 56).
_ALONE = bytes(1 if b & 0x81 == 0x81 else 0 for b in range(256))


def held_alone(pagemap: int, start: int, end: int) -> bytes:
    """One byte per page of ``[start, end)`` (whole pages): 1 where this process alone maps the page.

    In a forked checkpoint child, a page of the kernel's memory it alone maps
    is one the kernel has since written (it got a copy) or freed: memory that
    exists only because the child holds the original.  ``pagemap`` is an open
    ``/proc/self/pagemap``.  Raises OSError if it cannot be read."""
    alone = _page_flags(pagemap, start, (end - start) // PAGE, _ALONE)
    if alone is None:
        raise OSError(errno.EIO, "pagemap came back short")
    return alone


def _page_flags(pagemap: int, start: int, pages: int, table: bytes) -> bytes | None:
    """``table`` applied to the flag byte of each of ``pages`` pagemap entries from ``start`` (None if short).
    Bits 56-63 are the eighth byte of each entry: present (63), swapped (62), file or shared anonymous (61),
    mapped by this process alone (56)."""
    entries = os.pread(pagemap, pages * 8, (start // PAGE) * 8)
    if len(entries) != pages * 8:
        return None
    return entries[7::8].translate(table)


def _memory_areas() -> list[tuple[int, int, str, int, str]]:
    """``(start, end, perms, inode, name)`` of each of this process's memory areas ([] if unreadable)."""
    try:
        with open("/proc/self/maps") as f:
            text = f.read()
    except OSError:
        return []
    return [(int(a, 16), int(b, 16), perms, int(inode), name) for a, b, perms, inode, name in _MAPS_LINE.findall(text)]


def private_anonymous(areas: list[tuple[int, int, str, int, str]], start: int, end: int) -> bool:
    """True if ``[start, end)`` is covered, without a gap, by private anonymous memory areas (only this
    process's own writes can change it, and those go through its page tables)."""
    at = start
    for first, last, perms, inode, name in areas:
        if last <= at or first >= end:
            continue
        if first > at or perms != "rw-p" or inode != 0 or name not in ("", "[heap]"):
            return False
        at = last
        if at >= end:
            return True
    return False


def _file_vmas() -> dict[int, tuple[int, int]]:
    """start -> (end, inode) of this process's file mappings."""
    return {start: (end, inode) for start, end, _, inode, _ in _memory_areas() if inode}


# --- adopting: a buffer computed in this process, backed by the chunks a checkpoint just wrote ----------

#: glibc's chunk header flag for memory it got from mmap (and only ever gives back with munmap).
_IS_MMAPPED = 0x2


def adoptable(address: int | None, cuts: list[tuple[int, int]], chunk_digests: list[str]) -> list[Any] | None:
    """What a checkpoint child reports of one buffer so that the kernel may back it by its chunk files:
    ``[address, nbytes, [[chunk address, size, digest], ...]]`` for whole-page chunks not mapped
    from their blob already; None when there is none (the kernel checks everything again)."""
    if address is None or not _CAN_MAP or len(cuts) < 2:
        return None
    chunks = []
    for (start, end), digest_hex in zip(cuts, chunk_digests, strict=True):
        at, size = address + start, end - start
        if at % PAGE or size % PAGE:
            continue
        mapped = _mapped.get(at)
        if mapped is not None and mapped[:2] == (size, digest_hex):
            continue
        chunks.append([at, size, digest_hex])
    return [address, cuts[-1][1], chunks] if chunks else None


class Adopter:
    """Replaces a buffer's anonymous pages by private maps of the chunk files holding the same bytes.

    Run by the kernel on its main thread while no cell runs and no thread of
    the user's is alive, so that nothing writes the memory between the
    comparison and the mapping.  Each chunk is compared byte for byte with its
    file first; only memory that ``malloc`` got from ``mmap`` for one
    allocation (glibc's chunk header says so, and it only ever unmaps such
    memory) or that :func:`assemble` made is touched, never the heap, a
    file the user mapped, or read-only memory.  Afterwards a checkpoint
    skips the chunks the user did not write (:class:`CleanChunks`), and the
    clean pages are page cache the system can reclaim.
    """

    def __init__(self, blob_path: Any):
        """Reads this process's memory map once: use one Adopter only while nothing else maps or
        unmaps memory (no cell runs in between), a new one otherwise."""
        #: digest -> Path of its blob file
        self.blob_path = blob_path
        self._vmas: list[tuple[int, int, str, int, str]] = []
        self._starts: list[int] = []
        if _CAN_MAP:
            self._read_vmas()
            self._forget_unmapped()

    def adopt(self, buffers: list[Any], seconds: float) -> tuple[int, list[Any]]:
        """Adopt chunks of ``buffers`` (as :func:`adoptable` reports them) for at most ``seconds``;
        returns how many chunks were adopted, and what is left for another call."""
        if not _CAN_MAP:
            return 0, []
        deadline = time.monotonic() + seconds
        if buffers and not local_filesystem(self.blob_path(buffers[0][2][0][2]).parent):
            return 0, []
        budget = _map_budget() - len(self._vmas)
        adopted = 0
        left: list[Any] = []
        for n, (address, nbytes, chunks) in enumerate(buffers):
            if not self._owned(address, nbytes):
                continue
            for i, (at, size, digest_hex) in enumerate(chunks):
                if time.monotonic() > deadline:
                    left = [[address, nbytes, chunks[i:]], *buffers[n + 1 :]]
                    return adopted, left
                if adopted >= budget:
                    return adopted, []
                if self._plain(at, size) and self._adopt_chunk(at, size, digest_hex):
                    adopted += 1
        return adopted, left

    def _read_vmas(self) -> None:
        self._vmas = _memory_areas()
        self._starts = [v[0] for v in self._vmas]

    def _forget_unmapped(self) -> None:
        """Drop chunks no longer mapped where they were (the array freed, its memory reused): adopted
        arrays are freed by malloc, which never tells this registry."""
        files = {start: inode for start, _, _, inode, _ in self._vmas if inode}
        for at in [at for at, (_, _, stamp) in _mapped.items() if files.get(at) != stamp[0]]:
            del _mapped[at]

    def _covering(self, at: int, size: int) -> list[tuple[int, int, str, int, str]] | None:
        """The memory areas covering ``[at, at + size)`` without a gap, or None."""
        i = bisect.bisect_right(self._starts, at) - 1
        found = []
        end = at
        while i < len(self._vmas) and end < at + size:
            vma = self._vmas[i]
            if vma[0] > end or vma[1] <= end:
                return None
            found.append(vma)
            end = vma[1]
            i += 1
        return found if end >= at + size else None

    def _owned(self, address: int, nbytes: int) -> bool:
        """Is ``[address, address + nbytes)`` inside one mmap-ed malloc allocation, or a region of ours?"""
        for start, end in _regions.items():
            if start <= address and address + nbytes <= end:
                return True
        base = address - address % PAGE
        if address - base != 16:  # not where malloc puts the memory of an mmap-ed chunk
            return False
        first = self._covering(base, PAGE)
        if not first or not _anonymous(first[0]):
            return False
        # malloc's header sits right before the memory it hands out: [prev_size, size | flags];
        # glibc's own test for "got from mmap" is the flag (heap chunks never have it).
        header = ctypes.c_uint64.from_address(base + 8).value
        return bool(header & _IS_MMAPPED) and base + (header & ~7) >= address + nbytes

    def _plain(self, at: int, size: int) -> bool:
        """Is the chunk's memory private, writable, and anonymous or one of our chunk maps?"""
        covering = self._covering(at, size)
        return bool(covering) and all(
            _anonymous(vma) or (vma[2] == "rw-p" and vma[0] in _mapped and _mapped[vma[0]][2][0] == vma[3])
            for vma in covering or []
        )

    def _adopt_chunk(self, at: int, size: int, digest_hex: str) -> bool:
        try:
            fd = os.open(self.blob_path(digest_hex), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size or foreign(info):
                return False
            view = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
            if view in (None, ctypes.c_void_p(-1).value):
                return False
            try:
                if _libc.memcmp(at, view, size) != 0:
                    return False  # written since the checkpoint: the next one will say
            finally:
                _libc.munmap(view, size)
            got = _libc.mmap(at, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
            if got != at:
                _refill(at, size, fd)
                return False
        finally:
            os.close(fd)
        _mapped[at] = (size, digest_hex, (info.st_ino, info.st_ctime_ns))
        return True


def _anonymous(vma: tuple[int, int, str, int, str]) -> bool:
    return vma[2] == "rw-p" and vma[3] == 0 and vma[4] == ""


def _refill(at: int, size: int, fd: int) -> None:
    """A failed ``MAP_FIXED`` may have unmapped the range (old kernels): put the same bytes back."""
    log.error("mapping a chunk over its memory failed (errno %s); restoring it from the file", ctypes.get_errno())
    got = _libc.mmap(
        at, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0
    )
    if got == at:
        view = (ctypes.c_char * size).from_address(at)
        os.preadv(fd, [memoryview(view).cast("B")], 0)
