"""The checkpoint store as a library: format, commit, integrity, retention."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from durable_kernel.checkpoints import (
    SCHEMA_VERSION,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    NotRestored,
    SaveError,
    Store,
    UnsafeStore,
    UntrustedCheckpoint,
    folder_name,
    load_or_create_key,
    maintenance,
    snapshot,
)
from durable_kernel.checkpoints import manifest as manifest_format

KEY = b"k" * 64


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", KEY)


def commit(nb, namespace, count=1, keep=5):
    return nb.commit(snapshot(namespace), execution_count=count, keep=keep)


def test_plain_values_round_trip(store):
    nb = store.notebook("a.ipynb")
    values = {"i": 3, "f": 2.5, "s": "text", "b": b"\x00\x01", "d": {"k": [1, 2]}, "st": {1, 2}, "n": None}
    commit(nb, values)
    assert nb.load_latest().values == values


def test_numpy_array_round_trips_through_its_512_kib_chunks(store):
    nb = store.notebook("a.ipynb")
    arr = np.arange(1_000_000, dtype=np.float64)
    result = commit(nb, {"arr": arr})
    assert result.blobs_written in (16, 17, 18)  # 8 MB in 512 KiB chunks, maybe a head and a tail piece
    restored = nb.load_latest().values["arr"]
    np.testing.assert_array_equal(restored, arr)


def test_restored_array_is_writable_without_touching_the_blob(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"arr": np.zeros(100_000)})
    blob = next(p for p in nb.blobs_dir.rglob("*") if p.is_file())
    before = blob.read_bytes()
    restored = nb.load_latest().values["arr"]
    restored[:] = 7.0
    assert blob.read_bytes() == before
    assert (nb.load_latest().values["arr"] == 0).all()


def test_unchanged_data_is_not_written_again(store):
    nb = store.notebook("a.ipynb")
    big = np.random.default_rng(0).random(2_000_000)
    first = commit(nb, {"big": big, "x": 1}, count=1)
    second = commit(nb, {"big": big, "x": 2}, count=2)
    assert first.bytes_written > big.nbytes
    assert second.bytes_written < 64 * 1024


def test_aliases_stay_shared(store):
    nb = store.notebook("a.ipynb")
    shared = [1, 2]
    commit(nb, {"a": shared, "b": shared})
    values = nb.load_latest().values
    assert values["a"] is values["b"]


def test_unpicklable_variable_is_skipped_with_its_reason(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"ok": 1, "lock": threading.Lock(), "gen": (i for i in range(3))})
    restored = nb.load_latest()
    assert restored.values == {"ok": 1}
    reasons = {s.name: s.reason for s in restored.not_restored}
    assert set(reasons) == {"lock", "gen"}
    assert "lock" in reasons["lock"] and "generator" in reasons["gen"]


class Exploding:
    def __reduce__(self):
        raise RuntimeError("refuses to be pickled")


def test_object_whose_reduce_raises_costs_only_itself(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"bad": Exploding(), "good": [1, 2, 3]})
    restored = nb.load_latest()
    assert restored.values == {"good": [1, 2, 3]}
    assert "refuses to be pickled" in restored.not_restored[0].reason


def test_identity_is_hashed_never_joined_into_a_path(store):
    nb = store.notebook("../../etc/passwd")
    commit(nb, {"x": 1})
    assert nb.dir.parent == store.root
    assert nb.dir.name == folder_name("../../etc/passwd")
    assert nb.read_manifest(nb.checkpoint_ids()[0]).identity == "../../etc/passwd"


def test_notebooks_do_not_see_each_other(store):
    commit(store.notebook("a.ipynb"), {"only_a": 1})
    commit(store.notebook("b.ipynb"), {"only_b": 2})
    assert store.notebook("a.ipynb").load_latest().values == {"only_a": 1}
    assert store.notebook("b.ipynb").load_latest().values == {"only_b": 2}


def test_keeps_the_last_generations_and_their_blobs_only(store):
    nb = store.notebook("a.ipynb")
    for count in range(1, 9):
        commit(nb, {"arr": np.full(50_000, count)}, count=count, keep=3)
    assert nb.checkpoint_ids() == [8, 7, 6]
    blobs = [p for p in nb.blobs_dir.rglob("*") if p.is_file()]
    assert len(blobs) == 3
    assert nb.load(6).values["arr"][0] == 6


def test_a_kept_manifest_that_cannot_be_read_for_now_keeps_every_blob(store, monkeypatch):
    nb = store.notebook("a.ipynb")
    commit(nb, {"arr": np.full(50_000, 1)}, count=1, keep=3)
    unreadable = str(nb.manifest_path(1))
    real_open = os.open

    def open_with_an_io_error(path, flags, *args, **kwargs):
        if str(path) == unreadable:
            raise OSError(5, "Input/output error")  # EIO: the disk, for now; root ignores chmod 000
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_with_an_io_error)
    commit(nb, {"arr": np.full(50_000, 2)}, count=2, keep=3)
    monkeypatch.undo()
    assert nb.load(1).values["arr"][0] == 1


def test_files_are_private_to_the_user(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"arr": np.zeros(100_000)})
    for path in [nb.dir, *nb.dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_key_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "data" / "durable_kernel_secret"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key and len(key) >= 32


def test_manifest_records_what_the_issue_asks(store):
    nb = store.notebook("/home/u/a.ipynb")
    commit(nb, {"x": 1, "g": (i for i in ())}, count=7)
    man = nb.read_manifest(1)
    assert man.data["schema"] == SCHEMA_VERSION
    assert man.execution_count == 7 and man.identity == "/home/u/a.ipynb"
    assert {"python", "dill", "durable_kernel", "packages"} <= set(man.data["versions"])
    assert man.variables[0]["name"] == "x" and man.variables[0]["type"] == "builtins.int"
    assert man.skipped[0]["name"] == "g"


def _newest_manifest(nb) -> Path:
    return nb.manifest_path(nb.checkpoint_ids()[0])


def test_truncated_blob_costs_only_its_variable(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"arr": np.zeros(100_000), "kept": 1}, count=1)
    commit(nb, {"arr": np.ones(100_000), "kept": 2}, count=2)
    newest_blob = nb.blob_path(nb.read_manifest(2).variables[0]["buffers"][0]["digest"])
    with open(newest_blob, "r+b") as f:
        f.truncate(100)
    restored = nb.load_latest()
    assert restored.manifest.generation == 2
    assert restored.values == {"kept": 2}
    assert "truncated" in restored.damaged["arr"]


def test_an_older_intact_version_of_a_damaged_variable_is_found(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"arr": np.zeros(100_000)}, count=1)
    commit(nb, {"arr": np.ones(100_000)}, count=2)
    os.truncate(nb.blob_path(nb.read_manifest(2).variables[0]["buffers"][0]["digest"]), 100)
    assert nb.older_copies(["arr"], newer_than=2) == {"arr": 1}


def test_flipped_manifest_byte_is_caught_by_the_signature(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"x": 1}, count=1)
    commit(nb, {"x": 2}, count=2)
    path = _newest_manifest(nb)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    restored = nb.load_latest()
    assert restored.values == {"x": 1}
    assert "not signed" in restored.fallbacks[0]


def test_blob_with_wrong_content_is_never_unpickled(store, tmp_path):
    nb = store.notebook("a.ipynb")
    commit(nb, {"big": list(range(20_000))})  # payload large enough for its own blob
    digest = nb.read_manifest(1).variables[0]["digest"]
    sentinel = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(sentinel)))
    nb.blob_path(digest).write_bytes(evil)
    restored = nb.load_latest()
    assert restored.values == {} and "does not match its digest" in restored.damaged["big"]
    assert not sentinel.exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_manifest_signed_with_another_key_is_never_unpickled(store, tmp_path):
    sentinel = tmp_path / "pwned"
    other = Store(store.root, b"x" * 64).notebook("a.ipynb")
    snap = snapshot({"trap": _Evil(str(sentinel))})
    other.commit(snap, execution_count=1)
    with pytest.raises(UntrustedCheckpoint):
        store.notebook("a.ipynb").load(1)
    assert store.notebook("a.ipynb").load_latest() is None
    assert not sentinel.exists()


def test_newer_schema_is_refused_with_advice_to_upgrade():
    body = {"schema": SCHEMA_VERSION + 1}
    raw = manifest_format.encode(body, KEY)
    with pytest.raises(IncompatibleCheckpoint, match="upgrade"):
        manifest_format.decode(raw, KEY, "checkpoint 1")


def test_missing_fields_are_refused_cleanly():
    raw = manifest_format.encode({"schema": SCHEMA_VERSION, "generation": 1}, KEY)
    with pytest.raises(CorruptCheckpoint, match="missing or malformed"):
        manifest_format.decode(raw, KEY, "checkpoint 1")


def test_nothing_stored_means_nothing_to_load(store):
    assert store.notebook("never-used.ipynb").load_latest() is None


def test_leftover_temp_files_are_ignored_and_swept(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"x": 1})
    leftover = nb.manifests_dir / ".tmp-123-abcd"
    leftover.write_bytes(b"half a manifest")
    assert nb.load_latest().values == {"x": 1}
    commit(nb, {"x": 2}, count=2)
    assert not leftover.exists()


def test_group_writable_store_is_refused(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"x": 1})
    os.chmod(nb.dir, 0o770)
    with pytest.raises(UnsafeStore, match="chmod go-w"):
        nb.load_latest()


def test_commit_into_a_folder_others_can_write_writes_nothing(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"x": 1})
    os.chmod(nb.blobs_dir, 0o777)
    with pytest.raises(UnsafeStore, match=f"chmod go-w {nb.blobs_dir}"):
        commit(nb, {"x": 2, "big": np.ones(100_000)}, count=2)
    assert nb.checkpoint_ids() == [1] and nb.blob_names() == set()


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_files(store, monkeypatch):
    nb = store.notebook("a.ipynb")
    commit(nb, {"arr": np.zeros(100_000)}, count=1)
    real_write = os.write

    def full_disk(fd, data):
        if len(data) > 1000:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SaveError, match="No space left"):
        commit(nb, {"arr": np.ones(100_000)}, count=2)
    monkeypatch.undo()
    assert nb.checkpoint_ids() == [1]
    assert not list(nb.dir.rglob(".tmp-*"))
    assert (nb.load_latest().values["arr"] == 0).all()


def test_commit_fsyncs_every_file_and_folder_before_the_manifest_rename(store, monkeypatch):
    nb = store.notebook("a.ipynb")
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append("fsync")
        return real_fsync(fd)

    def rename(src, dst):
        events.append(f"rename {Path(dst).parent.name}")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    commit(nb, {"arr": np.zeros(100_000)})
    manifest_rename = events.index("rename manifests")
    blob_rename = next(i for i, e in enumerate(events) if e.startswith("rename ") and e != "rename manifests")
    assert events[blob_rename - 1] == "fsync"  # blob data synced before its rename
    assert "fsync" in events[blob_rename + 1 : manifest_rename - 1]  # its folder synced before the commit
    assert events[manifest_rename - 1] == "fsync"  # manifest data synced before the commit point
    assert events[manifest_rename + 1] == "fsync"  # and the commit itself made durable


def test_unchanged_state_refreshes_the_newest_generation_instead_of_adding_one(store):
    nb = store.notebook("a.ipynb")
    nb.commit(snapshot({"x": 1}), execution_count=1, cell="x = 1")
    nb.commit(snapshot({"x": 2}), execution_count=2, cell="x = 2")
    nb.commit(snapshot({"x": 2}), execution_count=3, cell="print(x)")
    assert nb.checkpoint_ids() == [2, 1]
    newest = nb.read_manifest(2)
    # It keeps naming the cell that made the state: In [2], not the later cell that changed nothing.
    assert newest.execution_count == 2 and newest.data["cell"] == "x = 2"


def test_a_checkpoint_records_what_it_changed_since_the_one_it_replaced(store):
    nb = store.notebook("a.ipynb")
    nb.commit(snapshot({"a": 1, "b": 2}), execution_count=1, cell="a, b = 1, 2")
    nb.commit(snapshot({"b": 3, "c": 4}), execution_count=2, cell="...")
    nb.commit(snapshot({"b": 3, "c": 4}), execution_count=3, cell="print(b)")  # refreshes checkpoint 2
    assert nb.read_manifest(1).data["changes"] == {"from": None, "added": ["a", "b"], "removed": [], "changed": []}
    assert nb.read_manifest(2).data["changes"] == {"from": 1, "added": ["c"], "removed": ["a"], "changed": ["b"]}


def test_retention_counts_states_so_going_back_to_a_kept_one_pushes_nothing_out(store):
    nb = store.notebook("a.ipynb")
    for x in range(1, 6):
        nb.commit(snapshot({"x": x}), execution_count=x, keep=5)
    for count, x in enumerate([4, 3, 2, 1, 5, 1], start=6):  # undo four times, restore 5, restore 1
        nb.commit(snapshot({"x": x}), execution_count=count, keep=5)
        # The five states' first checkpoints stay, plus the newest (what a restart restores).
        assert nb.checkpoint_ids() == [count, 5, 4, 3, 2, 1]
    nb.commit(snapshot({"x": 99}), execution_count=12, keep=5)  # a new state: the least recent one goes
    assert nb.checkpoint_ids() == [12, 5, 4, 3, 1]


def test_a_set_of_strings_pickled_in_another_order_is_not_a_change(store):
    """Another process iterates a set of strings in another order (string hashes are per process)."""
    nb = store.notebook("a.ipynb")
    tags = {"alpha", "beta", "gamma", "delta", "epsilon"}
    nb.commit(snapshot({"tags": tags}), execution_count=1, cell="tags = ...")
    stored = nb.read_manifest(1).variables[0]["digest"]
    snap = snapshot({"tags": tags})
    snap.variables[0].payload = _pickled_elsewhere(tags, differing_from=snap.variables[0].payload)
    nb.commit(snap, execution_count=2, cell="print(tags)")
    newest = nb.read_manifest(1)
    assert nb.checkpoint_ids() == [1] and newest.variables[0]["digest"] == stored and newest.execution_count == 1


def test_a_set_with_other_strings_is_a_change(store):
    nb = store.notebook("a.ipynb")
    nb.commit(snapshot({"tags": {"alpha", "beta", "gamma"}}), execution_count=1)
    nb.commit(snapshot({"tags": {"alpha", "beta", "gammb"}}), execution_count=2)
    assert nb.checkpoint_ids() == [2, 1] and nb.read_manifest(2).data["changes"]["changed"] == ["tags"]


def test_a_list_with_the_same_items_in_another_order_is_a_change(store):
    nb = store.notebook("a.ipynb")
    nb.commit(snapshot({"order": ["alpha", "beta", 3]}), execution_count=1)
    nb.commit(snapshot({"order": [3, "beta", "alpha"]}), execution_count=2)
    assert nb.load_latest().values["order"] == [3, "beta", "alpha"]


def test_two_equal_lists_that_become_one_shared_list_is_a_change(store):
    nb = store.notebook("a.ipynb")
    nb.commit(snapshot({"pair": [["x"], ["x"]]}), execution_count=1)
    shared = ["x"]
    nb.commit(snapshot({"pair": [shared, shared]}), execution_count=2)
    pair = nb.load_latest().values["pair"]
    assert pair[0] is pair[1]


def _pickled_elsewhere(value, differing_from: bytes) -> bytes:
    """``value`` pickled by another Python process whose bytes differ from ``differing_from``."""
    for seed in range(1, 50):
        done = subprocess.run(
            [sys.executable, "-c", f"import pickle, sys; sys.stdout.buffer.write(pickle.dumps({value!r}, protocol=5))"],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            check=True,
        )
        if done.stdout != differing_from:
            return done.stdout
    raise AssertionError("every process pickled it the same")


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the bytes say it is damaged
    path.write_bytes(bytes(raw))


def test_blob_damaged_in_place_is_written_again_when_the_same_data_is_saved(store):
    nb = store.notebook("a.ipynb")
    big = list(range(20_000))
    commit(nb, {"big": big}, count=1)
    blob = nb.blob_path(nb.read_manifest(1).variables[0]["digest"])
    _flip_a_byte(blob)
    assert "big" in nb.load_latest().damaged
    assert not blob.exists()  # set aside: the next commit must not take it for stored
    commit(nb, {"big": big}, count=2)
    assert store.notebook("a.ipynb").load_latest().values == {"big": big}
    assert [p.name for p in blob.parent.iterdir()] == [blob.name]  # the damaged copy was swept


def test_a_blob_changed_on_disk_is_checked_and_written_again_by_the_next_commit_without_any_load(store):
    """One flipped byte in a blob that later cells reuse: the commit notices (its file changed
    since it was recorded), says which variable it repaired, and the store loads again."""
    nb = store.notebook("a.ipynb")
    values = {"a": list(range(20_000)), "b": np.arange(100_000)}
    commit(nb, values, count=1)
    var_a, var_b = sorted(nb.read_manifest(1).variables, key=lambda v: v["name"])
    for path in (nb.blob_path(var_a["digest"]), nb.blob_path(var_b["buffers"][0]["digest"])):
        _flip_a_byte(path)
    result = commit(nb, {**values, "c": 3}, count=2)
    assert result.repaired == ["a", "b"]
    restored = store.notebook("a.ipynb").load_latest(verify_buffers=True)
    assert restored.values["a"] == values["a"] and (restored.values["b"] == values["b"]).all()


def test_reused_blobs_whose_files_are_unchanged_are_not_read_again(store, monkeypatch):
    from durable_kernel.checkpoints import blobs

    nb = store.notebook("a.ipynb")
    values = {"a": list(range(20_000)), "b": np.arange(100_000)}
    commit(nb, values, count=1)
    read = []
    real = blobs.file_digest
    monkeypatch.setattr(blobs, "file_digest", lambda path, size: read.append(path) or real(path, size))
    commit(nb, {**values, "c": 3}, count=2)
    assert read == []


def test_blobs_only_an_older_checkpoint_names_are_reused_unread_when_a_value_comes_back(store, monkeypatch):
    from durable_kernel.checkpoints import blobs

    nb = store.notebook("a.ipynb")
    first = {"arr": np.arange(1_000_000, dtype=np.float64)}
    commit(nb, first, count=1)
    commit(nb, {"arr": np.zeros(1_000_000)}, count=2)
    read = []
    real = blobs.file_digest
    monkeypatch.setattr(blobs, "file_digest", lambda path, size: read.append(path) or real(path, size))
    result = commit(nb, first, count=3)
    assert read == [] and result.blobs_written == 0
    np.testing.assert_array_equal(nb.load_latest().values["arr"], first["arr"])


def test_a_commit_reads_only_the_newest_checkpoint_before_its_commit_point(store, monkeypatch):
    from durable_kernel.checkpoints import retention

    nb = store.notebook("a.ipynb")
    for count in range(1, 5):
        commit(nb, {"x": count}, count=count)
    read = []
    real = retention.signed
    monkeypatch.setattr(retention, "signed", lambda nb, key, gen: read.append(gen) or real(nb, key, gen))
    at_commit_point = []
    nb.commit(snapshot({"x": 5}), execution_count=5, committed=lambda result: at_commit_point.extend(read))
    assert at_commit_point == [4]
    assert sorted(set(read)) == [1, 2, 3, 4]  # the older ones after it, for pruning


def test_payload_blob_that_is_not_a_regular_file_costs_only_its_variable(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"x": 1}, count=1)
    commit(nb, {"x": 1, "big": list(range(20_000))}, count=2)
    blob = nb.blob_path(nb.read_manifest(2).variables[1]["digest"])
    blob.unlink()
    blob.mkdir()
    restored = nb.load_latest()
    assert restored.values == {"x": 1}
    assert "not a regular file" in restored.damaged["big"]


# --- variables saved together (they share objects) --------------------------------------------


class _Part:
    def __init__(self, whole=None):
        self.whole = whole


def _group_namespace():
    whole = {"data": np.arange(100_000, dtype=np.float64), "parts": []}
    part = _Part(whole)
    whole["parts"].append(part)
    return {"whole": whole, "part": part, "alone": [1, 2, 3]}


def test_variables_that_share_an_object_load_as_one_group(store):
    nb = store.notebook("a.ipynb")
    commit(nb, _group_namespace())
    values = nb.load_latest().values
    assert values["whole"]["parts"][0] is values["part"] and values["part"].whole is values["whole"]
    kinds = {v["name"]: v["kind"] for v in nb.read_manifest(1).variables}
    assert kinds == {"whole": "pickle", "part": "member", "alone": "pickle"}


def test_a_group_whose_member_list_does_not_match_its_members_is_refused_unloaded(store):
    nb = store.notebook("a.ipynb")
    commit(nb, _group_namespace())
    path = nb.manifest_path(1)
    data = manifest_format.signed_data(path.read_bytes(), KEY, "test")
    next(v for v in data["variables"] if v["name"] == "whole")["members"] = ["whole", "alone"]
    path.write_bytes(manifest_format.encode(data, KEY))
    with pytest.raises(CorruptCheckpoint, match="group of whole is malformed"):
        nb.load(1)


def test_a_damaged_buffer_of_one_member_leaves_its_whole_group_unloaded(store):
    nb = store.notebook("a.ipynb")
    commit(nb, _group_namespace())
    buffer = next(v for v in nb.read_manifest(1).variables if v["name"] == "whole")["buffers"][0]
    _flip_a_byte(nb.blob_path(buffer["digest"]))
    restored = nb.load_latest()
    assert set(restored.damaged) == {"whole", "part"}
    assert restored.values == {"alone": [1, 2, 3]}


def test_a_group_carried_forward_unloaded_is_dropped_with_a_reason_when_a_member_is_reassigned(store):
    nb = store.notebook("a.ipynb")
    commit(nb, _group_namespace())
    entries = {v["name"]: v for v in nb.read_manifest(1).variables}
    carried = {name: NotRestored(name, "?", "gone", "", entries[name]) for name in ("whole", "part")}
    commit(nb, {**carried, "part": "reassigned"}, count=2)
    latest = nb.read_manifest(2)
    assert {v["name"] for v in latest.variables} == {"part"}
    assert "reassigned before it loaded again" in latest.skipped[0]["reason"]
    commit(nb, carried, count=3)
    assert {v["name"]: v["kind"] for v in nb.read_manifest(3).variables} == {"whole": "pickle", "part": "member"}


# --- locks and clearing ---------------------------------------------------------------------------


def _fds_open_on(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path``'s inode."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.path.samestat(os.stat(f"/proc/self/fd/{fd}"), path.stat())
        except OSError:
            continue
    return count


def test_a_lock_file_replaced_while_waited_for_is_never_held_by_two_at_once(store):
    nb = store.notebook("a.ipynb")
    lock = nb.dir / "lock"
    holders: list[str] = []
    overlaps: list[tuple[str, list[str]]] = []
    newcomer_in, newcomer_may_go = threading.Event(), threading.Event()

    def hold(name: str, entered: threading.Event | None = None, until: threading.Event | None = None) -> None:
        with nb.locked():
            if holders:
                overlaps.append((name, list(holders)))
            holders.append(name)
            if entered is not None:
                entered.set()
            if until is not None:
                until.wait(30)
            else:
                time.sleep(0.3)
            holders.remove(name)

    with nb.locked():
        waiter = threading.Thread(target=hold, args=("waiter",))
        waiter.start()
        deadline = time.monotonic() + 30
        while _fds_open_on(lock) < 2:  # the waiter has the lock file open: it waits in flock
            assert time.monotonic() < deadline, "the waiter never opened the lock file"
            time.sleep(0.01)
        time.sleep(0.2)
        lock.unlink()  # as clear's rmtree did, or a user's rm -r
        newcomer = threading.Thread(target=hold, args=("newcomer", newcomer_in, newcomer_may_go))
        newcomer.start()
        assert newcomer_in.wait(30)  # a new lock file nobody holds
    time.sleep(0.5)  # the waiter now gets the deleted file's lock, which excludes nobody
    newcomer_may_go.set()
    waiter.join(30)
    newcomer.join(30)
    assert not waiter.is_alive() and not newcomer.is_alive()
    assert overlaps == []


def test_clear_keeps_the_lock_saving_and_settings_files(store):
    nb = store.notebook("a.ipynb")
    commit(nb, {"big": np.ones(100_000)})
    nb.write_settings({"exclude": ["secret_*"]})
    os.close(nb.hold_saving())
    kept = {name: (nb.dir / name).stat().st_ino for name in ("lock", "saving", "settings.json")}
    freed = maintenance.clear_notebook(nb)
    assert freed >= 800_000
    assert nb.checkpoint_ids() == [] and nb.blob_names() == set() and nb.load_latest() is None
    assert {name: (nb.dir / name).stat().st_ino for name in kept} == kept
    assert nb.read_settings() == {"exclude": ["secret_*"]}


def test_a_notebook_class_whose_attribute_changed_is_not_the_same_value():
    """notebook_code sets a class's attributes through a state setter whose result the pickle
    discards: what it sets is part of the value all the same."""
    from durable_kernel.checkpoints import equivalence

    import __main__

    exec("class Tally:\n    made = 0\n", __main__.__dict__)
    try:
        before = snapshot({"Tally": __main__.Tally}).variables[0].payload
        __main__.Tally.made = 13
        after = snapshot({"Tally": __main__.Tally}).variables[0].payload
        assert not equivalence.same_value(before, after)
    finally:
        del __main__.Tally
