"""Hostile and broken files, through real kernel starts.

A store holds a good checkpoint 1 (``x = 1``) and a planted checkpoint 2.  Every
planted malicious pickle would run ``touch <sentinel>`` if unpickled: the sentinel
must never appear, the kernel must start and say why.  A planted manifest makes
it fall back to checkpoint 1; a planted blob costs only the variable stored in
it (the rest of checkpoint 2 comes back).
(Flipped bytes, truncated blobs, another key's manifest and newer schemas at the
library level are in test_store.py; random ones in test_fuzz_loader.py.)
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_saved
from durable_kernel.checkpoints import Store, snapshot
from durable_kernel.checkpoints import manifest as manifest_format
from durable_kernel.checkpoints.blobs import digest
from durable_kernel.checkpoints.location import open_store
from reliability_support import Evil, evil_pickle, report

SESSION = "hostile.ipynb"
OTHER_KEY = b"0123456789abcdef" * 4


def our_store(jupyter_dirs) -> Store:
    """The store the kernel will use, with the kernel's own key (created here first, 0600)."""
    return open_store(environ=jupyter_dirs)


def signed_gen2(nb, key: bytes, change) -> Path:
    """Write checkpoint 2 as a copy of a real one with ``change(data)`` applied, signed with ``key``."""
    nb.commit(snapshot({"x": 2}), execution_count=2)
    path = nb.manifest_path(2)
    data = json.loads(path.read_bytes().split(b"\n", 2)[2])
    change(data)
    path.write_bytes(manifest_format.encode(data, key))
    return path


def _evil_inline(sentinel):
    payload = evil_pickle(sentinel)

    def change(data):
        var = data["variables"][0]
        var["inline"] = base64.b64encode(payload).decode()
        var["digest"] = digest(payload)

    return change


def plant(case: str, nb, tmp_path: Path, sentinel: Path) -> str:
    """Plant checkpoint 2 for ``case``; returns text the kernel's notice must contain."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if case == "evil blob":
        nb.commit(snapshot({"x": 2, "big": list(range(20_000))}), execution_count=2)
        big = next(v for v in nb.read_manifest(2).variables if v["name"] == "big")
        nb.blob_path(big["digest"]).write_bytes(evil_pickle(sentinel))
        return "does not match its digest"
    if case == "evil pickle as manifest":
        nb.manifest_path(2).write_bytes(evil_pickle(sentinel))
        return "is not a durable-kernel manifest"
    if case == "evil inline, unsigned":
        path = signed_gen2(nb, b"", _evil_inline(sentinel))
        raw = path.read_bytes().split(b"\n", 2)
        path.write_bytes(b"\n".join([raw[0], b"0" * 64, raw[2]]))
        return "not signed with this user's key"
    if case == "evil, signed with another key":
        Store(nb.store.root, OTHER_KEY).notebook(SESSION).commit(
            snapshot({"x": 2, "trap": Evil(str(sentinel))}), execution_count=2
        )
        return "not signed with this user's key"
    if case == "evil blob as symlink":
        nb.commit(snapshot({"x": 2, "big": list(range(20_000))}), execution_count=2)
        big = next(v for v in nb.read_manifest(2).variables if v["name"] == "big")
        target = elsewhere / "evil.pkl"
        target.write_bytes(evil_pickle(sentinel))
        blob = nb.blob_path(big["digest"])
        blob.unlink()
        blob.symlink_to(target)
        return "is a symlink"
    if case == "manifest as symlink":
        # checkpoint 2 is a symlink to a manifest elsewhere (one another key signed, holding a trap)
        other = Store(elsewhere, OTHER_KEY).notebook(SESSION)
        other.commit(snapshot({"x": 2, "trap": Evil(str(sentinel))}), execution_count=2)
        nb.manifest_path(2).symlink_to(other.manifest_path(1))
        return "not a regular file"
    if case == "newer schema":
        signed_gen2(nb, nb.store.key, lambda d: d.update(schema=manifest_format.SCHEMA_VERSION + 1))
        return "upgrade durable-kernel"
    if case == "older schema":
        signed_gen2(nb, nb.store.key, lambda d: d.update(schema=0))
        return "old schema 0"
    raise AssertionError(case)


CASES = [
    "evil blob",
    "evil pickle as manifest",
    "evil inline, unsigned",
    "evil, signed with another key",
    "evil blob as symlink",
    "manifest as symlink",
    "newer schema",
    "older schema",
]


@pytest.mark.parametrize("case", CASES)
def test_planted_checkpoint_never_runs_and_the_kernel_says_why(case, start_kernel, jupyter_dirs, tmp_path, capsys):
    sentinel = tmp_path / "untrusted-code-ran"
    nb = our_store(jupyter_dirs).notebook(SESSION)
    nb.commit(snapshot({"x": 1}), execution_count=1)
    expected = plant(case, nb, tmp_path, sentinel)
    assert 2 in nb.checkpoint_ids() or nb.manifest_path(2).is_symlink()
    kernel = start_kernel(session=SESSION)
    blob_case = "blob" in case
    assert kernel.value("x") == ("2" if blob_case else "1")
    told = "not restored: big (its saved data is damaged" if blob_case else "could not be used"
    assert told in kernel.banner and expected in kernel.banner, kernel.banner
    assert kernel.value("'trap' in globals() or 'big' in globals()") == "False"
    kernel.execute("y = 2")
    wait_saved(kernel)
    assert not sentinel.exists()
    report(
        f"planted: {case}",
        capsys,
        kernel_started=True,
        restored=2 if blob_case else 1,
        untrusted_code_ran=int(sentinel.exists()),
    )


@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_group_or_world_writable_store_is_refused_with_the_fix(mode, start_kernel, jupyter_dirs, capsys):
    nb = our_store(jupyter_dirs).notebook(SESSION)
    nb.commit(snapshot({"x": 1}), execution_count=1)
    os.chmod(nb.store.root, mode)
    kernel = start_kernel(session=SESSION)
    assert "can be written by other users" in kernel.banner and f"chmod go-w {nb.store.root}" in kernel.banner
    assert kernel.value("'x' in globals()") == "False"
    report(f"unsafe store {oct(mode)}", capsys, kernel_started=True, loaded=False, told_why=True)


def test_a_kernel_creates_its_store_private(start_kernel, jupyter_dirs, capsys):
    kernel = start_kernel(session=SESSION)
    kernel.execute("import numpy as np\narr = np.zeros(100_000)\nsmall = 1")
    wait_saved(kernel)
    root = Path(jupyter_dirs["DURABLE_KERNEL_DIR"])
    key = Path(jupyter_dirs["JUPYTER_DATA_DIR"]) / "durable_kernel_secret"
    modes = {p: stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*"), key]}
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o700 if p.is_dir() else 0o600)}
    assert not wrong
    report("permissions", capsys, paths_checked=len(modes), wrong=len(wrong))


# --- blobs that are not regular files ---------------------------------------------------------------

NON_REGULAR = """
import json, os, sys
import numpy as np
from durable_kernel.checkpoints import Store, snapshot, CheckpointError

nb = Store(sys.argv[1], b"k" * 64).notebook("a")
nb.commit(snapshot({"x": 1}), execution_count=1)
nb.commit(snapshot({"x": 2, "big": list(range(20000)), "arr": np.ones(100000)}), execution_count=2)
man = nb.read_manifest(2)
big = next(v for v in man.variables if v["name"] == "big")["digest"]
arr = next(v for v in man.variables if v["name"] == "arr")["buffers"][0]["digest"]
path = nb.blob_path(big if sys.argv[3] == "payload" else arr)
path.unlink()
if sys.argv[2] == "directory":
    path.mkdir()
else:
    os.mkfifo(path, 0o600)
try:
    restored, reasons = nb.load_latest_with_reasons()
    print(json.dumps({"generation": restored.manifest.generation if restored else None, "reasons": reasons,
                      "restored": sorted(restored.values) if restored else [],
                      "damaged": sorted(restored.damaged) if restored else []}))
except CheckpointError as exc:
    print(json.dumps({"error": "CheckpointError: %s" % exc}))
except Exception as exc:
    print(json.dumps({"error": "%s: %s" % (type(exc).__name__, exc)}))
"""


#: where a process waits when it opens or reads a FIFO nobody writes to
_FIFO_WAITS = {"wait_for_partner", "pipe_read", "pipe_wait", "pipe_read_wait"}


def _run_until_done_or_blocked_on_a_fifo(args: list[str]) -> tuple[str, bool]:
    """Run ``args``; returns (stdout, blocked). Blocking on a FIFO is seen in /proc, without waiting it out."""
    import time

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/wchan") as f:
                if f.read().strip() in _FIFO_WAITS:
                    proc.kill()
                    proc.wait()
                    return "", True
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return "", True
        time.sleep(0.02)
    return proc.stdout.read(), False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "kind, blob",
    [
        ("directory", "payload"),
        ("fifo", "payload"),
        ("fifo", "buffer"),
        ("directory", "buffer"),
    ],
)
def test_blob_that_is_not_a_regular_file_is_refused_and_costs_only_its_variable(kind, blob, tmp_path):
    out, blocked = _run_until_done_or_blocked_on_a_fifo(
        [sys.executable, "-c", NON_REGULAR, str(tmp_path / "store"), kind, blob]
    )
    assert not blocked, f"loading a store whose {blob} blob is a {kind} blocked forever"
    result = json.loads(out)
    lost = "big" if blob == "payload" else "arr"
    assert result.get("generation") == 2, result
    assert result["damaged"] == [lost] and lost not in result["restored"] and "x" in result["restored"], result


def test_kernel_restores_the_rest_past_a_blob_that_is_a_directory(start_kernel, jupyter_dirs):
    nb = our_store(jupyter_dirs).notebook(SESSION)
    nb.commit(snapshot({"x": 1}), execution_count=1)
    nb.commit(snapshot({"x": 2, "big": list(range(20_000))}), execution_count=2)
    big = next(v for v in nb.read_manifest(2).variables if v["name"] == "big")
    path = nb.blob_path(big["digest"])
    path.unlink()
    path.mkdir()
    kernel = start_kernel(session=SESSION)
    assert kernel.value("x") == "2", kernel.banner
    assert (
        "not restored: big (its saved data is damaged (blob" in kernel.banner
        and "is not a regular file" in kernel.banner
    )
