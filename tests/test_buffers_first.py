"""A checkpoint child saves the large buffers first and gives up their memory before it pickles (buffers_first.py).

Library level, with a real fork per checkpoint: what is stored is the memory
as of the fork even while the parent rewrites it, the child really gives its
pages up, and memory given up is never read: a buffer now cut differently
fails the commit (ReleasedTooEarly), an in-band pickle of it kills the child,
and the previous checkpoint stands either way.  Kernel level (real kernels,
kill -9): an object whose pickle reads an array's memory in-band makes the
kernel take the checkpoint again without letting go early, silently, and the
values come back exactly.
"""

from __future__ import annotations

import json
import os
import resource
import signal

import numpy as np
import pytest
from conftest import holds, wait_saved
from durable_kernel.checkpoints import Store, buffers_first, mapping, snapshot
from durable_kernel.checkpoints.tracking import Unwritten, WrittenPages

KEY = b"first-key-" * 7
MIB = 1 << 20
PAGE = mapping.PAGE

pytestmark = pytest.mark.skipif(
    WrittenPages.open() is None,
    reason="this Linux has no asynchronous userfaultfd write-protect with PAGEMAP_SCAN (6.7+)",
)


@pytest.fixture
def nb(tmp_path):
    return Store(tmp_path / "store", KEY).notebook("first.ipynb")


def given_up(start: int, end: int) -> int:
    """Bytes of ``[start, end)`` that this process holds as inaccessible reservations."""
    total = 0
    for first, last, perms, inode, _ in mapping._memory_areas():
        if perms == "---p" and inode == 0 and first < end and last > start:
            total += min(last, end) - max(first, start)
    return total


def checkpoint(
    nb, tracker: WrittenPages, values: dict, count: int, first: bool = True, during=None, file_limit: int = 0
) -> dict:
    """A kernel's checkpoint: fork, scan right after it, ``during()`` runs in the parent while the child
    commits (saving buffers first if ``first``).  Returns what the child reports: ``status``,
    ``error`` (the exception's type), ``given_up`` (bytes of the first value's buffer)."""
    received, send = os.pipe()
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    scan = tracker.next_scan
    watched = next(iter(values.values()))
    start = mapping.where(watched) or 0
    end = start + getattr(watched, "nbytes", 0)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if file_limit:  # writes past it fail with EFBIG, as on a full disk
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))
            os.close(send)
            os.read(go_r, 1)  # the parent is writing by now
            unwritten = Unwritten(tracker, scan, received)
            report = {"error": ""}
            try:
                nb.commit(
                    (lambda: snapshot(values)) if first else snapshot(values),
                    execution_count=count,
                    release_buffers=True,
                    unwritten=unwritten,
                )
                unwritten.save()
                report["buffers"] = unwritten.buffers
            except Exception as exc:
                report["error"] = type(exc).__name__
            report["given_up"] = given_up(start, end)
            os.write(report_w, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(received)
    os.close(report_w)
    tracker.scan(send)
    os.write(go_w, b"x")
    if during is not None:
        during()
    with os.fdopen(report_r, "rb") as f:
        raw = f.read()
    status = os.waitpid(pid, 0)[1]
    report = json.loads(raw) if raw else {}
    report["status"] = status
    if not report.get("error") and os.WIFEXITED(status):
        tracker.confirm(scan)
        tracker.offer([tuple(b) for b in report.get("buffers", [])])
    return report


def tracked(nb, tracker, nbytes: int = 24 * MIB) -> np.ndarray:
    arr = np.random.default_rng(1).random(nbytes // 8)
    for count in (1, 2, 3):  # seen, protected, its chunks recorded
        assert checkpoint(nb, tracker, {"arr": arr}, count, first=False)["status"] == 0
    return arr


def test_buffers_saved_first_hold_the_memory_as_of_the_fork_while_the_kernel_rewrites_it(nb, tracker):
    arr = tracked(nb, tracker)
    arr[123_456] = -1.0  # one chunk written since the last checkpoint
    at_fork = arr.copy()

    def rewrite() -> None:
        arr[:] += 1.0

    report = checkpoint(nb, tracker, {"arr": arr}, 4, during=rewrite)
    assert report["status"] == 0 and not report["error"]
    assert report["given_up"] >= arr.nbytes - 2 * PAGE  # every whole page of it, before pickling
    restored = nb.load_latest().values["arr"]
    assert np.array_equal(restored, at_fork)
    assert not np.array_equal(restored, arr)


def test_a_vouched_chunk_stored_in_another_folder_is_saved_from_memory_before_it_is_given_up(tmp_path, nb, tracker):
    arr = tracked(nb, tracker)
    renamed = Store(tmp_path / "store", KEY).notebook("renamed.ipynb")  # its chunks are in nb's folder only
    report = checkpoint(renamed, tracker, {"arr": arr}, 4)
    assert report["status"] == 0 and not report["error"]
    assert report["given_up"] >= arr.nbytes - 2 * PAGE
    assert np.array_equal(renamed.load_latest().values["arr"], arr)


def test_chunks_a_full_spool_cannot_take_are_saved_from_memory(nb, tracker):
    arr = tracked(nb, tracker)
    at_fork = arr + 1.0
    arr += 1.0  # every chunk written: all go to the spool, which takes 2 MiB of them

    def rewrite() -> None:
        arr[:] += 1.0

    report = checkpoint(nb, tracker, {"arr": arr}, 4, during=rewrite, file_limit=2 * MIB)
    assert report["status"] == 0 and not report["error"]
    assert 0 < report["given_up"] <= 2 * MIB + 2 * PAGE
    assert np.array_equal(nb.load_latest().values["arr"], at_fork)


def test_chunks_the_kernel_wrote_since_the_fork_are_copied_first_and_the_rest_from_the_end(nb, tracker):
    arr = tracked(nb, tracker)
    arr += 1.0  # every chunk written since the last checkpoint: none is vouched for, all go to the spool
    start = mapping.where(arr)
    quarter = start + arr.nbytes // 4
    received, send = os.pipe()
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    scan = tracker.next_scan
    pid = os.fork()
    if pid == 0:
        try:
            os.close(send)
            os.read(go_r, 1)  # the parent has rewritten the array's first quarter since the fork
            done = buffers_first.give_up_first(Unwritten(tracker, scan, received), nb)
            os.write(report_w, json.dumps([(address, size) for address, size, _ in done._spooled]).encode())
        finally:
            os._exit(0)
    os.close(received)
    os.close(report_w)
    tracker.scan(send)
    arr[: arr.size // 4] += 1.0
    os.write(go_w, b"x")
    with os.fdopen(report_r, "rb") as f:
        spooled = json.loads(f.read() or b"[]")
    os.waitpid(pid, 0)
    order = [address for address, _ in spooled]
    # A page written shows as the child's alone at once, or, in a huge page, once all of the huge page is
    # written: chunks near the end of the quarter may show either way.
    surely = sorted(address for address, size in spooled if address + size <= quarter - 2 * MIB)
    untouched = [address for address in order if address >= quarter]
    assert len(surely) >= 4 and len(untouched) >= 4
    assert order[: len(surely)] == surely  # lowest first, before any other
    assert untouched == sorted(untouched, reverse=True)  # the others from the end backwards


def test_without_buffers_first_the_child_keeps_the_memory_until_it_is_saved(nb, tracker):
    arr = tracked(nb, tracker)
    report = checkpoint(nb, tracker, {"arr": arr}, 4, first=False)
    assert report["status"] == 0 and report["given_up"] == 0
    assert np.array_equal(nb.load_latest().values["arr"], arr)


def test_a_buffer_cut_differently_is_never_read_from_memory_given_up(nb, tracker):
    arr = tracked(nb, tracker)
    shifted = arr[3 * PAGE // 8 :]  # its chunks start three pages later than those recorded
    report = checkpoint(nb, tracker, {"shifted": shifted}, 4)
    assert report["error"] == "ReleasedTooEarly"
    assert set(nb.load_latest().values) == {"arr"}  # the previous checkpoint stands
    again = checkpoint(nb, tracker, {"shifted": shifted}, 4, first=False)
    assert again["status"] == 0 and not again["error"]
    assert np.array_equal(nb.load_latest().values["shifted"], shifted)


def test_an_in_band_read_of_memory_given_up_kills_the_child_and_saves_nothing(nb, tracker):
    arr = tracked(nb, tracker)
    strided = arr[::2]  # pickled in-band by numpy: a copy read from the memory given up
    report = checkpoint(nb, tracker, {"arr": arr, "strided": strided}, 4)
    assert os.WIFSIGNALED(report["status"]) and os.WTERMSIG(report["status"]) == signal.SIGSEGV
    assert set(nb.load_latest().values) == {"arr"}


def test_where_a_read_only_buffer_lies_is_known():
    arr = np.arange(1 << 20, dtype=np.float64)
    arr.flags.writeable = False  # mapping.address_of cannot see it; the commit still checks it was not given up
    view = memoryview(arr)
    assert mapping.address_of(view) is None
    assert mapping.where(view) == arr.__array_interface__["data"][0]


PEEK = """
import numpy as np
class Peek:
    '''Pickles as bytes read from the middle of an array: a read no out-of-band buffer announces.'''
    def __init__(self, source):
        self.source = source
    def __reduce__(self):
        return (bytes, (memoryview(self.source).cast('B')[1 << 20 : (1 << 20) + 64].tobytes(),))
"""


def test_a_kernel_whose_checkpoint_read_given_up_memory_takes_it_again_without_a_notice(start_kernel):
    kernel = start_kernel(session="first.ipynb")
    assert not kernel.execute("import numpy as np\nbig = np.random.default_rng(0).random(4 << 20)").error
    for i in range(3):  # tracked, and its chunks recorded
        assert not kernel.execute(f"x = {i}").error
        wait_saved(kernel)
    holds(kernel, "get_ipython().kernel.buffers_first")
    assert not kernel.execute(PEEK + "peek = Peek(big)\nbig[7] = 7.0").error
    wait_saved(kernel)
    holds(kernel, "not get_ipython().kernel.buffers_first")
    holds(kernel, "get_ipython().kernel.last_outcome.ok")
    shown = kernel.execute("y = 1")
    assert "not saved" not in shown.stdout + shown.stderr
    wait_saved(kernel)
    expected = kernel.value("float((big * np.arange(big.size)).sum())")
    kernel.kill()
    again = start_kernel(session="first.ipynb")
    assert again.value("float((big * np.arange(big.size)).sum())") == expected
    assert again.value("len(peek)") == "64"
