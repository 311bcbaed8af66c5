"""`durable-kernel list | show | clear | gc | du` through real subprocesses.

The store is built with the library directly (snapshot + commit), not with
kernels, so these run in seconds.  JUPYTER_DATA_DIR and DURABLE_KERNEL_DIR
point at this test's tmp dirs (the ``jupyter_dirs`` fixture), and the
subprocesses inherit them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from durable_kernel.checkpoints import Store, folder_name, snapshot
from durable_kernel.checkpoints.location import open_store

DAY = 86400
#: The command installed with the Python running the tests (the one checked against the source),
#: not whichever ``durable-kernel`` comes first on PATH.
COMMAND = str(Path(sys.executable).with_name("durable-kernel"))


def run(*args: str, cwd: Path | None = None, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "durable_kernel"] if module else [COMMAND]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def ok(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = run(*args, **kwargs)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess, status: int, *expected: str) -> str:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def store(jupyter_dirs) -> Store:
    return open_store(environ=jupyter_dirs)


def commit(
    store: Store, identity: str, namespace: dict, count: int = 1, at: float | None = None, keep: int = 5, cell: str = ""
):
    """Commit ``namespace`` as ``identity``'s newest checkpoint, dated ``at`` (unix time) if given."""
    nb = store.notebook(identity)
    real_time = time.time
    if at is not None:
        time.time = lambda: at  # the manifest's "created"
    try:
        nb.commit(snapshot(namespace), execution_count=count, cell=cell, keep=keep)
    finally:
        time.time = real_time
    return nb


def blob(n: int, seed: int = 0) -> bytes:
    """Bytes big enough to be stored as a blob file, not inline in the manifest."""
    return bytes((seed + i) % 251 for i in range(n))


class Boom:
    """Unpickling this opens (creates) a file: proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- every command ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["list", "show", "clear", "gc", "du"])
def test_every_command_has_help(command, jupyter_dirs):
    result = ok(command, "--help")
    assert result.stdout.startswith(f"usage: durable-kernel {command}")
    assert "--json" in result.stdout and "--dir" in result.stdout


@pytest.mark.parametrize("command", ["list", "gc", "du"])
def test_unknown_option_is_one_line_and_status_2(command, jupyter_dirs):
    one_line_error(run(command, "--bogus"), 2, f"durable-kernel {command}:", "--bogus")


def test_unknown_command_is_one_line(jupyter_dirs):
    one_line_error(run("frobnicate"), 2, "invalid choice: 'frobnicate'")


def test_commands_run_through_python_dash_m(store):
    commit(store, "nb.ipynb", {"x": 1})
    result = ok("list", module=True)
    assert "nb.ipynb" in result.stdout


def test_reading_the_store_creates_no_signing_key(jupyter_dirs):
    ok("list")
    ok("du")
    assert not (Path(jupyter_dirs["JUPYTER_DATA_DIR"]) / "durable_kernel_secret").exists()


# --- list ------------------------------------------------------------------------------------


def test_list_shows_every_notebook_most_recently_used_first(store, tmp_path):
    now = time.time()
    commit(store, "old.ipynb", {"a": 1}, at=now - 3 * DAY)
    commit(store, "/work/recent.ipynb", {"a": 1, "b": blob(300_000)}, at=now - 120)
    commit(store, "middle", {"a": 1}, at=now - 2 * 3600)
    commit(store, "middle", {"a": 2, "c": 3}, count=2, at=now - 3600)

    result = ok("list")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["last", "saved", "checkpoints", "variables", "size", "notebook"]
    assert lines[1].startswith("2 minutes ago") and lines[1].endswith("/work/recent.ipynb")
    assert "KiB" in lines[1] and lines[1].split()[3:5] == ["1", "2"]  # checkpoints, variables
    assert lines[2].startswith("1 hour ago") and lines[2].endswith("middle")
    assert lines[2].split()[3:5] == ["2", "2"]
    assert lines[3].startswith("3 days ago") and lines[3].endswith("old.ipynb")
    assert "3 notebooks" in result.stdout

    data = json.loads(ok("list", "--json").stdout)
    assert [n["identity"] for n in data["notebooks"]] == ["/work/recent.ipynb", "middle", "old.ipynb"]
    recent = data["notebooks"][0]
    assert recent["size"] > 300_000 and recent["variables"] == 2 and recent["checkpoints"] == 1
    assert abs(recent["last_used"] - (now - 120)) < 1
    assert data["store"] == str(store.root)


def test_list_of_an_empty_store_says_so(jupyter_dirs):
    assert "No checkpoints in" in ok("list").stdout
    assert json.loads(ok("list", "--json").stdout)["notebooks"] == []


def test_list_marks_a_notebook_whose_checkpoints_are_not_signed_with_our_key(store):
    nb = commit(store, "nb.ipynb", {"x": 1})
    Store(store.root, b"another user's key").notebook("other.ipynb").commit(snapshot({"y": 2}), execution_count=1)
    result = ok("list")
    assert "nb.ipynb" in result.stdout
    assert f"(unknown: folder {folder_name('other.ipynb')})" in result.stdout
    assert "not signed with this user's key" in result.stderr
    assert nb.checkpoint_ids() == [1]


def test_dir_option_before_or_after_the_command_beats_the_environment(store, tmp_path, monkeypatch):
    commit(store, "nb.ipynb", {"x": 1})
    env_store = tmp_path / "elsewhere"
    env_store.mkdir()
    monkeypatch.setenv("DURABLE_KERNEL_DIR", str(env_store))
    assert "No checkpoints" in ok("list").stdout
    assert "nb.ipynb" in ok("--dir", str(store.root), "list").stdout
    assert "nb.ipynb" in ok("list", "--dir", str(store.root)).stdout


def test_list_with_a_dir_that_is_not_a_folder_is_one_line(tmp_path, jupyter_dirs):
    afile = tmp_path / "file"
    afile.write_text("x")
    one_line_error(run("list", "--dir", str(afile)), 1, "is not a folder")
    one_line_error(run("list", "--dir", str(tmp_path / "missing")), 1, "does not exist")


# --- show ------------------------------------------------------------------------------------


def test_show_finds_a_notebook_by_relative_or_absolute_path_or_identity(store, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    identity = str(project / "analysis.ipynb")
    commit(store, identity, {"df": blob(100_000), "n": 3, "os": os, "alias": None}, count=4, cell="n = 3")
    commit(store, "session-name", {"z": 1})

    for name, cwd in (("analysis.ipynb", project), ("project/analysis.ipynb", tmp_path), (identity, None)):
        result = ok("show", name, cwd=cwd)
        assert result.stdout.startswith(f"Notebook:    {identity}\n")
    assert "Notebook:    session-name" in ok("show", "session-name").stdout
    assert "Notebook:    session-name" in ok("show", folder_name("session-name")).stdout

    out = ok("show", identity).stdout
    assert "as of In [4]" in out and "Cell:        n = 3" in out and "just now" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "builtins.bytes" in rows["df"] and "KiB" in rows["df"]
    assert "builtins.int" in rows["n"] and "bytes" in rows["n"]
    assert "module os" in rows["os"]
    assert "4 variables" in out


def test_show_reads_the_manifest_without_unpickling(store, tmp_path):
    marker = tmp_path / "unpickled"
    nb = commit(store, "nb.ipynb", {"boom": Boom(str(marker)), "conn": threading.Lock()})
    out = ok("show", "nb.ipynb").stdout
    assert "boom" in out and "Boom" in out
    assert "Not saved:" in out and "conn (_thread.lock)" in out and "cannot pickle" in out
    data = json.loads(ok("show", "nb.ipynb", "--json").stdout)
    assert [v["name"] for v in data["variables"]] == ["boom"]
    assert data["skipped"][0]["name"] == "conn"
    assert not marker.exists(), "show unpickled a variable"
    nb.load(1)  # the control: loading does run the payload
    assert marker.exists()


def test_show_a_given_generation_and_json(store):
    commit(store, "nb.ipynb", {"a": 1}, count=1, cell="a = 1")
    commit(store, "nb.ipynb", {"a": 1, "b": 2}, count=2, cell="b = 2")
    out = ok("show", "nb.ipynb", "--generation", "1").stdout
    assert "Checkpoint:  1," in out and "Kept:        2, 1" in out and "1 variable," in out
    data = json.loads(ok("show", "nb.ipynb", "--json").stdout)
    assert data["generation"] == 2 and data["generations"] == [2, 1]
    assert data["execution_count"] == 2 and data["cell"] == "b = 2"
    assert {v["name"]: v["type"] for v in data["variables"]} == {"a": "builtins.int", "b": "builtins.int"}
    assert all("inline" not in v for v in data["variables"])


def test_show_bad_inputs_are_one_line(store, tmp_path):
    nb = commit(store, str(tmp_path / "nb.ipynb"), {"a": 1})
    one_line_error(run("show", "missing.ipynb"), 1, "no checkpoints for 'missing.ipynb'")
    # Same file name elsewhere: the message suggests the stored one.
    one_line_error(run("show", "nb.ipynb", cwd=Path("/")), 1, "did you mean", str(tmp_path / "nb.ipynb"))
    one_line_error(run("show", str(tmp_path / "nb.ipynb"), "--generation", "7"), 1, "no checkpoint 7", "kept: 1")
    one_line_error(run("show", str(tmp_path / "nb.ipynb"), "--generation", "x"), 2, "not a checkpoint id")
    one_line_error(run("show"), 2, "NOTEBOOK")
    # A tampered manifest is refused (its signature no longer matches), not shown.
    path = nb.manifest_path(1)
    path.write_bytes(path.read_bytes().replace(b'"a"', b'"A"'))
    one_line_error(run("show", str(tmp_path / "nb.ipynb"), "--generation", "1"), 1, "not signed with this user's key")
    one_line_error(run("show", str(tmp_path / "nb.ipynb")), 1, "no readable checkpoint")


# --- clear ----------------------------------------------------------------------------------


def test_clear_one_notebook_by_relative_path_keeps_the_others_and_its_settings(store, tmp_path):
    identity = str(tmp_path / "a.ipynb")
    nb = commit(store, identity, {"x": blob(50_000)})
    nb.write_settings({"exclude": ["secret_*"]})
    other = commit(store, "b.ipynb", {"y": 1})
    out = ok("clear", "a.ipynb", cwd=tmp_path).stdout
    assert out.startswith("Removed 1 checkpoint (") and "KiB" in out and identity in out
    assert nb.checkpoint_ids() == [] and other.checkpoint_ids() == [1]
    assert nb.read_settings() == {"exclude": ["secret_*"]}
    assert [n["identity"] for n in json.loads(ok("list", "--json").stdout)["notebooks"]] == ["b.ipynb"]


def test_clear_older_than_removes_only_notebooks_unused_that_long(store):
    now = time.time()
    old = commit(store, "old.ipynb", {"x": 1}, at=now - 40 * DAY)
    new = commit(store, "new.ipynb", {"x": 1}, at=now - 2 * DAY)
    dry = ok("clear", "--older-than", "30d", "--dry-run").stdout
    assert "Would remove 1 checkpoint" in dry and "old.ipynb" in dry and "new.ipynb" not in dry
    assert old.checkpoint_ids() == [1]
    data = json.loads(ok("clear", "--older-than", "30d", "--json").stdout)
    assert [c["identity"] for c in data["cleared"]] == ["old.ipynb"] and data["freed"] > 0
    assert old.checkpoint_ids() == [] and new.checkpoint_ids() == [1]
    assert "nothing removed" in ok("clear", "--older-than", "4w").stdout


def test_clear_all(store):
    a = commit(store, "a", {"x": 1})
    b = commit(store, "b", {"x": blob(40_000)})
    out = ok("clear", "--all").stdout
    assert "Freed" in out and "2 notebooks" in out
    assert a.checkpoint_ids() == [] and b.checkpoint_ids() == []
    assert "No checkpoints" in ok("list").stdout


@pytest.mark.parametrize(
    "args, status, text",
    [
        ((), 2, "one of NOTEBOOK, --all or --older-than AGE is required"),
        (("a", "--all"), 2, "give only one of NOTEBOOK, --all"),
        (("--older-than", "soon"), 2, "'soon' is not an age"),
        (("missing.ipynb",), 1, "no checkpoints for 'missing.ipynb'"),
    ],
)
def test_clear_bad_inputs_are_one_line_and_remove_nothing(store, args, status, text):
    nb = commit(store, "a", {"x": 1})
    one_line_error(run("clear", *args), status, text)
    assert nb.checkpoint_ids() == [1]


# --- gc -----------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _make_garbage(store: Store):
    """Two kept generations sharing a blob, plus what crashes leave: an orphan blob and temp files."""
    shared, only_new, dropped = blob(200_000, 1), blob(100_000, 2), blob(300_000, 3)
    nb = commit(store, "nb.ipynb", {"shared": shared, "gone": dropped}, count=1)
    nb.commit(snapshot({"shared": shared, "extra": only_new}), execution_count=2)
    nb.commit(snapshot({"shared": shared, "extra": only_new, "x": 1}), execution_count=3)
    # A crash between dropping generation 1's manifest and sweeping its blobs:
    nb.manifest_path(1).unlink()
    leftovers = [
        nb.manifests_dir / ".tmp-123-abcd",
        next(p for p in nb.blobs_dir.iterdir() if p.is_dir()) / ".tmp-123-beef",
        nb.dir / f".tmp-{_dead_pid()}-cafe",
    ]
    for path in leftovers:
        path.write_bytes(b"\0" * 10_000)
    return nb, leftovers


def _blob_files(nb) -> set[str]:
    return {p.name for p in nb.blobs_dir.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")}


def _all_kept_generations_load(nb) -> None:
    for gen in nb.checkpoint_ids():
        restored = nb.load(gen, verify_buffers=True)  # verifies every blob's digest
        assert not restored.not_restored


def test_gc_frees_orphans_and_temp_files_and_keeps_every_needed_blob(store):
    nb, leftovers = _make_garbage(store)
    other = commit(store, "other", {"big": blob(120_000, 9)})
    needed = set()
    for gen in nb.checkpoint_ids():
        needed |= nb.read_manifest(gen).blob_digests()
    before = _blob_files(nb)
    assert len(before - needed) == 1  # the orphan

    du = json.loads(ok("du", "--json").stdout)
    row = next(n for n in du["notebooks"] if n["identity"] == "nb.ipynb")
    assert row["reclaimable"] >= 300_000 + 30_000

    dry = json.loads(ok("gc", "--dry-run", "--json").stdout)
    assert dry["files_removed"] == 4 and dry["freed"] >= 330_000
    assert _blob_files(nb) == before and all(p.exists() for p in leftovers)

    out = ok("gc").stdout
    assert "Removed 4 files, freed" in out and "KiB" in out
    assert _blob_files(nb) == needed
    assert not any(p.exists() for p in leftovers)
    _all_kept_generations_load(nb)
    _all_kept_generations_load(other)

    again = json.loads(ok("gc", "--json").stdout)
    assert again["files_removed"] == 0 and again["freed"] == 0
    _all_kept_generations_load(nb)


def test_gc_keeps_all_blobs_while_a_manifest_cannot_be_parsed(store):
    nb, _ = _make_garbage(store)
    before = _blob_files(nb)
    nb.manifest_path(2).write_bytes(b"durable-kernel-manifest\nff\n{truncated")
    result = ok("gc")
    assert "Removed 3 files" in result.stdout  # the temp files only
    assert "kept all its data because checkpoint 2 cannot be parsed" in result.stderr
    assert _blob_files(nb) == before
    nb.load(3)  # the newest still loads, with every blob it needs


def test_gc_keeps_the_blobs_of_an_untrusted_manifest(store):
    foreign = Store(store.root, b"someone else's key")
    nb = foreign.notebook("nb.ipynb")
    nb.commit(snapshot({"big": blob(100_000)}), execution_count=1)
    before = _blob_files(nb)
    assert before
    ok("gc")
    assert _blob_files(nb) == before


def test_gc_keeps_the_blobs_of_a_manifest_others_can_write(store):
    nb = commit(store, "nb.ipynb", {"old": blob(200_000, 1)}, count=1)
    nb.commit(snapshot({"new": blob(100_000, 2)}), execution_count=2)
    before = _blob_files(nb)
    os.chmod(nb.manifest_path(1), 0o660)  # not trusted now; a chmod makes it loadable again
    result = ok("gc")
    assert "kept all its data because checkpoint 1 cannot be read: its manifest can be written" in result.stderr
    assert _blob_files(nb) == before
    os.chmod(nb.manifest_path(1), 0o600)
    assert nb.load(1).values == {"old": blob(200_000, 1)}


def test_gc_waits_for_the_notebook_lock(store):
    nb, leftovers = _make_garbage(store)
    with nb.locked():
        proc = subprocess.Popen([COMMAND, "gc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None, "gc did not wait for the lock"
        assert all(p.exists() for p in leftovers[:2])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Removed 4 files" in out
    _all_kept_generations_load(nb)


def test_gc_bad_input_is_one_line(jupyter_dirs, tmp_path):
    one_line_error(run("gc", "extra"), 2, "unrecognized arguments: extra")
    one_line_error(run("gc", "--dir", str(tmp_path / "missing")), 1, "does not exist")


# --- mv -------------------------------------------------------------------------------------------


def test_mv_gives_the_state_the_identity_a_kernel_for_new_will_have(store, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # A notebook stored by path (as jupyter_server and VS Code name them), typed relative to the current folder.
    commit(store, str(work / "a.ipynb"), {"x": 1})
    out = ok("mv", "a.ipynb", "reports/b.ipynb", cwd=work).stdout
    assert out == f"Moved 1 checkpoint from {work / 'a.ipynb'} to {work / 'reports' / 'b.ipynb'}.\n"
    assert store.notebook(str(work / "reports" / "b.ipynb")).load_latest().values == {"x": 1}
    assert store.notebook(str(work / "a.ipynb")).checkpoint_ids() == []
    # A session name stays a name, even where the current folder has a file of the new name.
    commit(store, "session-a", {"y": 2})
    (work / "session-b").write_text("")
    ok("mv", "session-a", "session-b", cwd=work)
    assert store.notebook("session-b").load_latest().values == {"y": 2}
    # Named by its folder key (as 'list' shows a notebook whose identity cannot be read).
    commit(store, "by-key", {"z": 3})
    moved = json.loads(ok("mv", folder_name("by-key"), "renamed", "--json", cwd=work).stdout)
    assert (moved["from"], moved["to"], moved["checkpoints"]) == ("by-key", "renamed", [1])
    assert store.notebook("renamed").load_latest().values == {"z": 3}


# --- du -------------------------------------------------------------------------------------------


def test_du_shows_disk_use_by_notebook_biggest_first(store):
    commit(store, "small", {"x": 1})
    big = commit(store, "big.ipynb", {"x": blob(2_000_000)})
    out = ok("du").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["size", "checkpoints", "blobs", "reclaimable", "notebook"]
    assert lines[1].endswith("big.ipynb") and "MiB" in lines[1]
    assert lines[2].endswith("small") and "bytes" in lines[2]
    assert "Total" in out and "2 notebooks" in out and "free on that disk" in out
    data = json.loads(ok("du", "--json").stdout)
    first = data["notebooks"][0]
    assert first["identity"] == "big.ipynb" and first["blobs"] >= 2_000_000 and first["blob_count"] >= 1
    assert data["size"] == sum(n["size"] for n in data["notebooks"]) and data["free"] > 0
    assert first["size"] == sum(p.stat().st_size for p in big.dir.rglob("*") if p.is_file())


def test_du_bad_input_is_one_line(jupyter_dirs):
    one_line_error(run("du", "big.ipynb"), 2, "unrecognized arguments: big.ipynb")
