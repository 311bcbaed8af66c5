"""Damaged, forged or missing checkpoints: never a dead kernel, never an untrusted unpickle.

Each test lets a real kernel commit two checkpoints of one notebook (``data``
differs between them), kills it, damages the store on disk the way a crash,
a bad disk or an attacker would, and starts the notebook again.
"""

from __future__ import annotations

import base64
import os
import pickle

from conftest import KernelPool, holds, user_variables, wait_saved

SESSION = "damage.ipynb"
FIRST = "b'first ' * 10_000"  # bigger than what a manifest keeps inline: stored as a blob file
SECOND = "b'second ' * 10_000"


class _CreatesFile:
    """Unpickling this creates a file: what an attacker would plant."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle(path) -> bytes:
    return pickle.dumps(_CreatesFile(path), protocol=5)


def test_planted_pickle_really_creates_its_file_when_unpickled(tmp_path):
    """The attack the trust tests guard against is real (so their 'no file' means something)."""
    target = tmp_path / "proof"
    pickle.loads(planted_pickle(target)).close()
    assert target.exists()


def two_checkpoints(pool: KernelPool, *cells: str):
    """Commit one checkpoint per cell, kill the kernel; returns the notebook's store."""
    kernel = pool.start(session=SESSION)
    for cell in cells:
        assert not kernel.execute(cell).error
        wait_saved(kernel)
    kernel.kill()
    notebook = pool.notebook(SESSION)
    assert notebook.checkpoint_ids() == list(range(len(cells), 0, -1))
    return notebook


def blob_of(notebook, generation: int, name: str):
    """The blob file holding a variable's pickle in one generation."""
    var = next(v for v in notebook.read_manifest(generation).variables if v["name"] == name)
    assert "inline" not in var
    return notebook.blobs_dir / var["digest"][:2] / var["digest"]


def assert_fell_back_to_first(kernel, reason: str) -> None:  # for damage to a manifest
    """The previous generation came back, and the user was told why the newest did not."""
    expected = f"durable-kernel: the newest checkpoint could not be used (checkpoint 2{reason}"
    first_cell = kernel.execute("pass")
    assert kernel.value("data") == repr(eval(FIRST))
    assert expected in kernel.banner, kernel.banner
    assert expected in first_cell.stderr, first_cell.stderr
    assert "restored the one before it (checkpoint 1)." in first_cell.stderr


def assert_only_data_lost_and_its_older_copy_offered(kernel, reason: str) -> None:
    """The newest checkpoint came back but for ``data``, whose damage is named, with the
    command that brings back its intact older version from checkpoint 1 (which works)."""
    first_cell = kernel.execute("pass")
    damaged = f"durable-kernel: not restored: data (its saved data is damaged ({reason}))"
    offer = "durable-kernel: an older version of data is intact in checkpoint 1: '%checkpoint restore 1 data' brings it back."
    for told in (kernel.banner, first_cell.stderr):
        assert damaged in told and offer in told, told
    assert "data" not in user_variables(kernel)
    out = kernel.execute("%checkpoint restore 1 data")
    assert not out.error, out.error
    assert kernel.value("data") == repr(eval(FIRST))


def test_truncated_blob_in_newest_checkpoint_costs_only_its_variable(pool):
    notebook = two_checkpoints(pool, f"kept = 'kept'\ndata = {FIRST}", f"data = {SECOND}\nnewer = 2")
    blob = blob_of(notebook, 2, "data")
    os.truncate(blob, blob.stat().st_size // 2)
    kernel = pool.start(session=SESSION)
    assert_only_data_lost_and_its_older_copy_offered(kernel, "variable 'data' does not match its digest")
    assert kernel.value("(kept, newer)") == "('kept', 2)"


def test_truncated_array_buffer_in_newest_checkpoint_costs_only_its_variable(pool):
    notebook = two_checkpoints(
        pool,
        f"import numpy as np\ndata = {FIRST}\nvec = np.ones(100_000)",
        "vec = np.full(100_000, 2.0)\ndata = " + SECOND,
    )
    var = next(v for v in notebook.read_manifest(2).variables if v["name"] == "vec")
    buffer = var["buffers"][-1]  # 800 KB: its last chunk
    path = notebook.blobs_dir / buffer["digest"][:2] / buffer["digest"]
    os.truncate(path, 1000)
    kernel = pool.start(session=SESSION)
    holds(kernel, "'vec' not in dir() and data == " + SECOND)
    assert (
        f"not restored: vec (its saved data is damaged (blob {buffer['digest'][:12]} has 1000 bytes, "
        f"expected {buffer['size']} (truncated?)))" in kernel.banner
    ), kernel.banner
    assert kernel.execute("%checkpoint restore 1 vec").error == ""
    assert kernel.value("float(vec.sum())") == "100000.0"


def test_flipped_bytes_in_newest_manifest_fall_back_to_the_previous_one(pool):
    notebook = two_checkpoints(pool, f"data = {FIRST}", f"data = {SECOND}")
    path = notebook.manifests_dir / "000000000002.manifest"
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4] = bytes(b ^ 0xFF for b in raw[middle : middle + 4])
    path.write_bytes(bytes(raw))
    kernel = pool.start(session=SESSION)
    assert_fell_back_to_first(kernel, " is not signed with this user's key")


def test_manifest_signed_with_another_key_is_never_unpickled(pool, tmp_path):
    from durable_kernel.checkpoints import manifest as manifest_format
    from durable_kernel.checkpoints.blobs import digest

    notebook = two_checkpoints(pool, f"data = {FIRST}", f"data = {SECOND}")
    sentinel = tmp_path / "forged-manifest-ran"
    evil = planted_pickle(sentinel)
    forged = dict(notebook.read_manifest(2).data, generation=3)
    forged["variables"] = [
        {
            "name": "data",
            "type": "builtins.bytes",
            "kind": "pickle",
            "size": len(evil),
            "digest": digest(evil),
            "inline": base64.b64encode(evil).decode(),
        },
    ]
    path = notebook.manifests_dir / "000000000003.manifest"
    path.write_bytes(manifest_format.encode(forged, b"another user's key " * 3))
    path.chmod(0o600)
    kernel = pool.start(session=SESSION)
    assert not sentinel.exists()
    assert kernel.value("data") == repr(eval(SECOND))
    assert "checkpoint 3 is not signed with this user's key" in kernel.banner


def test_planted_pickle_in_a_blob_file_is_never_unpickled(pool, tmp_path):
    notebook = two_checkpoints(pool, f"data = {FIRST}", f"data = {SECOND}")
    sentinel = tmp_path / "planted-blob-ran"
    blob_of(notebook, 2, "data").write_bytes(planted_pickle(sentinel))
    kernel = pool.start(session=SESSION)
    assert not sentinel.exists()
    assert_only_data_lost_and_its_older_copy_offered(kernel, "variable 'data' does not match its digest")
    assert not sentinel.exists()


def test_only_copy_damaged_says_so_and_restores_the_rest(pool):
    notebook = two_checkpoints(pool, f"data = {FIRST}\nother = 1")
    os.truncate(blob_of(notebook, 1, "data"), 10)
    kernel = pool.start(session=SESSION)
    first_cell = kernel.execute("pass")
    assert not first_cell.error
    assert first_cell.stderr.splitlines()[1:] == [
        "durable-kernel: not restored: data (its saved data is damaged (variable 'data' does not match its digest))",
    ]
    assert user_variables(kernel) == ["other"]


def test_nothing_stored_starts_fresh_without_error(pool):
    kernel = pool.start(session=SESSION)
    assert f"durable-kernel: no saved state for {SESSION} yet; variables are saved after every cell." in kernel.banner
    first_cell = kernel.execute("x = 1")
    assert (first_cell.status, first_cell.error, first_cell.stderr) == ("ok", "", "")
    assert user_variables(kernel) == ["x"]


def test_data_computed_again_after_its_blob_was_corrupted_is_saved_again(pool):
    notebook = two_checkpoints(pool, f"data = {FIRST}")
    blob = blob_of(notebook, 1, "data")
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 0xFF  # one flipped bit on disk, same size
    blob.write_bytes(bytes(raw))
    kernel = pool.start(session=SESSION)
    assert "not restored: data (its saved data is damaged" in kernel.banner
    assert not kernel.execute(f"data = {FIRST}").error  # the user runs the notebook again
    wait_saved(kernel)
    kernel.kill()
    assert pool.start(session=SESSION).value("data") == repr(eval(FIRST))
