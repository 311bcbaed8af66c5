"""Written-page tracking (userfaultfd asynchronous write-protect + PAGEMAP_SCAN): a checkpoint reads what was written.

Library level, in this process: the digests tracking vouches for agree with
hashing the memory, chunk by chunk, after scattered writes, dropped pages and
memory freed and mapped again; a torn or outdated index is not trusted; an
array rewritten whole is let go.  Kernel level (real kernels, kill -9): with
the defaults, a trivial cell's checkpoint of a large array reads nothing, one
element reads one chunk, and the values come back exactly.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import time

import numpy as np
import pytest
from conftest import holds, wait_saved
from durable_kernel.checkpoints import Store, chunking, mapping, snapshot
from durable_kernel.checkpoints.blobs import digests
from durable_kernel.checkpoints.tracking import Unwritten, WrittenPages

KEY = b"pages-key-" * 7
MIB = 1 << 20
PAGE = mmap.PAGESIZE

TRACKER = WrittenPages.open()
pytestmark = pytest.mark.skipif(
    TRACKER is None, reason="this Linux has no asynchronous userfaultfd write-protect with PAGEMAP_SCAN (6.7+)"
)


@pytest.fixture
def nb(tmp_path):
    return Store(tmp_path / "store", KEY).notebook("pages.ipynb")


def checkpoint(nb, tracker: WrittenPages, values: dict, count: int = 1, after_fork=None) -> int:
    """What a kernel and its checkpoint child do: fork, scan right after it (``after_fork`` runs first, as
    another thread could), the child commits and leaves its index, the kernel confirms.  Returns the
    bytes the child hashed."""
    received, send = os.pipe()
    report_r, report_w = os.pipe()
    scan = tracker.next_scan
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(send)
            unwritten = Unwritten(tracker, scan, received)
            result = nb.commit(snapshot(values), execution_count=count, unwritten=unwritten)
            unwritten.save()
            os.write(report_w, json.dumps([result.bytes_hashed, unwritten.buffers]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(received)
    os.close(report_w)
    if after_fork is not None:
        after_fork()
    tracker.scan(send)
    with os.fdopen(report_r, "rb") as f:
        report = f.read()
    assert os.waitpid(pid, 0)[1] == 0
    hashed, buffers = json.loads(report)
    tracker.confirm(scan)
    tracker.offer([tuple(b) for b in buffers])
    return hashed


def vouched(tracker: WrittenPages, buffer) -> list[tuple[str | None, str]]:
    """(digest tracking vouches for or None, digest of the memory now) for each chunk of ``buffer``,
    as a checkpoint forked now would see them."""
    view = memoryview(buffer).cast("B")
    address = mapping.address_of(view)
    cuts = chunking.buffer_cuts(view.nbytes, address)
    received, send = os.pipe()
    unwritten = Unwritten(tracker, tracker.next_scan, received)
    tracker.scan(send)
    return list(
        zip(
            [unwritten.digest(address + a, b - a) for a, b in cuts],
            digests([view[a:b] for a, b in cuts]),
            strict=True,
        )
    )


def tracked_array(nb, tracker, nbytes: int = 40 * MIB) -> np.ndarray:
    arr = np.random.default_rng(1).random(nbytes // 8)
    checkpoint(nb, tracker, {"arr": arr})  # sees it: protected by the scan after the next fork
    checkpoint(nb, tracker, {"arr": arr}, 2)
    checkpoint(nb, tracker, {"arr": arr}, 3)  # records its chunks
    return arr


def test_tracking_and_hashing_agree_on_every_chunk_after_scattered_writes(nb, tracker):
    arr = tracked_array(nb, tracker)
    written = set()
    for index in np.random.default_rng(3).integers(0, arr.size, 12):
        arr[index] = -arr[index] - 1.0  # always a different value
        written.add(int(index) * 8)
    address = mapping.address_of(memoryview(arr).cast("B"))
    cuts = chunking.buffer_cuts(arr.nbytes, address)
    states = vouched(tracker, arr)
    for (start, end), (given, hashed) in zip(cuts, states, strict=True):
        if given is not None:
            assert given == hashed  # a chunk vouched for holds exactly what was recorded
        if any(start <= w < end for w in written):
            assert given is None
    assert sum(given is not None for given, _ in states) >= len(cuts) - len(written) - 2  # all but those and head/tail


def test_a_page_given_back_to_the_system_counts_as_written(nb, tracker):
    arr = tracked_array(nb, tracker)
    address = mapping.address_of(memoryview(arr).cast("B"))
    page = (address + 10 * MIB) // PAGE * PAGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.madvise(page, PAGE, mmap.MADV_DONTNEED) == 0  # reads as zeros from now on
    for (given, hashed), (start, end) in zip(
        vouched(tracker, arr), chunking.buffer_cuts(arr.nbytes, address), strict=True
    ):
        if address + start <= page < address + end:
            assert given is None
        elif given is not None:
            assert given == hashed


def test_memory_freed_and_mapped_again_at_the_same_place_is_not_trusted(nb, tracker):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = 16 * MIB
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    first = np.frombuffer((ctypes.c_char * size).from_address(address), dtype=np.uint8)
    first[:] = 7
    for count in (1, 2, 3):
        checkpoint(nb, tracker, {"buf": first}, count)
    del first
    assert libc.munmap(address, size) == 0
    fixed = flags | 0x100000  # MAP_FIXED_NOREPLACE: the same addresses, or fail
    assert libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE, fixed, -1, 0) == address
    again = np.frombuffer((ctypes.c_char * size).from_address(address), dtype=np.uint8)
    again[:] = 9  # written before any scan could see it: only the lost registration tells
    try:
        assert all(given is None for given, _ in vouched(tracker, again))
    finally:
        del again
        libc.munmap(address, size)


def test_memory_unmapped_since_the_last_scan_counts_as_written(nb, tracker):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    region = mmap.mmap(-1, 16 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(region, dtype=np.uint8)
    arr[:] = 7
    for count in (1, 2, 3):
        checkpoint(nb, tracker, {"buf": arr}, count)
    ((start, rng),) = tracker.history.ranges.items()
    assert libc.munmap(start, rng.end - start) == 0  # a hole: the scan sees nothing written, and no error
    scan = tracker.scan()
    assert tracker.history.ranges == {}
    assert tracker.history.written[scan] == [(start, rng.end)]


def test_shared_memory_is_never_tracked(nb, tracker):
    region = mmap.mmap(-1, 16 * MIB)  # MAP_SHARED: another process may write it, unseen by this one's page tables
    arr = np.frombuffer(region, dtype=np.uint8)
    arr[:] = 7
    for count in (1, 2, 3, 4):
        checkpoint(nb, tracker, {"buf": arr}, count)
    assert tracker.history.ranges == {}
    del arr


def test_a_scan_interrupted_midway_leaves_everything_counted_as_written(nb, tracker, monkeypatch):
    arr = tracked_array(nb, tracker)
    other = tracked_array(nb, tracker, 16 * MIB)
    arr[10] = -3.0
    real = tracker._written
    calls = []

    def interrupted(start: int, end: int):
        found = real(start, end)  # protects again what it reports
        calls.append(found)
        raise KeyboardInterrupt

    monkeypatch.setattr(tracker, "_written", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracker.scan()
    monkeypatch.undo()
    assert calls  # the interrupt came after a range was protected again
    assert all(given is None for given, _ in vouched(tracker, arr))
    assert all(given is None for given, _ in vouched(tracker, other))


def test_a_wrong_digest_in_the_index_is_caught_and_nothing_of_it_is_used(nb, tracker):
    arr = tracked_array(nb, tracker)
    data = os.pread(tracker.index_fd, os.fstat(tracker.index_fd).st_size, 0)
    magic = b"DKWRITTEN1\n"
    body = bytearray(data[len(magic) + 16 :])
    for at in range(16 + 16, len(body), 48):  # every recorded digest: all zeros
        body[at : at + 32] = bytes(32)
    forged = magic + hashlib.blake2b(bytes(body), digest_size=16).digest() + bytes(body)
    os.ftruncate(tracker.index_fd, 0)
    os.pwrite(tracker.index_fd, forged, 0)
    assert checkpoint(nb, tracker, {"arr": arr}, 4) >= arr.nbytes - MIB  # one sampled chunk gave it away
    assert np.array_equal(nb.load_latest().values["arr"], arr)


def test_an_array_rewritten_whole_is_let_go_and_tracked_again_later(nb, tracker):
    arr = tracked_array(nb, tracker)
    assert len(tracker.history.ranges) == 1
    arr += 1.0
    checkpoint(nb, tracker, {"arr": arr}, 4)
    assert tracker.history.ranges == {}  # no faults on its next rewrites
    for count in range(5, 9):
        checkpoint(nb, tracker, {"arr": arr}, count)
    assert len(tracker.history.ranges) == 1


def test_an_array_of_untouched_zeros_is_tracked_only_once_it_is_filled(nb, tracker):
    # Fresh anonymous memory: no page is there yet (protecting them would fill page tables).  Not
    # np.zeros: calloc may hand out heap memory that is already there.
    region = mmap.mmap(-1, 64 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(region, dtype=np.float64)
    for count in (1, 2, 3):
        checkpoint(nb, tracker, {"arr": arr}, count)
    assert tracker.history.ranges == {}
    arr[:] = 1.0
    for count in range(4, 9):
        checkpoint(nb, tracker, {"arr": arr}, count)
    assert len(tracker.history.ranges) == 1


def huge_bytes_around(address: int) -> int:
    """AnonHugePages of the memory area holding ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(
    "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read(), reason="huge pages are off here"
)
def test_the_huge_pages_of_an_array_let_go_are_made_again(nb, tracker):
    arr = tracked_array(nb, tracker, 64 * MIB)
    address = mapping.address_of(memoryview(arr).cast("B"))
    arr += 1.0  # each first write splits a huge page
    checkpoint(nb, tracker, {"arr": arr}, 4)
    assert huge_bytes_around(address + 32 * MIB) < 8 * MIB
    tracker.restore_huge_pages(lambda: True)
    for _ in range(100):  # a thread makes them again
        if huge_bytes_around(address + 32 * MIB) >= 48 * MIB:
            break
        time.sleep(0.05)
    assert huge_bytes_around(address + 32 * MIB) >= 48 * MIB


def test_a_torn_index_is_not_trusted(nb, tracker):
    arr = tracked_array(nb, tracker)
    size = os.fstat(tracker.index_fd).st_size
    os.ftruncate(tracker.index_fd, size - 7)  # a child killed while writing it
    assert all(given is None for given, _ in vouched(tracker, arr))


def test_an_index_older_than_a_forgotten_scan_is_not_trusted(nb, tracker):
    arr = tracked_array(nb, tracker)
    tracker.scan()
    tracker.confirm(tracker.history.epoch + 1)  # as if a later checkpoint had committed
    assert all(given is None for given, _ in vouched(tracker, arr))


def test_without_the_scan_after_its_fork_a_child_trusts_nothing(nb, tracker):
    arr = tracked_array(nb, tracker)
    received, send = os.pipe()
    unwritten = Unwritten(tracker, tracker.next_scan, received)
    os.close(send)  # the kernel died (or its scan failed) before sending it
    view = memoryview(arr).cast("B")
    address = mapping.address_of(view)
    assert all(unwritten.digest(address + a, b - a) is None for a, b in chunking.buffer_cuts(view.nbytes, address))


def test_a_write_between_a_fork_and_its_scan_is_hashed_by_the_next_checkpoint(nb, tracker):
    arr = tracked_array(nb, tracker)

    def write() -> None:  # after the child's copy was made, before the scan: as another thread could
        arr[3_000_000] = -7.0

    checkpoint(nb, tracker, {"arr": arr}, 4, after_fork=write)
    assert nb.load_latest().values["arr"][3_000_000] != -7.0  # the fork came first
    assert (
        checkpoint(nb, tracker, {"arr": arr}, 5) <= 3 * chunking.BUFFER_CHUNK_BYTES
    )  # that chunk, a sample, head, tail
    assert nb.load_latest().values["arr"][3_000_000] == -7.0


def test_a_chunk_nobody_wrote_is_not_read_again(nb, tracker):
    arr = tracked_array(nb, tracker)
    # The head and tail pieces, and one chunk sampled to check what tracking says.
    assert checkpoint(nb, tracker, {"arr": arr}, 4) <= chunking.BUFFER_CHUNK_BYTES + 2 * PAGE


def test_a_trusted_checkpoint_stores_what_memory_holds(nb, tracker):
    arr = tracked_array(nb, tracker)
    arr[123_456] = -5.0
    arr[-1] = 3.0
    assert checkpoint(nb, tracker, {"arr": arr}, 4) <= 3 * chunking.BUFFER_CHUNK_BYTES
    assert np.array_equal(nb.load_latest().values["arr"], arr)


# --- real kernels -----------------------------------------------------------------------------------


def outcome(kernel, field: str) -> int:
    return int(kernel.value(f"get_ipython().kernel.last_outcome.{field}"))


def test_a_trivial_cells_checkpoint_reads_nothing_of_a_large_array_and_one_element_reads_one_chunk(start_kernel):
    kernel = start_kernel(session="pages.ipynb")
    assert not kernel.execute("import numpy as np\nbig = np.random.default_rng(0).random(32 << 20)").error
    wait_saved(kernel)
    assert outcome(kernel, "bytes_hashed") >= 256 * MIB  # the first checkpoint reads everything
    assert not kernel.execute("x = 1").error  # from this one on, its pages are tracked
    wait_saved(kernel)
    assert not kernel.execute("x = 2").error
    wait_saved(kernel)
    assert outcome(kernel, "bytes_hashed") < MIB
    assert not kernel.execute("big[20_000_000] = -1.0").error
    wait_saved(kernel)
    assert outcome(kernel, "bytes_hashed") <= 3 * chunking.BUFFER_CHUNK_BYTES  # the chunk, the head and the tail
    assert outcome(kernel, "bytes_written") < MIB
    kernel.kill()
    again = start_kernel(session="pages.ipynb")
    holds(
        again,
        "big[20_000_000] == -1.0 and np.array_equal(np.delete(big, 20_000_000), "
        "np.delete(np.random.default_rng(0).random(32 << 20), 20_000_000))",
    )


def test_a_users_thread_writing_an_array_through_checkpoints_loses_none_of_its_writes(start_kernel):
    kernel = start_kernel(session="pages.ipynb")
    cell = (
        "import threading, numpy as np\nstop = threading.Event()\n"
        "big = np.zeros(8 << 20)\nwrites = [0]\n"
        "def scribble():\n"
        "    while not stop.is_set():\n"
        "        writes[0] += 1\n        big[(writes[0] * 4099) % big.size] = writes[0]\n"
        "worker = threading.Thread(target=scribble)\nworker.start()"
    )
    assert not kernel.execute(cell).error
    for i in range(6):
        assert not kernel.execute(f"x = {i}").error
        wait_saved(kernel)
    assert not kernel.execute("stop.set()\nworker.join()\nexpected = big.copy()\nx = 'done'").error
    wait_saved(kernel)
    checksum = kernel.value("float((big * np.arange(big.size)).sum())")
    kernel.kill()
    again = start_kernel(session="pages.ipynb")
    assert again.value("float((big * np.arange(big.size)).sum())") == checksum


def test_with_tracking_off_each_checkpoint_reads_every_chunk(start_kernel):
    kernel = start_kernel(session="pages.ipynb", extra_arguments=["--DurableKernel.track_writes=False"])
    assert not kernel.execute("import numpy as np\nbig = np.random.default_rng(0).random(8 << 20)").error
    wait_saved(kernel)
    holds(kernel, "get_ipython().kernel.written_pages is None")
    for i in range(3):
        assert not kernel.execute(f"x = {i}").error
        wait_saved(kernel)
    assert outcome(kernel, "bytes_hashed") >= 64 * MIB
    assert outcome(kernel, "bytes_written") < MIB  # but only the manifest is written
