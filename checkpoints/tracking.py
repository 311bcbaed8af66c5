"""Which pages of this process's memory were written since the last checkpoint, where soft-dirty bits are missing.

Why: a checkpoint of a namespace holding 4 GiB of arrays should read what the
user changed, not 4 GiB.  Soft-dirty page bits would say which pages were
written, but many kernels (these VMs among them) are built without them.
Since Linux 6.7 the same answer comes from userfaultfd's asynchronous
write-protect mode, which is what CRIU uses in their place:

* the large buffers a checkpoint saw are registered with a userfaultfd in
  ``UFFD_FEATURE_WP_ASYNC`` mode and write-protected.  The first write to a
  page is resolved by the kernel itself (no handler thread, nothing waits for
  us) and leaves the page unprotected;
* right after each checkpoint's fork, the ``PAGEMAP_SCAN`` ioctl lists the
  pages written since the previous scan and protects them again, atomically,
  range by range (:meth:`WrittenPages.scan`, in the kernel process), and sends
  the list to the child through a pipe;
* the checkpoint child hashes only the chunks holding a page written since the
  fork of the last checkpoint that committed; every other chunk keeps the
  digest that checkpoint recorded for the same addresses (:class:`Unwritten`,
  from an index each committed child leaves for the next in a memory file of
  the kernel's, gone with it).

Why after the fork: a scan sees writes up to itself, so a scan after fork
``i`` counts writes made just before and just after it; the child of fork
``j`` counts as written everything the scans after forks ``i`` to ``j`` saw,
which covers every write between the two forks whatever threads made them
(a scan before the fork would miss a write another thread makes between the
scan and the fork).

Everything fails closed: a range whose registration was lost (freed,
remapped, moved) is counted as written throughout, a page neither present nor
swapped counts as written, and without the index of a checkpoint every scan
since is known for (or no list from the kernel), nothing is trusted.  A range mostly written between two
checkpoints is let go for a while: each first write to a protected page costs
a fault (about 1 us per 4 KiB page, and it splits huge pages), which buys
nothing when the whole buffer is hashed anyway.  Its faults also split its huge
pages, which makes every later fork copy 512 times more page-table entries
(about 22 ms per GiB here), so once no checkpoint child shares its pages, a
thread makes them huge again (:func:`collapse`, ``MADV_COLLAPSE``: about
80 ms per GiB, off the main thread).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import platform
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import mapping
from .chunking import PAGE

log = logging.getLogger(__name__)

__all__ = ["Unwritten", "WrittenPages"]

_SYSCALL_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_FEATURE_WP_ASYNC = 1 << 15


def _ioc(direction: int, kind: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | number


_UFFDIO_API = _ioc(3, 0xAA, 0x3F, 24)
_UFFDIO_REGISTER = _ioc(3, 0xAA, 0x00, 32)
_UFFDIO_UNREGISTER = _ioc(2, 0xAA, 0x01, 16)
_UFFDIO_WRITEPROTECT = _ioc(3, 0xAA, 0x06, 24)
_PAGEMAP_SCAN = _ioc(3, ord("f"), 16, 96)
_REGISTER_MODE_WP = 1 << 1
_WRITEPROTECT_MODE_WP = 1
_SCAN_WP_MATCHING = 1
_SCAN_CHECK_WPASYNC = 2
_PAGE_IS_WRITTEN = 1 << 1
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_SWAPPED = 1 << 4

#: A range with more than this share of its pages written between two checkpoints is let go for a while.
HOT_SHARE = 0.5
#: Checkpoints a let-go range waits before it is tracked again (doubling each time it is found hot).
BACKOFF_FIRST, BACKOFF_MAX = 2, 64
#: Most ranges tracked at once, the largest buffers first: each costs two ioctls per scan (the
#: kernel's main thread, after every cell) and splits a memory area that every fork copies.
MAX_RANGES = 256
#: Smaller buffers are hashed again by each checkpoint (1 MiB: a third of a millisecond).
MIN_RANGE_BYTES = 4 << 20
#: Scans remembered while no checkpoint commits (a child after more than that many hashes everything).
MAX_SCANS = 256

_MADV_COLLAPSE = 25
_MS_ASYNC = 1
#: Bytes made huge again per call (a fork waits for the call in progress at most).
_COLLAPSE_STEP = 64 << 20

_INDEX_MAGIC = b"DKWRITTEN1\n"
_INDEX_ENTRY = struct.Struct("<QQ32s")


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


@dataclass
class _Range:
    end: int
    #: the scan that first protected it: its pages' digests are known from checkpoints forked after it
    since: int


@dataclass
class _History:
    """What a checkpoint child inherits: the ranges tracked and the pages written, scan by scan."""

    epoch: int = 0
    #: start -> range, as of the last scan
    ranges: dict[int, _Range] = field(default_factory=dict)
    #: scan -> merged [start, end) intervals written (or not known unwritten) since the scan before it;
    #: scan ``i`` is the one right after checkpoint ``i``'s fork
    written: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


class WrittenPages:
    """Tracks the pages of large buffers written between checkpoints (the kernel process's side).

    :meth:`open` returns None where the kernel cannot (Linux before 6.7, no
    userfaultfd, other architectures); checkpoints then hash every chunk.
    """

    def __init__(self, uffd: int, pagemap: int, index_fd: int):
        self._uffd = uffd
        self._pagemap = pagemap
        #: a memory file where each committed checkpoint child leaves the digests of the chunks it saw
        self.index_fd = index_fd
        self._lock = threading.Lock()
        self.history = _History()
        self._candidates: list[tuple[int, int]] = []
        #: (start, end) -> (first scan to try again at, current wait)
        self._backoff: dict[tuple[int, int], tuple[int, int]] = {}
        self._vec = (_Region * 512)()
        #: ranges let go since :meth:`restore_huge_pages`: their huge pages were split by tracking
        self._let_go: list[tuple[int, int]] = []

    @classmethod
    def open(cls) -> WrittenPages | None:
        """A tracker if this kernel has asynchronous write-protect and PAGEMAP_SCAN, and they pass a self-test."""
        libc = mapping._libc
        if _SYSCALL_USERFAULTFD is None or libc is None or not hasattr(os, "fork"):
            return None
        uffd = libc.syscall(_SYSCALL_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
        if uffd < 0:
            log.info("written-page tracking is off: userfaultfd: %s", os.strerror(ctypes.get_errno()))
            return None
        fds = [uffd]
        try:
            # The kernel adds UFFD_FEATURE_WP_UNPOPULATED to it: never-touched pages get protected too,
            # which fills page tables (see _mostly_there).
            api = struct.pack("QQQ", _UFFD_API, _FEATURE_WP_ASYNC, 0)
            _ioctl(uffd, _UFFDIO_API, ctypes.create_string_buffer(api, len(api)))
            fds.append(os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
            fds.append(os.memfd_create("durable-kernel-written-pages", os.MFD_CLOEXEC))
            tracker = cls(*fds)
            if tracker._self_test():
                return tracker
            log.info("written-page tracking is off: its self-test failed")
        except (OSError, AttributeError) as exc:
            log.info("written-page tracking is off: %s", exc)
        for fd in fds:
            os.close(fd)
        return None

    def _self_test(self) -> bool:
        """Protect four pages, write the second and the fourth: exactly those two must read written."""
        test = mmap.mmap(-1, 4 * PAGE)
        anchor = ctypes.c_char.from_buffer(test)
        try:
            start = ctypes.addressof(anchor)
            for i in range(4):
                test[i * PAGE] = 1
            self._register(start, start + 4 * PAGE)
            try:
                test[PAGE] = 2
                test[3 * PAGE] = 2
                first = self._written(start, start + 4 * PAGE)
                again = self._written(start, start + 4 * PAGE)
            finally:
                self._unregister(start, start + 4 * PAGE)
            return first == [(start + PAGE, start + 2 * PAGE), (start + 3 * PAGE, start + 4 * PAGE)] and again == []
        finally:
            del anchor
            test.close()

    def offer(self, ranges: list[tuple[int, int]]) -> None:
        """The large buffers (page-aligned ``[start, end)``) a checkpoint saw: tracked from the next scan on."""
        largest = sorted((r for r in ranges if r[1] - r[0] >= MIN_RANGE_BYTES), key=lambda r: r[0] - r[1])
        with self._lock:
            self._candidates = largest[:MAX_RANGES]

    def confirm(self, epoch: int) -> None:
        """Checkpoint ``epoch`` committed (and left its index): older scans are no longer needed."""
        with self._lock:
            for old in [e for e in self.history.written if e < epoch]:
                del self.history.written[old]

    @property
    def next_scan(self) -> int:
        """The number of the next scan: the checkpoint about to fork passes it to :class:`Unwritten`."""
        return self.history.epoch + 1

    def scan(self, send_to: int | None = None) -> int:
        """Right after a checkpoint's fork (main thread): note and protect again what was written since the
        last scan, take on offered ranges; returns this scan's number.  With ``send_to`` (a pipe's write
        end, closed here), what this scan saw goes to the child, whose :class:`Unwritten` reads it."""
        try:
            epoch = self._note_written()
        except BaseException:
            if send_to is not None:
                os.close(send_to)  # the child then trusts nothing
            raise
        if send_to is not None:
            history = self.history
            _send(send_to, epoch, history.written[epoch], sorted((a, r.end) for a, r in history.ranges.items()))
        return epoch

    def _note_written(self) -> int:
        with self._lock:
            epoch = self.history.epoch + 1
            try:
                return self._note_written_locked(epoch)
            except BaseException:
                # Interrupted midway (an interrupt as a cell ends): the ranges already scanned were
                # protected again, so what they showed must not be forgotten. Everything counts as written.
                self.history.written[epoch] = [(0, 1 << 64)]
                self.history.epoch = epoch
                raise

    def _note_written_locked(self, epoch: int) -> int:
        """The scan proper (under the lock); see :meth:`scan`."""
        history = self.history
        written: list[tuple[int, int]] = []
        for start, rng in list(history.ranges.items()):
            try:
                # An address with no memory at all shows nothing written and no error: unmapped
                # (even if mapped again since, unregistered, or only in a child) counts as lost.
                _still_mapped(start, rng.end)
                found = self._written(start, rng.end) + self._absent(start, rng.end)
            except OSError:
                # Freed, remapped or moved since: whatever lives there now was never protected.
                del history.ranges[start]
                self._unregister(start, rng.end)
                written.append((start, rng.end))
                continue
            written += found
            if sum(b - a for a, b in found) > HOT_SHARE * (rng.end - start):
                del history.ranges[start]
                self._unregister(start, rng.end)
                self._wait(start, rng.end, epoch)
                self._let_go.append((start, rng.end))
        areas: list[tuple[int, int, str, int, str]] | None = None
        for start, end in self._candidates:
            if len(history.ranges) >= MAX_RANGES:
                break
            if not self._may_track(start, end, epoch):
                continue
            if areas is None:
                areas = mapping._memory_areas()
            if not mapping.private_anonymous(areas, start, end):
                # Shared memory (another process writes it), a file mapping (the file may change
                # under it) or a device: writes that bypass this process's page tables are not seen.
                self._wait(start, end, epoch, BACKOFF_MAX)
                continue
            if not self._mostly_there(start, end):
                self._wait(start, end, epoch)
                continue
            try:
                self._register(start, end)
            except OSError as exc:  # a file mapping (a restored array), or not ours to register
                log.debug("not tracking %#x-%#x: %s", start, end, exc)
                self._wait(start, end, epoch, BACKOFF_MAX)
                continue
            history.ranges[start] = _Range(end, epoch)
            written.append((start, end))
        self._candidates = []
        history.written[epoch] = _merged(written)
        history.written.pop(epoch - MAX_SCANS, None)
        history.epoch = epoch
        return epoch

    def restore_huge_pages(self, quiet: Callable[[], bool]) -> None:
        """Make the huge pages of the ranges let go since the last call again, in a thread, while
        ``quiet()`` (no checkpoint child alive); see :func:`collapse`."""
        with self._lock:
            let_go, self._let_go = self._let_go, []
        if let_go:
            threading.Thread(target=collapse, args=(let_go, quiet), name="durable-huge-pages", daemon=True).start()

    def _mostly_there(self, start: int, end: int) -> bool:
        """True if most pages of ``[start, end)`` are in memory (or swap).  Protecting never-touched
        pages (``np.zeros`` of 2 GiB, filled later or never) fills their page tables: 4 MiB and
        +12 ms on every fork for 2 GiB, to track memory that is zeros."""
        try:
            there = self._scan(start, end, 0, 0, 0, anyof=_PAGE_IS_PRESENT | _PAGE_IS_SWAPPED, registered=False)
        except OSError:
            return False
        return 2 * sum(b - a for a, b in there) >= end - start

    def _may_track(self, start: int, end: int, epoch: int) -> bool:
        if end - start < PAGE or start in self.history.ranges:
            return False
        waiting = self._backoff.get((start, end))
        if waiting is not None and epoch < waiting[0]:
            return False
        starts = sorted(self.history.ranges)
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and self.history.ranges[starts[i]].end > start:
            return False  # overlaps a tracked range
        return not (i + 1 < len(starts) and starts[i + 1] < end)

    def _wait(self, start: int, end: int, epoch: int, period: int | None = None) -> None:
        previous = self._backoff.get((start, end), (0, BACKOFF_FIRST // 2))[1]
        wait = period or min(previous * 2, BACKOFF_MAX)
        self._backoff[(start, end)] = (epoch + wait, wait)
        if len(self._backoff) > 4 * MAX_RANGES:
            self._backoff = dict(list(self._backoff.items())[-MAX_RANGES:])

    def close(self) -> None:
        """Stop tracking (the memory keeps working as before)."""
        with self._lock:
            for start, rng in self.history.ranges.items():
                self._unregister(start, rng.end)
            self.history.ranges.clear()
            for fd in (self._uffd, self._pagemap, self.index_fd):
                if fd >= 0:
                    os.close(fd)
            self._uffd = self._pagemap = self.index_fd = -1

    # --- the kernel's interfaces ---------------------------------------------------------

    def _register(self, start: int, end: int) -> None:
        reg = ctypes.create_string_buffer(struct.pack("QQQQ", start, end - start, _REGISTER_MODE_WP, 0), 32)
        _ioctl(self._uffd, _UFFDIO_REGISTER, reg)
        protect = ctypes.create_string_buffer(struct.pack("QQQ", start, end - start, _WRITEPROTECT_MODE_WP), 24)
        try:
            _ioctl(self._uffd, _UFFDIO_WRITEPROTECT, protect)
        except OSError:
            self._unregister(start, end)
            raise

    def _unregister(self, start: int, end: int) -> None:
        rng = ctypes.create_string_buffer(struct.pack("QQ", start, end - start), 16)
        try:
            _ioctl(self._uffd, _UFFDIO_UNREGISTER, rng)
        except OSError:
            pass  # already gone with its memory

    def _written(self, start: int, end: int) -> list[tuple[int, int]]:
        """Pages written since they were protected; protects them again (one atomic step per page)."""
        return self._scan(start, end, _SCAN_WP_MATCHING, _PAGE_IS_WRITTEN, 0)

    def _absent(self, start: int, end: int) -> list[tuple[int, int]]:
        """Pages neither present nor swapped (dropped: they read as zeros now)."""
        both = _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED
        return self._scan(start, end, 0, both, both)

    def _scan(
        self, start: int, end: int, flags: int, mask: int, inverted: int, anyof: int = 0, registered: bool = True
    ) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        at = start
        while at < end:
            arg = _ScanArg(
                size=ctypes.sizeof(_ScanArg),
                flags=flags | (_SCAN_CHECK_WPASYNC if registered else 0),
                start=at,
                end=end,
                vec=ctypes.addressof(self._vec),
                vec_len=len(self._vec),
                category_inverted=inverted,
                category_mask=mask,
                category_anyof_mask=anyof,
                return_mask=mask | anyof,
            )
            count = _ioctl(self._pagemap, _PAGEMAP_SCAN, arg)
            found += [(self._vec[i].start, self._vec[i].end) for i in range(count)]
            if arg.walk_end <= at:
                raise OSError(errno.EIO, "PAGEMAP_SCAN made no progress")
            at = arg.walk_end
        return found


class Unwritten:
    """In a checkpoint child: the digests of chunks none of whose pages was written since the fork of the
    last checkpoint that committed, and the index this checkpoint leaves for the next one.

    ``epoch`` is the scan the kernel takes right after this child's fork
    (:attr:`WrittenPages.next_scan` before it), ``received`` the read end of
    the pipe that scan is sent through.
    """

    def __init__(self, tracker: WrittenPages, epoch: int, received: int):
        self._index_fd = tracker.index_fd
        # As of the fork (a child's copy never changes; in one process, the scan must not show through).
        self._ranges = dict(tracker.history.ranges)
        self._written = dict(tracker.history.written)
        self._epoch = epoch
        self._received = received
        self._loaded = False
        self._known: dict[tuple[int, int], str] = {}
        self._dirty_starts: list[int] = []
        self._dirty_ends: list[int] = []
        self._trusted_starts: list[int] = []
        self._trusted_ends: list[int] = []
        self._seen: list[tuple[int, int, str]] = []
        self._distrusted = False
        #: page-aligned ``[start, end)`` of each buffer saved that is worth tracking (:meth:`WrittenPages.offer`)
        self.buffers: list[tuple[int, int]] = []

    def distrust(self) -> None:
        """Tracking was caught vouching for a changed chunk: vouch for nothing more, and leave no index
        (the next checkpoint then hashes everything and starts a new one)."""
        self._loaded, self._known, self._distrusted = True, {}, True
        with contextlib.suppress(OSError):
            os.ftruncate(self._index_fd, 0)

    def digest(self, address: int, size: int) -> str | None:
        """The digest recorded for the chunk ``[address, address + size)`` if none of its pages was written since."""
        if not self._loaded:
            self._load()
        found = self._known.get((address, size))
        if found is None:
            return None
        end = address + size
        i = bisect.bisect_right(self._trusted_starts, address) - 1
        if i < 0 or self._trusted_ends[i] < end:
            return None
        j = bisect.bisect_left(self._dirty_ends, address + 1)
        if j < len(self._dirty_starts) and self._dirty_starts[j] < end:
            return None
        return found

    def layout(self) -> list[tuple[int, int, str | None]]:
        """``(address, size, digest)`` of each chunk of the large buffers the last committed checkpoint
        saved, by address, with the digest only where none of its pages was written since."""
        if not self._loaded:
            self._load()
        return [(address, size, self.digest(address, size)) for address, size in sorted(self._known)]

    def note(self, address: int, nbytes: int, cuts: list[tuple[int, int]], digests: list[str]) -> None:
        """The chunks of one buffer (at ``address``) as this checkpoint saved them."""
        start, end = -(-address // PAGE) * PAGE, (address + nbytes) // PAGE * PAGE
        if end - start >= MIN_RANGE_BYTES:
            self.buffers.append((start, end))
        for (a, b), digest_hex in zip(cuts, digests, strict=True):
            self._seen.append((address + a, b - a, digest_hex))

    def largest_buffers(self) -> list[tuple[int, int]]:
        """The buffers worth tracking that this checkpoint saved, largest first, as many as are tracked."""
        return sorted(self.buffers, key=lambda r: r[0] - r[1])[:MAX_RANGES]

    def save(self) -> None:
        """After the commit: leave the digests of the tracked chunks for the next checkpoint (atomically)."""
        if self._distrusted:
            return
        # Every chunk of every large buffer, tracked or not: the next child saves them first, by
        # address (buffers_first.py).  Only those in ranges tracked throughout are ever vouched for.
        large = sorted(self.buffers)
        starts = [a for a, _ in large]
        entries = []
        for address, size, digest_hex in self._seen:
            i = bisect.bisect_right(starts, address) - 1
            if i >= 0 and large[i][1] >= address + size and len(digest_hex) == 64:
                entries.append(_INDEX_ENTRY.pack(address, size, bytes.fromhex(digest_hex)))
        body = struct.pack("<QQ", self._epoch, len(entries)) + b"".join(entries)
        # Checkpoint children run one at a time, but one may die while writing: the checksum
        # makes a torn index read as none (the next checkpoint then hashes everything).
        data = _INDEX_MAGIC + hashlib.blake2b(body, digest_size=16).digest() + body
        try:
            os.ftruncate(self._index_fd, 0)
            os.pwrite(self._index_fd, data, 0)
        except OSError:
            log.warning("could not leave the index of written pages; the next checkpoint hashes everything")

    def _load(self) -> None:
        self._loaded = True
        after_fork = _receive(self._received, self._epoch)
        if after_fork is None:
            return  # the kernel sent no scan (it died, or tracking failed): nothing is known unwritten
        try:
            data = os.pread(self._index_fd, os.fstat(self._index_fd).st_size, 0)
        except OSError:
            return
        head = len(_INDEX_MAGIC) + 16 + 16
        if not data.startswith(_INDEX_MAGIC) or len(data) < head:
            return
        checksum, body = data[len(_INDEX_MAGIC) : len(_INDEX_MAGIC) + 16], data[len(_INDEX_MAGIC) + 16 :]
        if hashlib.blake2b(body, digest_size=16).digest() != checksum:
            return
        since, count = struct.unpack_from("<QQ", body)
        if len(data) != head + count * _INDEX_ENTRY.size:
            return
        written = {**self._written, self._epoch: after_fork[0]}
        if since >= self._epoch or any(e not in written for e in range(since, self._epoch + 1)):
            return  # a scan between is forgotten: what it saw is unknown
        # The scan after fork ``since`` counts too: it saw writes made after that fork.
        dirty = _merged([iv for e in range(since, self._epoch + 1) for iv in written[e]])
        self._dirty_starts = [a for a, _ in dirty]
        self._dirty_ends = [b for _, b in dirty]
        # Ranges protected before fork ``since`` and still tracked at the scan after this fork.
        still = after_fork[1]
        trusted = sorted((a, r.end) for a, r in self._ranges.items() if r.since < since and (a, r.end) in still)
        self._trusted_starts = [a for a, _ in trusted]
        self._trusted_ends = [b for _, b in trusted]
        for address, size, raw in _INDEX_ENTRY.iter_unpack(data[head:]):
            self._known[(address, size)] = raw.hex()


def _still_mapped(start: int, end: int) -> None:
    """Raise OSError unless every page of ``[start, end)`` is mapped (``msync`` says ENOMEM where one is not;
    on anonymous memory it writes nothing)."""
    if mapping._libc.msync(start, end - start, _MS_ASYNC) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def collapse(ranges: list[tuple[int, int]], quiet: Callable[[], bool], patience: float = 60.0) -> None:
    """Make the pages of ``ranges`` huge again (``MADV_COLLAPSE``, Linux 6.1+), a step at a time, only
    while ``quiet()`` (no checkpoint child shares them: collapsing a shared page copies it).  For a thread."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return
    except OSError:
        return
    libc = mapping._libc
    deadline = time.monotonic() + patience
    huge = 2 << 20
    for start, end in ranges:
        at = -(-start // huge) * huge
        while at + huge <= end:
            while not quiet():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            step = min(_COLLAPSE_STEP, (end - at) // huge * huge)
            if libc.madvise(at, step, _MADV_COLLAPSE) != 0 and ctypes.get_errno() in (errno.EINVAL, errno.ENOMEM):
                break  # not huge-page memory (or unmapped since): nothing to restore here
            at += step


#: Most intervals sent to a child at once: a pipe holds 64 KiB, and the kernel must never wait on it.
_MAX_SENT = 1500
_SENT_HEAD = struct.Struct("<QQQ")


def _send(fd: int, epoch: int, written: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> None:
    """Write a scan's result to a checkpoint child's pipe (never blocking), then close it."""
    if len(written) + len(ranges) > _MAX_SENT:
        # Coarser is still true: a wider interval only makes the child hash more.
        huge = 2 << 20
        written = _merged([(a // huge * huge, -(-b // huge) * huge) for a, b in written])
        if len(written) + len(ranges) > _MAX_SENT:
            written, ranges = [(0, 1 << 64)], []  # trusts nothing
    body = _SENT_HEAD.pack(epoch, len(written), len(ranges))
    body += b"".join(struct.pack("<QQ", a, min(b, (1 << 64) - 1)) for a, b in written + ranges)
    try:
        os.set_blocking(fd, False)
        if os.write(fd, body) != len(body):
            log.debug("a scan did not fit in its checkpoint child's pipe; it will hash everything")
    except OSError:
        log.debug("could not send a scan to its checkpoint child", exc_info=True)
    finally:
        os.close(fd)


def _receive(fd: int, epoch: int) -> tuple[list[tuple[int, int]], set[tuple[int, int]]] | None:
    """What :func:`_send` wrote for scan ``epoch`` (written intervals, ranges tracked), None if not all of it.
    Reads exactly that many bytes: a process forked meanwhile by a user's thread may hold the pipe open."""
    try:
        head = _read_exactly(fd, _SENT_HEAD.size)
        if head is None:
            return None
        sent, n_written, n_ranges = _SENT_HEAD.unpack(head)
        if sent != epoch or n_written + n_ranges > _MAX_SENT:
            return None
        body = _read_exactly(fd, 16 * (n_written + n_ranges))
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if body is None:
        return None
    pairs = [struct.unpack_from("<QQ", body, 16 * i) for i in range(n_written + n_ranges)]
    return pairs[:n_written], set(pairs[n_written:])


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = b""
    try:
        while len(data) < size:
            more = os.read(fd, size - len(data))
            if not more:
                return None
            data += more
    except OSError:
        return None
    return data


def _merged(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _ioctl(fd: int, request: int, arg: ctypes.Array | ctypes.Structure) -> int:
    result = mapping._libc.ioctl(fd, request, ctypes.addressof(arg))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
