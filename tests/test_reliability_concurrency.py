"""Concurrency: two live kernels on one notebook identity; commit racing garbage collection.

Pruning (what ``gc`` does) runs as ``retention.prune`` under ``NotebookStore.locked()``,
in another process, as a second kernel or a maintenance command would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import wait_saved
from durable_kernel.checkpoints import CheckpointError, NotebookStore, Store, blobs, snapshot
from durable_kernel.checkpoints.location import open_store
from reliability_support import report

KEY = b"concurrency-key-" * 4
SESSION = "shared.ipynb"
ANOTHER = "another kernel (pid {pid} "


def run(kernel, code: str) -> str:
    out = kernel.execute(code)
    assert not out.error, out.error
    return out.stderr


def test_two_kernels_on_one_notebook(start_kernel, jupyter_dirs, capsys):
    a = start_kernel(session=SESSION)
    b = start_kernel(session=SESSION)
    said_a: list[str] = []
    said_b: list[str] = []
    said_a.append(run(a, "import numpy as np\nowner = 'A'\nstep = 1\ndata = np.full(500_000, 1)"))
    wait_saved(a)
    said_b.append(run(b, "import numpy as np\nowner = 'B'\nstep = 2\ndata = np.full(500_000, 2)"))
    wait_saved(b)
    said_b.append(run(b, "pass"))
    said_a.append(run(a, "step = 3"))
    wait_saved(a)
    said_a.append(run(a, "pass"))
    # both save at once, many times
    bursts = 8
    for i in range(bursts):
        a.kc.execute(f"step = {100 + i}\ndata = np.full(500_000, step)")
        b.kc.execute(f"step = {200 + i}\ndata = np.full(500_000, step)")
    wait_saved(a)
    wait_saved(b)
    said_a.append(run(a, "pass"))
    said_b.append(run(b, "pass"))
    # the older kernel saves last: its state must win
    run(a, "step = 999\ndata = np.full(500_000, step)")
    wait_saved(a)

    nb = open_store(environ=jupyter_dirs).notebook(SESSION)
    corrupt = []
    for gen in nb.checkpoint_ids():
        try:
            restored = nb.load(gen)
            owner, step, data = (restored.values[k] for k in ("owner", "step", "data"))
            if not (owner in "AB" and (data == step).all()):
                corrupt.append(gen)
        except CheckpointError as exc:
            corrupt.append(f"{gen}: {exc}")
    newest = nb.read_manifest(nb.checkpoint_ids()[0])
    assert corrupt == []
    assert newest.data["writer"]["pid"] == a.pid
    told_a = sum(s.count(ANOTHER.format(pid=b.pid)) for s in said_a)
    told_b = sum(s.count(ANOTHER.format(pid=a.pid)) for s in said_b)
    assert told_a == 1 and told_b == 1, (said_a, said_b)
    a.kill()
    b.kill()
    c = start_kernel(session=SESSION)
    assert c.value("(owner, step, int(data[0]), int(data.sum()))") == f"('A', 999, 999, {999 * 500_000})"
    report(
        "two kernels, one notebook",
        capsys,
        kernels=2,
        concurrent_cells=2 * bursts,
        generations_checked=len(nb.checkpoint_ids()),
        corrupt=0,
        newest_wins=True,
        each_told_once=True,
    )


GC = """
import sys, time
from pathlib import Path
from durable_kernel.checkpoints import Store, retention

root, key, session, mode = sys.argv[1:5]
nb = Store(root, bytes.fromhex(key)).notebook(session)
stop = Path(root).parent / "stop-gc"
runs = 0
while True:
    if mode == "unlocked":  # the control: what gc would do without the lock
        retention.prune(nb, nb.store.key, 1)
    else:
        with nb.locked():
            retention.prune(nb, nb.store.key, 1)
    runs += 1
    if mode != "loop" or stop.exists():
        break
print(runs)
"""


def start_gc(tmp_path: Path, nb: NotebookStore, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", GC, str(nb.store.root), KEY.hex(), SESSION, mode],
        stdout=subprocess.PIPE,
        text=True,
    )


def commit_racing_gc(tmp_path: Path, monkeypatch, locked: bool) -> tuple[bool, str]:
    """Commit a state whose blob is already stored while gc (keep=1) runs in another process.

    Generation 1 stores array A, generation 2 array B; generation 3 stores A again, so
    the commit finds A's blob present and does not write it.  At that instant gc
    starts: it keeps only generation 2, so A's blob looks unneeded.  Returns (did gc
    finish while the commit was in progress, what loading generation 3 gave).
    """
    nb = Store(tmp_path / ("locked" if locked else "unlocked") / "store", KEY).notebook(SESSION)
    first, second = np.full(100_000, 1.0), np.full(100_000, 2.0)
    nb.commit(snapshot({"arr": first}), execution_count=1)
    nb.commit(snapshot({"arr": second}), execution_count=2)
    original = blobs.BlobWriter.put
    race: dict = {}

    def put_blob(self, digest_hex, data, name, durable=True):
        before = self.blobs
        stamp = original(self, digest_hex, data, name, durable)
        if self.blobs == before and "gc" not in race:  # A's blob is there: the commit relies on it
            race["gc"] = start_gc(tmp_path, nb, "once" if locked else "unlocked")
            try:
                # With the lock, gc must wait for this commit; give it ample time to (wrongly) run.
                race["gc"].wait(timeout=2 if locked else 60)
                race["finished_during_commit"] = True
            except subprocess.TimeoutExpired:
                race["finished_during_commit"] = False
        return stamp

    monkeypatch.setattr(blobs.BlobWriter, "put", put_blob)
    nb.commit(snapshot({"arr": first}), execution_count=3, keep=5)
    monkeypatch.undo()
    race["gc"].wait(timeout=60)
    try:
        restored = nb.load(3)
        if "arr" in restored.damaged:
            outcome = restored.damaged["arr"]
        else:
            outcome = "ok" if (restored.values["arr"] == 1.0).all() else "wrong data"
    except CheckpointError as exc:
        outcome = str(exc)
    return race["finished_during_commit"], outcome


def test_gc_waits_for_a_commit_that_reuses_a_blob(tmp_path, monkeypatch, capsys):
    finished, outcome = commit_racing_gc(tmp_path, monkeypatch, locked=True)
    assert not finished and outcome == "ok"
    # the control shows the race is real: without the lock, gc deletes the blob under the commit
    control_finished, control = commit_racing_gc(tmp_path, monkeypatch, locked=False)
    assert control_finished and "missing" in control
    report("commit vs gc (deterministic)", capsys, with_lock=outcome, without_lock_control=control)


def test_commits_and_gc_in_a_loop_never_lose_a_just_committed_generation(tmp_path, capsys):
    nb = Store(tmp_path / "store", KEY).notebook(SESSION)
    arrays = [np.full(50_000, float(i)) for i in range(3)]
    nb.commit(snapshot({"arr": arrays[0], "i": 0}), execution_count=1)
    gc = start_gc(tmp_path, nb, "loop")
    commits = 60
    failures = []
    try:
        for i in range(1, commits + 1):
            result = nb.commit(snapshot({"arr": arrays[i % 3], "i": i}), execution_count=i + 1, keep=3)
            try:
                loaded = nb.load(result.manifest.generation)  # gc keeps the newest: it must load
                values = loaded.values
                if loaded.damaged:
                    failures.append(f"commit {i}: {loaded.damaged}")
                elif values["i"] != i or not (values["arr"] == float(i % 3)).all():
                    failures.append(f"commit {i}: wrong values")
            except CheckpointError as exc:
                failures.append(f"commit {i}: {exc}")
    finally:
        (tmp_path / "stop-gc").touch()
        out, _ = gc.communicate(timeout=60)
    gc_runs = int(out.strip() or 0)
    broken = []
    for gen in nb.checkpoint_ids():
        try:
            damaged = nb.load(gen).damaged
            if damaged:
                broken.append(f"checkpoint {gen}: {damaged}")
        except CheckpointError as exc:
            broken.append(str(exc))
    assert failures == [] and broken == []
    assert nb.load_latest().values["i"] == commits
    report("commit vs gc (loop)", capsys, commits=commits, gc_runs=gc_runs, lost_generations=0, broken=0)
