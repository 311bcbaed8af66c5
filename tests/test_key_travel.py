"""The key travels, safely (issue 13, item 3): the key that signs checkpoints can come from
``$DURABLE_KERNEL_KEY`` or ``c.DurableKernel.key_file``, moves with ``durable-kernel key export``
and ``key import``, and a checkpoint signed with another key says which key and how to bring it.

Kernel behaviour is checked through real kernels (jupyter_client); the command through
``python -m durable_kernel`` in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_saved
from durable_kernel.checkpoints import UntrustedCheckpoint, location, signing
from durable_kernel.checkpoints import manifest as manifest_format
from durable_kernel.checkpoints.location import open_store

SESSION = "travel.ipynb"
OTHER_KEY = "0123456789abcdef" * 4


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``durable-kernel ARGS`` with ``env`` over this process's environment (no DURABLE_KERNEL_KEY unless given)."""
    full = {k: v for k, v in os.environ.items() if k != "DURABLE_KERNEL_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "durable_kernel", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**full, **env},
        timeout=60,
    )


def saved_under_key_a(start_kernel, jupyter_dirs) -> str:
    """A kernel (data dir 1, its own new key A) saves ``result`` and is killed; returns key A."""
    kernel = start_kernel(session=SESSION)
    assert not kernel.execute("result = 'computed under key A'").error
    wait_saved(kernel)
    kernel.kill()
    return location.key_path(jupyter_dirs).read_text().strip()


def newest_manifest(jupyter_dirs, key_file: Path | None = None, session: str = SESSION) -> dict:
    """The newest manifest's JSON as written (unverified: the test checks what is on disk)."""
    nb = open_store(environ=jupyter_dirs, key_file=key_file, create_key=False).notebook(session)
    raw = nb.manifest_path(nb.checkpoint_ids()[0]).read_bytes()
    return json.loads(manifest_format.body_of(raw))


# --- DURABLE_KERNEL_KEY -----------------------------------------------------------------------------------------


def test_state_saved_under_a_key_restores_in_a_kernel_with_an_empty_data_dir_when_DURABLE_KERNEL_KEY_holds_it(
    start_kernel, jupyter_dirs, tmp_path
):
    key_a = saved_under_key_a(start_kernel, jupyter_dirs)
    elsewhere = {"JUPYTER_DATA_DIR": str(tmp_path / "data-dir-2"), "DURABLE_KERNEL_KEY": f"  {key_a}\n"}
    kernel = start_kernel(session=SESSION, env=elsewhere)
    assert kernel.value("result") == "'computed under key A'", kernel.banner


def test_a_checkpoint_signed_with_another_key_is_not_loaded_and_the_notice_names_both_key_ids_and_the_commands(
    start_kernel, jupyter_dirs, tmp_path
):
    key_a = saved_under_key_a(start_kernel, jupyter_dirs)
    elsewhere = {"JUPYTER_DATA_DIR": str(tmp_path / "data-dir-2"), "DURABLE_KERNEL_KEY": OTHER_KEY}
    kernel = start_kernel(session=SESSION, env=elsewhere)
    first = kernel.execute("print('result' in globals())")
    assert first.stdout.strip() == "False"
    id_a, id_other = signing.key_id(key_a.encode()), signing.key_id(OTHER_KEY.encode())
    for told in (kernel.banner, first.stderr):
        assert f"key {id_a}; the key here is {id_other}" in told, told
        assert "'durable-kernel key export'" in told and "'durable-kernel key import'" in told, told
        assert "DURABLE_KERNEL_KEY" in told and "it was not loaded" in told, told
        assert "Traceback" not in told, told


def test_DURABLE_KERNEL_KEY_is_never_written_to_disk(start_kernel, jupyter_dirs, tmp_path):
    secret = "f" * 20 + "e" * 44  # easy to search for
    kernel = start_kernel(session=SESSION, env={"DURABLE_KERNEL_KEY": secret})
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    kernel.kill()
    assert not location.key_path(jupyter_dirs).exists(), "a key file was created in the data dir"
    holding = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert holding == [], f"the key from the environment was written to {holding}"


def test_an_empty_DURABLE_KERNEL_KEY_turns_checkpoints_off_and_says_what_to_do(start_kernel, jupyter_dirs):
    kernel = start_kernel(session=SESSION, env={"DURABLE_KERNEL_KEY": " "})
    banner = kernel.banner
    assert "checkpoints are off for this kernel: $DURABLE_KERNEL_KEY is empty" in banner, banner
    assert "'durable-kernel key export'" in banner and "unset it" in banner, banner
    assert not location.key_path(jupyter_dirs).exists()


def test_a_too_short_DURABLE_KERNEL_KEY_is_refused_by_the_command_with_a_clear_message(jupyter_dirs):
    done = cli({**jupyter_dirs, "DURABLE_KERNEL_KEY": "tooshort"}, "key", "id")
    assert done.returncode == 1
    assert "$DURABLE_KERNEL_KEY is 8 characters long, which is not a signing key" in done.stderr, done.stderr
    assert "tooshort" not in done.stderr  # a key, even a wrong one, is never printed in a message


# --- the manifest's key_id ----------------------------------------------------------------------------------------


def test_each_new_manifest_records_the_id_of_the_key_that_signed_it(start_kernel, jupyter_dirs):
    key_a = saved_under_key_a(start_kernel, jupyter_dirs)
    assert newest_manifest(jupyter_dirs)["key_id"] == signing.key_id(key_a.encode())
    shown = cli(jupyter_dirs, "key", "id")
    assert shown.returncode == 0 and shown.stdout.strip() == signing.key_id(key_a.encode()), shown


def test_a_manifest_whose_unverified_key_id_is_malformed_gets_the_plain_message_without_it():
    body = json.dumps({"schema": 2, "key_id": "\x1b[31mevil"}).encode()
    raw = manifest_format.MAGIC + signing.sign(OTHER_KEY.encode(), body).encode() + b"\n" + body
    with pytest.raises(UntrustedCheckpoint) as caught:
        manifest_format.decode(raw, b"k" * 64, "checkpoint 1")
    message = str(caught.value)
    assert "evil" not in message and "copied from elsewhere" in message, message


# --- durable-kernel key export | key import -------------------------------------------------------------------


def two_data_dirs(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Data dir 1 with a key (as a kernel's first start makes it), data dir 2 empty."""
    one = {"JUPYTER_DATA_DIR": str(tmp_path / "one"), "DURABLE_KERNEL_DIR": str(tmp_path / "store")}
    two = {"JUPYTER_DATA_DIR": str(tmp_path / "two"), "DURABLE_KERNEL_DIR": str(tmp_path / "store")}
    open_store(environ=one)
    return one, two


def test_key_export_piped_into_key_import_moves_the_key_between_two_data_dirs(tmp_path):
    one, two = two_data_dirs(tmp_path)
    exported = cli(one, "key", "export")
    assert exported.returncode == 0, exported.stderr
    imported = cli(two, "key", "import", stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    moved = location.key_path(two)
    assert moved.read_bytes() == location.key_path(one).read_bytes()
    assert stat.S_IMODE(moved.stat().st_mode) == 0o600
    assert cli(one, "key", "id").stdout == cli(two, "key", "id").stdout


def test_key_export_output_writes_a_private_file_that_key_import_reads(tmp_path):
    one, two = two_data_dirs(tmp_path)
    carried = tmp_path / "usb" / "durable-key"
    done = cli(one, "key", "export", "--output", str(carried))
    assert done.returncode == 0 and done.stdout == "", done
    assert stat.S_IMODE(carried.stat().st_mode) == 0o600
    assert cli(two, "key", "import", str(carried)).returncode == 0
    assert location.key_path(two).read_bytes() == location.key_path(one).read_bytes()


def test_key_import_refuses_to_replace_a_different_key_without_force(tmp_path):
    one, two = two_data_dirs(tmp_path)
    open_store(environ=two)  # data dir 2 has a key of its own
    theirs = location.key_path(two).read_bytes()
    exported = cli(one, "key", "export").stdout
    refused = cli(two, "key", "import", stdin=exported)
    assert refused.returncode == 1
    assert "holds another key" in refused.stderr and "no longer load" in refused.stderr, refused.stderr
    assert "--force" in refused.stderr
    assert location.key_path(two).read_bytes() == theirs
    forced = cli(two, "key", "import", "--force", stdin=exported)
    assert forced.returncode == 0, forced.stderr
    assert location.key_path(two).read_bytes() == location.key_path(one).read_bytes()


def test_key_import_refuses_what_is_not_a_key(tmp_path):
    _, two = two_data_dirs(tmp_path)
    done = cli(two, "key", "import", stdin="\n")
    assert done.returncode == 1 and "is empty, which is not a signing key" in done.stderr, done.stderr
    assert not location.key_path(two).exists()


# --- c.DurableKernel.key_file ---------------------------------------------------------------------------------


def test_key_file_in_a_jupyter_config_file_is_the_key_a_kernel_creates_and_signs_with(pool):
    key_file = pool.base / "secrets" / "team-key"
    config = pool.base / "jupyter-config" / "ipython_kernel_config.py"
    config.parent.mkdir(parents=True)
    config.write_text(f"c.DurableKernel.key_file = {str(key_file)!r}\n")
    env = {"JUPYTER_CONFIG_DIR": str(config.parent), "IPYTHONDIR": str(pool.base / "ipython")}
    kernel = pool.start(session=SESSION, env={**env, "JUPYTER_CONFIG_PATH": None})
    assert not kernel.execute("result = 42").error
    wait_saved(kernel)
    kernel.kill()

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not location.key_path(pool.dirs).exists(), "the default key file was used"
    key = key_file.read_bytes().strip()
    assert newest_manifest(pool.dirs, key_file=key_file)["key_id"] == signing.key_id(key)
    restarted = pool.start(session=SESSION, env={**env, "JUPYTER_CONFIG_PATH": None})
    assert restarted.value("result") == "42", restarted.banner


def test_a_key_file_that_does_not_exist_is_reported_by_the_command(tmp_path):
    one, _ = two_data_dirs(tmp_path)
    missing = tmp_path / "no-such-key"
    done = cli(one, "list", "--key-file", str(missing))
    assert f"the key file {missing} does not exist" in done.stderr, done.stderr
    assert not missing.exists()
