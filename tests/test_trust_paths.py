"""Nothing lost, nothing trusted blindly (issue 9): a changed key, a missing module, one bad
byte, a full disk at the first start, undecodable names, copied or renamed checkpoints, other
users' files, secrets in cell text, and the small ones.

Each test drives real kernels (jupyter_client) or the real ``durable-kernel`` command over a
store the test damages the way a user, a disk or another user would.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import holds, user_variables, wait_saved
from durable_kernel.checkpoints import load_or_create_key, location
from durable_kernel.checkpoints import manifest as manifest_format
from durable_kernel.checkpoints.location import open_store
from reliability_support import mounted_tmpfs, report

SESSION = "trust.ipynb"
OTHER_UID = 65534  # nobody


def key_path(jupyter_dirs) -> Path:
    return location.key_path(jupyter_dirs)


def the_store(jupyter_dirs):
    return open_store(environ=jupyter_dirs)


def cli(jupyter_dirs, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "durable_kernel", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **jupyter_dirs},
        timeout=timeout,
    )


def saved_and_killed(start_kernel, code: str, session: str = SESSION, **kwargs) -> None:
    """A kernel runs ``code``, its checkpoint is committed, and it is killed with SIGKILL."""
    kernel = start_kernel(session=session, **kwargs)
    out = kernel.execute(code)
    assert not out.error, out.error
    wait_saved(kernel)
    kernel.kill()


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make files owned by another user")


# --- 3. retention never deletes what it cannot verify ------------------------------------------------


def test_checkpoints_signed_with_a_key_that_is_gone_survive_retention_until_the_key_is_back(
    start_kernel, jupyter_dirs, capsys
):
    saved_and_killed(start_kernel, "precious = 'hours of work'")
    key = key_path(jupyter_dirs)
    key.rename(key.with_name("key-aside"))  # a changed or lost key
    kernel = start_kernel(session=SESSION)
    assert "not signed with this user's key" in kernel.banner, kernel.banner
    for i in range(7):  # more cells than keep_generations
        assert not kernel.execute(f"v = {i}").error
        wait_saved(kernel)
    kernel.kill()
    key.with_name("key-aside").replace(key)  # the right key is back
    assert start_kernel(session=SESSION).value("precious") == "'hours of work'"
    report("key changed, 7 cells, key back", capsys, rounds=1, lost=0, untrusted_code_ran=0)


MODULE = "class Thing:\n    def __init__(self, value):\n        self.value = value\n"


def test_a_variable_whose_module_is_missing_is_kept_until_the_module_is_back(start_kernel, tmp_path, capsys):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "labmodule.py").write_text(MODULE)
    with_module = {"PYTHONPATH": str(modules)}
    kernel = start_kernel(session=SESSION, env=with_module)
    assert not kernel.execute("import labmodule\ndf = labmodule.Thing(42)\nkeep = 1").error
    wait_saved(kernel)
    kernel.kill()

    without = start_kernel(session=SESSION, env={"PYTHONPATH": ""})
    first = without.execute("x = 0")
    assert "not restored: " in first.stderr and "df (ModuleNotFoundError: No module named 'labmodule')" in first.stderr
    assert "install labmodule and restart the kernel" in first.stderr, first.stderr
    assert "Install labmodule and restart the kernel" in without.value("repr(df)")
    for i in range(7):
        assert not without.execute(f"x = {i + 1}").error
        wait_saved(without)
    without.kill()

    back = start_kernel(session=SESSION, env=with_module)
    holds(back, "df.value == 42 and type(df).__name__ == 'Thing' and keep == 1 and x == 7")
    report("module missing at restore, 7 cells, module back", capsys, rounds=1, lost=0, untrusted_code_ran=0)


def test_a_kept_variable_that_is_reassigned_is_saved_as_its_new_value(start_kernel, tmp_path):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "labmodule.py").write_text(MODULE)
    kernel = start_kernel(session=SESSION, env={"PYTHONPATH": str(modules)})
    assert not kernel.execute("import labmodule\ndf = labmodule.Thing(42)").error
    wait_saved(kernel)
    kernel.kill()
    without = start_kernel(session=SESSION, env={"PYTHONPATH": ""})
    assert not without.execute("df = 'replaced'\ndel labmodule").error
    wait_saved(without)
    without.kill()
    assert start_kernel(session=SESSION, env={"PYTHONPATH": ""}).value("df") == "'replaced'"


# --- 4. one bad byte ------------------------------------------------------------------------------


def test_one_flipped_byte_in_a_reused_blob_is_repaired_and_costs_nothing(start_kernel, jupyter_dirs, capsys):
    # Arrays not backed by their chunk files: memory is then the good copy the blob is written again from
    # (with map_arrays, a file written in place changes the array too: test_chunked_checkpoints.py).
    start = functools.partial(start_kernel, extra_arguments=["--DurableKernel.map_arrays=False"])
    kernel = start(session=SESSION)
    cell = "import numpy as np\nbig = np.random.default_rng(1).random(1 << 20)\n" + "\n".join(
        f"v{i} = {i}" for i in range(25)
    )
    assert not kernel.execute(cell).error  # 27 variables, one of them 8 MiB
    wait_saved(kernel)
    nb = the_store(jupyter_dirs).notebook(SESSION)
    var = next(v for v in nb.read_manifest(nb.checkpoint_ids()[0]).variables if v["name"] == "big")
    blob = nb.blob_path(var["buffers"][8]["digest"])  # the 512 KiB chunk at 4 MiB
    with open(blob, "r+b") as f:  # one byte, same size, in place
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    told = []
    for i in range(6):  # later cells keep `big` as it is: its blob is reused
        out = kernel.execute(f"n = {i}")
        wait_saved(kernel)
        told.append(out.stderr)
    told.append(kernel.execute("pass").stderr)
    repaired = [t for t in told if "the saved copy of big was damaged on disk; it has been saved again" in t]
    assert len(repaired) == 1, told
    kernel.kill()
    again = start(session=SESSION)
    assert len(user_variables(again)) == 28  # np, big, v0..v24, n
    holds(again, "np.array_equal(big, np.random.default_rng(1).random(1 << 20))")
    report(
        "one flipped byte in a reused 8 MiB blob, 6 cells, kill -9",
        capsys,
        rounds=1,
        lost=0,
        untrusted_code_ran=0,
        told=len(repaired),
    )


# --- 5. the kernel always starts --------------------------------------------------------------------


def test_an_empty_key_file_left_by_a_full_disk_does_not_stop_later_starts(start_kernel, jupyter_dirs):
    key = key_path(jupyter_dirs)
    key.parent.mkdir(parents=True)
    key.touch(mode=0o600)  # what a full disk at the very first start left behind
    saved_and_killed(start_kernel, "x = 1")
    assert start_kernel(session=SESSION).value("x") == "1"
    assert cli(jupyter_dirs, "list").returncode == 0


def test_a_full_disk_at_the_first_start_leaves_no_broken_key(start_kernel, tmp_path, jupyter_dirs, capsys):
    with mounted_tmpfs(tmp_path / "data-disk", "1m") as disk:
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # the disk is full
        finally:
            os.close(fd)
        env = {"JUPYTER_DATA_DIR": str(disk / "jupyter")}
        os.makedirs(disk / "jupyter", exist_ok=True)
        kernel = start_kernel(session=SESSION, env=env)
        assert "checkpoints are off for this kernel: cannot create the signing key" in kernel.banner, kernel.banner
        assert "No space left on device" in kernel.banner
        assert not kernel.execute("x = 1").error  # the kernel works, without checkpoints
        kernel.kill()
        filler.unlink()  # space freed
        kernel = start_kernel(session=SESSION, env=env)
        assert not kernel.execute("x = 2").error
        wait_saved(kernel)
        kernel.kill()
        assert start_kernel(session=SESSION, env=env).value("x") == "2"
    report("full disk at the first start", capsys, rounds=1, lost=0, untrusted_code_ran=0, kernel_started=True)


@pytest.mark.parametrize("problem", ["data dir cannot be created", "key path is a folder"])
def test_the_kernel_starts_without_checkpoints_and_says_how_to_fix_it(problem, start_kernel, tmp_path, jupyter_dirs):
    if problem == "data dir cannot be created":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        env = {"JUPYTER_DATA_DIR": str(blocker / "jupyter")}
        fix = "point JUPYTER_DATA_DIR at a writable folder"
    else:
        key_path(jupyter_dirs).mkdir(parents=True)
        env = {}
        fix = "remove or fix it"
    kernel = start_kernel(session=SESSION, env=env)
    assert "checkpoints are off for this kernel" in kernel.banner and fix in kernel.banner, kernel.banner
    assert kernel.execute("1 + 1").result == "2"
    status = kernel.execute("%checkpoint")
    assert "checkpoints are off for this kernel" in status.stderr


# --- 9. names that are not UTF-8 --------------------------------------------------------------------


def test_a_session_name_that_is_not_utf8_saves_and_restores(start_kernel):
    name = os.fsdecode(b"caf\xe9.ipynb")  # byte 0xE9 in JPY_SESSION_NAME, as a Latin-1 system gives it
    kernel = start_kernel(session=None, env={"JPY_SESSION_NAME": name})
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    assert "checkpoint not saved" not in kernel.execute("pass").stderr
    kernel.kill()
    again = start_kernel(session=None, env={"JPY_SESSION_NAME": name})
    assert again.value("x") == "1"
    assert "caf\\udce9.ipynb" in again.banner


def test_a_working_folder_that_is_not_utf8_saves_and_restores(start_kernel, tmp_path):
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")
    os.mkdir(folder)
    kernel = start_kernel(session=None, cwd=folder)
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    kernel.kill()
    assert start_kernel(session=None, cwd=folder).value("x") == "1"


# --- 13. what the signature binds -------------------------------------------------------------------


def test_another_notebooks_checkpoint_copied_in_is_refused(start_kernel, jupyter_dirs, capsys):
    for session, cells in (("a.ipynb", ["owner = 'a'", "owner = 'a, later'"]), ("b.ipynb", ["owner = 'b'"])):
        kernel = start_kernel(session=session)
        for cell in cells:
            assert not kernel.execute(cell).error
            wait_saved(kernel)
        kernel.kill()
    store = the_store(jupyter_dirs)
    a, b = store.notebook("a.ipynb"), store.notebook("b.ipynb")
    shutil.copy(a.manifest_path(2), b.manifest_path(2))  # a's checkpoint 2 as b's newest
    kernel = start_kernel(session="b.ipynb")
    assert kernel.value("owner") == "'b'"
    assert "belongs to another notebook (a.ipynb) and was copied here" in kernel.banner, kernel.banner
    report("another notebook's checkpoint copied in", capsys, inputs=1, lost=0, untrusted_code_ran=0, loaded=False)


def test_an_older_checkpoint_renamed_as_the_newest_is_refused(start_kernel, jupyter_dirs, capsys):
    kernel = start_kernel(session=SESSION)
    for value in ("'old'", "'new'"):
        assert not kernel.execute(f"state = {value}").error
        wait_saved(kernel)
    kernel.kill()
    nb = the_store(jupyter_dirs).notebook(SESSION)
    shutil.copy(nb.manifest_path(1), nb.manifest_path(3))  # a rollback attempt
    kernel = start_kernel(session=SESSION)
    assert kernel.value("state") == "'new'"
    assert "checkpoint 3 says it is checkpoint 1" in kernel.banner, kernel.banner
    report("older checkpoint renamed as the newest", capsys, inputs=1, lost=0, untrusted_code_ran=0, loaded=False)


# --- 14. other users' files ------------------------------------------------------------------------


def test_a_store_folder_owned_by_another_user_is_refused(start_kernel, jupyter_dirs):
    needs_root()
    saved_and_killed(start_kernel, "x = 1")
    root = Path(jupyter_dirs["DURABLE_KERNEL_DIR"])
    os.chown(root, OTHER_UID, OTHER_UID)
    os.chmod(root, 0o755)
    kernel = start_kernel(session=SESSION)
    assert f"{root} belongs to another user (uid {OTHER_UID})" in kernel.banner, kernel.banner
    assert "x" not in user_variables(kernel)


def test_a_blobs_folder_others_can_write_is_refused(start_kernel, jupyter_dirs):
    saved_and_killed(start_kernel, "x = 1")
    blobs = the_store(jupyter_dirs).notebook(SESSION).blobs_dir
    os.chmod(blobs, 0o777)
    kernel = start_kernel(session=SESSION)
    assert f"{blobs} can be written by other users" in kernel.banner and f"chmod go-w {blobs}" in kernel.banner


def test_a_store_others_can_write_is_refused_at_start_even_with_nothing_saved_yet(start_kernel, jupyter_dirs):
    root = Path(jupyter_dirs["DURABLE_KERNEL_DIR"])
    root.mkdir()
    os.chmod(root, 0o777)  # a shared folder, such as a /tmp of one's own making
    kernel = start_kernel(session=SESSION)
    assert f"did not restore: {root} can be written by other users" in kernel.banner, kernel.banner
    assert f"chmod go-w {root}" in kernel.banner


def test_a_blob_another_user_planted_is_never_mapped_nor_reused(start_kernel, jupyter_dirs, capsys):
    needs_root()
    saved_and_killed(start_kernel, "import numpy as np\narr = np.zeros(1 << 17)")
    nb = the_store(jupyter_dirs).notebook(SESSION)
    var = next(v for v in nb.read_manifest(nb.checkpoint_ids()[0]).variables if v["name"] == "arr")
    blob = nb.blob_path(var["buffers"][0]["digest"])
    os.chown(blob, OTHER_UID, OTHER_UID)  # the right bytes, but theirs: they could rewrite it at any time
    kernel = start_kernel(session=SESSION)
    assert (
        f"not restored: arr (its saved data is damaged (blob {blob.name[:12]} belongs to another user" in kernel.banner
    ), kernel.banner
    assert not kernel.execute("arr = np.zeros(1 << 17)").error  # the user computes it again
    wait_saved(kernel)
    assert blob.stat().st_uid == os.geteuid()  # the store's copy is the user's own again
    report("blob planted by another user", capsys, inputs=1, lost=0, untrusted_code_ran=0, mapped=False)


def test_bytes_substituted_in_a_blob_are_not_loaded_nor_signed_again_without_verify_on_restore(
    start_kernel, jupyter_dirs, capsys
):
    saved_and_killed(start_kernel, "import numpy as np\narr = np.zeros(1 << 17)")
    nb = the_store(jupyter_dirs).notebook(SESSION)
    var = next(v for v in nb.read_manifest(nb.checkpoint_ids()[0]).variables if v["name"] == "arr")
    blob = nb.blob_path(var["buffers"][0]["digest"])
    with open(blob, "r+b") as f:
        f.write(b"\x01" * 8)  # same size, other bytes
    no_verify = {"extra_arguments": ["--DurableKernel.verify_on_restore=False"]}
    kernel = start_kernel(session=SESSION, **no_verify)
    assert "not restored: arr (its saved data is damaged" in kernel.banner, kernel.banner
    assert not kernel.execute("y = 1").error
    wait_saved(kernel)
    newest = nb.read_manifest(nb.checkpoint_ids()[0])
    assert "arr" not in {v["name"] for v in newest.variables}
    report(
        "substituted bytes with verify_on_restore=False",
        capsys,
        inputs=1,
        lost=0,
        untrusted_code_ran=0,
        loaded=False,
        signed_again=False,
    )


# --- 15. secrets ------------------------------------------------------------------------------------


def test_an_excluded_variable_never_reaches_the_store_through_the_cell_text(start_kernel, jupyter_dirs):
    kernel = start_kernel(session=SESSION)
    kernel.execute("%checkpoint exclude password")
    assert not kernel.execute("password = 'hunter2'  # my secret\nuser = 'me'").error
    wait_saved(kernel)
    nb = the_store(jupyter_dirs).notebook(SESSION)
    for path in nb.dir.rglob("*"):
        if path.is_file():
            assert b"hunter2" not in path.read_bytes(), path
    shown = cli(jupyter_dirs, "show", SESSION)
    assert shown.returncode == 0 and "hunter2" not in shown.stdout
    assert "(cell text not saved: it names an excluded variable)" in shown.stdout


# --- 16. the small ones -----------------------------------------------------------------------------


def test_a_file_named_with_a_unicode_digit_among_manifests_is_ignored(start_kernel, jupyter_dirs):
    saved_and_killed(start_kernel, "x = 1")
    nb = the_store(jupyter_dirs).notebook(SESSION)
    (nb.manifests_dir / "\u00b2.manifest").write_bytes(b"x")
    kernel = start_kernel(session=SESSION)
    assert kernel.value("x") == "1" and "unexpectedly" not in kernel.banner
    assert not kernel.execute("x = 2").error
    wait_saved(kernel)
    assert "checkpoint not saved" not in kernel.execute("pass").stderr
    for command in ("list", "gc", "du"):
        assert cli(jupyter_dirs, command).returncode == 0, command


@pytest.mark.parametrize("created", [1e300, -1e18, math.nan])
def test_a_signed_checkpoint_with_an_impossible_time_does_not_stop_the_kernel(created, start_kernel, jupyter_dirs):
    saved_and_killed(start_kernel, "x = 1")
    nb = the_store(jupyter_dirs).notebook(SESSION)
    data = json.loads(manifest_format.body_of(nb.manifest_path(1).read_bytes()))
    data.update(generation=2, created=created)
    nb.manifest_path(2).write_bytes(manifest_format.encode(data, nb.store.key))
    os.chmod(nb.manifest_path(2), 0o600)
    kernel = start_kernel(session=SESSION)
    assert kernel.value("x") == "1"
    assert "'created' is not a plausible time" in kernel.banner, kernel.banner
    assert cli(jupyter_dirs, "list").returncode == 0


def test_a_notebook_name_with_escape_codes_is_shown_escaped(start_kernel, jupyter_dirs):
    name = "evil\x1b[2J\nname.ipynb"
    kernel = start_kernel(session=name)
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    kernel.kill()
    again = start_kernel(session=name)
    assert "evil\\x1b[2J\\nname.ipynb" in again.banner and "\x1b" not in again.banner, again.banner
    listed = cli(jupyter_dirs, "list")
    assert "\x1b" not in listed.stdout and "evil\\x1b[2J\\nname.ipynb" in listed.stdout


def test_under_umask_0_every_folder_the_kernel_creates_is_private(start_kernel, tmp_path):
    store = tmp_path / "deep" / "er" / "store"
    data = tmp_path / "fresh" / "jupyter"
    kernel = start_kernel(
        session=SESSION,
        env={"DURABLE_KERNEL_DIR": str(store), "JUPYTER_DATA_DIR": str(data)},
        preexec_fn=lambda: os.umask(0),
    )
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    created = [tmp_path / "deep", tmp_path / "deep" / "er", store, tmp_path / "fresh", data]
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in created}
    assert set(modes.values()) == {"0o700"}, modes


def test_a_key_readable_by_others_is_made_private_and_the_user_told(start_kernel, jupyter_dirs):
    key = key_path(jupyter_dirs)
    load_or_create_key(key)
    os.chmod(key, 0o644)
    kernel = start_kernel(session=SESSION)
    told = kernel.execute("x = 1").stderr
    assert "was readable by other users (mode 644); it is private (0600) now" in told, told
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_gc_while_notebooks_are_cleared_never_fails(jupyter_dirs, capsys):
    """``durable-kernel clear --all`` deleting folders while ``gc`` waits for their locks and walks them."""
    import numpy as np
    from durable_kernel.checkpoints import snapshot

    store = the_store(jupyter_dirs)
    failures = []
    rounds = 12
    for round_ in range(rounds):
        for i in range(3):  # many blob folders: deleting them takes a while
            arrays = {f"a{j}": np.full(10_000, float(j + 1000 * round_)) for j in range(400)}
            store.notebook(f"n{i}.ipynb").commit(snapshot(arrays), execution_count=1)
        clear = subprocess.Popen(
            [sys.executable, "-m", "durable_kernel", "clear", "--all"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **jupyter_dirs},
        )
        time.sleep(0.02 * round_)
        gc = cli(jupyter_dirs, "gc")
        _, clear_err = clear.communicate(timeout=60)
        if gc.returncode != 0 or clear.returncode != 0:
            failures.append((gc.returncode, gc.stderr.strip(), clear_err.strip()))
    assert failures == []
    report("gc while clear --all runs", capsys, rounds=rounds, failed=len(failures))


@pytest.mark.parametrize("command", ["gc", "du", "list"])
def test_a_fifo_planted_as_a_manifest_does_not_hang_the_terminal_commands(command, start_kernel, jupyter_dirs):
    saved_and_killed(start_kernel, "x = 1")
    nb = the_store(jupyter_dirs).notebook(SESSION)
    os.mkfifo(nb.manifest_path(7), 0o600)
    done = cli(jupyter_dirs, command, timeout=60)
    assert done.returncode == 0, done.stderr
