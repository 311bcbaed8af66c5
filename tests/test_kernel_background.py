"""Background checkpoints (a forked child per checkpoint): consistent, coalesced, crash-safe, zero-copy.

The child's progress is held without any timing: ``Gate`` is a notebook class
whose pickling waits until a file exists, so a checkpoint of a namespace
holding a ``Gate`` stays in flight until the test creates that file.  A
variable created in the same cell after the gate is pickled after the gate
lets go, so whatever the next cells do to it meanwhile is what a snapshot that
is not taken at the cell's end would see.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import KernelPool, wait_saved

SESSION = "background.ipynb"

GATE = '''\
import os, time

class Gate:
    """Pickling this waits (up to two minutes) until its file exists."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        for _ in range(2400):
            if os.path.exists(self.path):
                break
            time.sleep(0.05)
        return (Gate, (self.path,))
'''


def run(kernel, code: str):
    out = kernel.execute(code)
    assert not out.error, (code, out.error)
    return out


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def checkpoint_child(kernel) -> int:
    """The kernel's checkpoint child process (a fork of the kernel, so the same command line).

    The kernel forks it just after sending the cell's reply, so it may take a moment to appear.
    """
    cmdline = Path(f"/proc/{kernel.pid}/cmdline").read_bytes()
    deadline = time.monotonic() + 10
    while True:
        children = []
        for child in children_of(kernel.pid):
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() == cmdline:
                    children.append(child)
            except OSError:
                pass
        if children or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(children) == 1, f"expected one checkpoint child of {kernel.pid}, found {children}"
    return children[0]


def process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def stop(pid: int) -> bool:
    """SIGSTOP ``pid`` and wait until it is stopped; False if it has exited."""
    try:
        os.kill(pid, signal.SIGSTOP)
        while True:
            state = process_state(pid)
            if state in ("T", "t"):
                return True
            if state in ("Z", "X"):
                return False
    except (ProcessLookupError, FileNotFoundError):
        return False


def stored(notebook, generation: int) -> dict:
    """The values of one committed generation, loaded and verified in this process."""
    restored = notebook.load(generation)
    assert restored.not_restored == []
    return restored.values


@pytest.fixture
def gated(pool: KernelPool, tmp_path):
    """A kernel with the Gate class saved, and the path that releases a gated checkpoint."""
    kernel = pool.start(session=SESSION)
    run(kernel, GATE)
    wait_saved(kernel)
    return kernel, tmp_path / "release", pool.notebook(SESSION)


def test_background_checkpoint_is_the_state_at_the_instant_the_cell_ended(gated):
    kernel, release, notebook = gated
    run(kernel, f"gate = Gate({str(release)!r})\ndata = ['as', 'the', 'cell', 'ended']")
    # The checkpoint of that cell is now in flight, held before it pickles `data`.
    run(kernel, "data[0] = 'changed at once'\ndata.append('by the next cell')")
    release.touch()
    wait_saved(kernel)
    assert stored(notebook, 2)["data"] == ["as", "the", "cell", "ended"]


def test_checkpoints_asked_for_while_one_runs_coalesce_into_the_newest_state(gated):
    kernel, release, notebook = gated
    run(kernel, f"gate = Gate({str(release)!r})\nx = 1")
    for value in (2, 3, 4):
        run(kernel, f"x = {value}")
    last = run(kernel, "x = 5")
    release.touch()
    wait_saved(kernel)
    assert notebook.checkpoint_ids() == [3, 2, 1]
    assert stored(notebook, 2)["x"] == 1
    assert stored(notebook, 3)["x"] == 5
    assert notebook.read_manifest(3).execution_count == last.execution_count


@pytest.fixture
def coalescing(pool: KernelPool, tmp_path):
    """As ``gated``, in a kernel whose quick cells share checkpoints (``coalesce_seconds``)."""
    kernel = pool.start(session="coalescing.ipynb", extra_arguments=["--DurableKernel.coalesce_seconds=0.25"])
    run(kernel, GATE)
    wait_saved(kernel)
    return kernel, tmp_path / "release", pool.notebook("coalescing.ipynb")


def test_quick_cells_while_a_checkpoint_is_written_share_one_fork(coalescing):
    kernel, release, notebook = coalescing
    run(kernel, f"gate = Gate({str(release)!r})")
    forks_before = int(kernel.value("get_ipython().kernel._checkpoint_seq"))
    for value in range(20):
        run(kernel, f"x = {value}")
    forks = int(kernel.value("get_ipython().kernel._checkpoint_seq")) - forks_before
    release.touch()
    wait_saved(kernel)
    # One fork per cell (21 with the one asking) without coalescing; a few, however slow the machine.
    assert forks < 10, forks
    assert notebook.load_latest().values["x"] == 19


def test_a_held_back_checkpoint_starts_on_its_own_once_the_kernel_is_idle(coalescing, pool):
    kernel, release, notebook = coalescing
    run(kernel, f"gate = Gate({str(release)!r})")
    run(kernel, "x = 'held back'")  # ends while the gated checkpoint is being written
    release.touch()
    deadline = time.monotonic() + 60
    while notebook.load_latest().values.get("x") != "held back":
        assert time.monotonic() < deadline, "the held-back checkpoint never started"
        time.sleep(0.1)
    kernel.kill()
    again = pool.start(session="coalescing.ipynb")
    assert again.value("x") == "'held back'"


def test_a_restart_starts_the_held_back_checkpoint_at_once(pool, tmp_path):
    kernel = pool.start(session="held-back.ipynb", extra_arguments=["--DurableKernel.coalesce_seconds=600"])
    run(kernel, GATE)
    wait_saved(kernel)
    release = tmp_path / "release"
    run(kernel, f"gate = Gate({str(release)!r})")
    run(kernel, "x = 'the last cell'")  # held back for ten minutes, unless something asks for it
    release.touch()
    kernel.restart()
    assert kernel.value("x") == "'the last cell'"


def test_checkpoint_child_killed_while_pickling_leaves_the_previous_checkpoint_newest(gated):
    kernel, release, notebook = gated
    run(kernel, "x = 'committed'")
    wait_saved(kernel)
    before = notebook.checkpoint_ids()
    run(kernel, f"gate = Gate({str(release)!r})\nx = 'in flight'")
    os.kill(checkpoint_child(kernel), signal.SIGKILL)
    wait_saved(kernel)
    assert notebook.checkpoint_ids() == before
    restored, reasons = notebook.load_latest_with_reasons()
    assert reasons == [] and restored.values["x"] == "committed"
    release.touch()
    out = run(kernel, "pass")
    assert "durable-kernel: checkpoint not saved (the checkpoint process was killed (SIGKILL)" in out.stderr
    assert out.stderr.rstrip().endswith("the previous checkpoint is kept."), out.stderr


def test_checkpoint_child_killed_while_writing_leaves_the_previous_checkpoint_loadable(pool):
    kernel = pool.start(session=SESSION)
    run(kernel, "x = 'committed'")
    wait_saved(kernel)
    notebook = pool.notebook(SESSION)
    before = notebook.checkpoint_ids()
    blobs_before = {p.name for p in notebook.blobs_dir.rglob("*") if p.is_file()}

    # Eight 16 MiB arrays: eight blob files, written one after the other before the manifest.
    run(
        kernel,
        "import numpy as np\nx = 'in flight'\nblocks = [np.full(2_000_000, k, dtype=np.float64) for k in range(8)]",
    )
    child = checkpoint_child(kernel)
    caught = False
    while not caught and stop(child):
        # The child is frozen: look at the store, then kill it or let it go on a little.
        if notebook.checkpoint_ids() != before:
            os.kill(child, signal.SIGCONT)
            break  # too late: it committed
        written = {p.name for p in notebook.blobs_dir.rglob("*") if p.is_file()} - blobs_before
        if any(not name.startswith(".tmp-") for name in written):
            os.kill(child, signal.SIGKILL)
            caught = True
        else:
            os.kill(child, signal.SIGCONT)
            # Let it run a moment: stopped again at once, a child may never be scheduled in between
            # (seen on Linux 6.18: it made no progress in 30 s of this loop).
            time.sleep(0.0005)
    assert caught, "the checkpoint child committed before it could be stopped half-way"
    wait_saved(kernel)

    assert notebook.checkpoint_ids() == before
    restored, reasons = notebook.load_latest_with_reasons()
    assert reasons == [] and restored.values["x"] == "committed"
    kernel.kill()
    after = pool.start(session=SESSION)
    assert after.value("x") == "'committed'"
    assert "could not be used" not in after.banner


def test_restored_memory_mapped_array_is_writable_without_changing_its_blob(pool):
    mapped = ["--DurableKernel.map_arrays=True"]  # restored arrays are their chunk files, mapped
    kernel = pool.start(session=SESSION, extra_arguments=mapped)
    run(kernel, "import numpy as np\narr = np.arange(1_000_000, dtype=np.float64)")
    wait_saved(kernel)
    kernel.kill()
    notebook = pool.notebook(SESSION)
    (var,) = [v for v in notebook.read_manifest(notebook.checkpoint_ids()[0]).variables if v["name"] == "arr"]
    buffer = var["buffers"][1]  # the first whole 512 KiB chunk (after a head up to a page boundary)
    blob = notebook.blobs_dir / buffer["digest"][:2] / buffer["digest"]
    original = hashlib.sha256(blob.read_bytes()).hexdigest()

    kernel = pool.start(session=SESSION, extra_arguments=mapped)
    is_mapped = kernel.value(f"any({str(blob)!r} in line for line in open('/proc/self/maps'))")
    assert is_mapped == "True", "the restored array is not memory-mapped from its chunk files"
    run(kernel, "arr[:10] = -1.0\narr *= 2")
    assert kernel.value("arr[:12].tolist()") == repr([-2.0] * 10 + [20.0, 22.0])
    wait_saved(kernel)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == original


def test_checkpoint_after_restoring_a_large_array_completes(pool):
    """Restoring verifies large buffers with blake3's thread pool, whose workers do not
    survive fork(): the next checkpoint child must still finish (it once waited forever)."""
    first = pool.start(session=SESSION)
    run(first, "import numpy as np\nlarge = np.ones(1 << 22)")  # 32 MiB: hashed in parallel
    wait_saved(first)
    first.kill()
    restored = pool.start(session=SESSION)
    run(restored, "large = large + 1\nafter_restore = True")
    done = run(restored, "k = get_ipython().kernel\nprint(k.wait_for_checkpoint(60), k.last_outcome.ok)")
    assert done.stdout == "True True\n", done.stdout


def test_cells_run_back_to_back_never_report_a_lost_checkpoint(pool):
    """Each cell forks while earlier children finish: a finished child's pipes must not be
    closed while a new fork still lists them (a reused fd number made a child lose its outcome)."""
    kernel = pool.start(session="back-to-back.ipynb")
    outputs = [kernel.execute(f"x = {i}").stderr for i in range(300)]
    wait_saved(kernel)
    outputs.append(kernel.execute("y = 1").stderr)
    assert not [o for o in outputs if "not saved" in o], [o for o in outputs if o][:3]
    assert kernel.value("get_ipython().kernel.last_outcome.ok") == "True"


def test_an_outcome_naming_thousands_of_unsaved_variables_still_reaches_the_kernel(pool):
    kernel = pool.start(session="many-unsaved.ipynb")
    long = "n" * 200
    made = run(kernel, f"import threading\nfor i in range(6000): globals()[f'{long}{{i}}'] = threading.Lock()")
    wait_saved(kernel)
    told = kernel.stderr_of(made) + kernel.execute("1").stderr
    assert "checkpoint not saved" not in told, told
    assert "not saved:" in told and "more" in told, told


def test_our_log_records_go_to_the_kernel_log_never_into_the_users_cell(start_kernel, tmp_path):
    kernel = start_kernel(session="logging.ipynb")
    out = kernel.execute(
        "import logging\nlogging.getLogger('durable_kernel.checkpoints.store').warning('a store warning')"
    )
    assert not out.error and "a store warning" not in out.stderr + out.stdout
    kernel.close()
    assert "a store warning" in (tmp_path / "kernel-0.log").read_text(errors="replace")
