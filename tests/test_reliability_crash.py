"""Crash consistency through real kernels: the kill storm, and crash leftovers.

The kill storm runs ``DURABLE_KILL_ROUNDS`` rounds (default 10 here; ``benchmarks/kill_storm.py``
runs 200).  It prints ``rounds, restored-ok, fell-back, lost``; ``lost`` must be 0.
The order of fsyncs and renames is checked at the store level in test_store.py.
"""

from __future__ import annotations

import os

import numpy as np
from conftest import wait_saved
from reliability_support import report, run_storm, temp_leftovers


def test_kill_storm_never_loses_or_mixes_committed_state(tmp_path, jupyter_dirs, capsys):
    rounds = int(os.environ.get("DURABLE_KILL_ROUNDS", "10"))
    seed = os.environ.get("DURABLE_KILL_SEED")
    result = run_storm(rounds, tmp_path / "storm", seed=int(seed) if seed else None)
    report(
        "kill storm",
        capsys,
        rounds=result.rounds,
        restored_ok=result.restored_ok,
        fell_back=result.fell_back,
        lost=result.lost,
        kernel_kills=result.kernel_kills,
        child_kills=result.child_kills,
        kills_during_checkpoint=result.kills_during_checkpoint,
        rounds_leaving_temp_files=result.rounds_leaving_temp_files,
        seed=result.seed,
        seconds=result.seconds,
    )
    assert result.rounds == rounds
    assert result.lost == 0, result.problems
    assert not result.problems, result.problems
    assert result.kernel_kills and result.child_kills


def test_temp_files_left_by_a_killed_save_are_ignored_then_swept(start_kernel, jupyter_dirs, capsys):
    """A crash mid-write leaves ``.tmp-*`` files: the next kernel ignores them, its first commit removes them."""
    kernel = start_kernel(session="leftovers.ipynb")
    kernel.execute("x = 1")
    wait_saved(kernel)
    store = jupyter_dirs["DURABLE_KERNEL_DIR"]
    nb_dir = next(p for p in __import__("pathlib").Path(store).iterdir() if p.is_dir())
    # what a checkpoint child killed mid-write leaves: half a manifest, half a blob
    (nb_dir / "manifests" / ".tmp-999-dead").write_bytes(b"durable-kernel-manifest\nhalf")
    (nb_dir / "blobs" / "ab").mkdir(mode=0o700, exist_ok=True)
    (nb_dir / "blobs" / "ab" / ".tmp-999-beef").write_bytes(np.zeros(10_000).tobytes())
    planted = len(temp_leftovers(nb_dir))
    kernel.kill()
    kernel = start_kernel(session="leftovers.ipynb")
    assert len(temp_leftovers(nb_dir)) == planted  # ignored on load (the first commit sweeps them)
    assert kernel.value("x") == "1"
    kernel.execute("x = 2")
    wait_saved(kernel)
    assert temp_leftovers(nb_dir) == []
    report("temp leftovers", capsys, planted=planted, left_after_next_commit=0)
