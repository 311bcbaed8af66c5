"""Nothing lost on the paths users take every day (issue 9): restart right after a cell whose
checkpoint takes long, renaming and moving notebooks, a cell finishing while the previous
checkpoint is still written, and '%checkpoint clear'.

Through real kernels started by jupyter_client with its default settings, and for renames
through a real jupyter_server (its contents and sessions API, as JupyterLab calls it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import holds, user_variables, wait_saved
from durable_kernel.checkpoints.location import open_store
from reliability_support import report
from server_support import JupyterServer

#: A value whose checkpoint takes longer than jupyter_client waits for a kernel to exit
#: (``shutdown_wait_time``, 5 s: SIGTERM to the process group at 2.5 s, SIGKILL at 5 s).
SLOW_TO_SAVE = (
    "import time\n"
    "class SlowToSave:\n"
    "    def __reduce__(self):\n"
    "        time.sleep({seconds})\n"
    "        return (str, ('{text}',))\n"
)


def slow_cell(name: str, text: str, seconds: float = 8) -> str:
    return SLOW_TO_SAVE.format(seconds=seconds, text=text) + f"{name} = SlowToSave()"


# --- 1. restart and shutdown right after a cell ----------------------------------------------


def test_restart_with_the_clients_defaults_keeps_a_cell_whose_checkpoint_outlasts_the_client_wait(start_kernel, capsys):
    kernel = start_kernel(session="restart-slow.ipynb")
    assert kernel.km.shutdown_wait_time == 5.0  # jupyter_client's default: nothing tuned here
    assert not kernel.execute(slow_cell("last", "the last cell")).error
    started = time.monotonic()
    kernel.restart()  # what JupyterLab's Kernel -> Restart does
    assert kernel.value("last") == "'the last cell'"
    assert "waited" in kernel.banner and "for the previous kernel's last checkpoint" in kernel.banner, kernel.banner
    report(
        "restart after a slow checkpoint (restart_kernel, defaults)",
        capsys,
        rounds=1,
        lost=0,
        untrusted_code_ran=0,
        seconds=round(time.monotonic() - started, 1),
    )


def test_shutdown_with_the_clients_defaults_keeps_a_cell_whose_checkpoint_outlasts_the_client_wait(
    start_kernel, capsys
):
    kernel = start_kernel(session="shutdown-slow.ipynb")
    assert not kernel.execute(slow_cell("last", "the last cell")).error
    kernel.shutdown()  # km.shutdown_kernel(now=False), as closing a notebook does
    again = start_kernel(session="shutdown-slow.ipynb")
    assert again.value("last") == "'the last cell'"
    report(
        "shutdown after a slow checkpoint (shutdown_kernel, defaults)", capsys, rounds=1, lost=0, untrusted_code_ran=0
    )


def test_a_restarted_kernel_can_bind_its_ports_while_the_old_checkpoint_is_still_written(start_kernel):
    """The checkpoint child outlives its kernel: it must not hold the kernel's sockets."""
    kernel = start_kernel(session="ports.ipynb")
    assert not kernel.execute(slow_cell("last", "x", seconds=10)).error
    kernel.restart()
    assert kernel.execute("1 + 1").result == "2"


# --- 10. a cell that ends while the previous checkpoint is written ------------------------------


def test_a_cell_finished_during_a_checkpoint_is_saved_before_the_next_long_cell_ends(start_kernel, capsys):
    kernel = start_kernel(session="queued.ipynb")
    assert not kernel.execute(slow_cell("a", "cell A", seconds=3)).error  # its checkpoint takes 3 s
    assert not kernel.execute("b = 'cell B'").error  # ends while A's checkpoint is written
    kernel.kc.execute("import time\ntime.sleep(60)\nc = 'cell C'")  # a long cell starts
    time.sleep(8)  # well after A's checkpoint, in the middle of C
    os.kill(kernel.pid, signal.SIGKILL)
    kernel.km.provisioner.process.wait(timeout=30)
    again = start_kernel(session="queued.ipynb")
    assert again.value("(a, b)") == "('cell A', 'cell B')"
    assert "c" not in user_variables(again)
    report(
        "cell ended during a checkpoint, kill during the next long cell", capsys, rounds=1, lost=0, untrusted_code_ran=0
    )


# --- 12. %checkpoint clear ------------------------------------------------------------------------


def test_after_checkpoint_clear_a_restart_starts_empty(start_kernel):
    kernel = start_kernel(session="clear.ipynb")
    assert not kernel.execute("old = 1").error
    wait_saved(kernel)
    out = kernel.execute("%checkpoint clear")
    assert "A restart now starts with an empty namespace" in out.stdout
    wait_saved(kernel)
    kernel.kill()
    assert user_variables(start_kernel(session="clear.ipynb")) == []


def test_after_checkpoint_clear_new_and_reassigned_variables_are_saved(start_kernel):
    kernel = start_kernel(session="clear-new.ipynb")
    assert not kernel.execute("old = 1\nkept = 'before'").error
    kernel.execute("%checkpoint clear")
    assert not kernel.execute("new = 2\nkept = 'after'").error
    wait_saved(kernel)
    kernel.kill()
    assert user_variables(start_kernel(session="clear-new.ipynb")) == ["kept", "new"]


def _saving(nb) -> None:
    """Wait until a checkpoint process of ``nb`` runs (it holds the notebook's saving file)."""
    deadline = time.monotonic() + 30
    while nb.wait_for_savers(0) is not False:
        assert time.monotonic() < deadline, "no checkpoint process started"
        time.sleep(0.05)


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "durable_kernel", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_durable_kernel_clear_waits_for_a_checkpoint_still_being_written(start_kernel, tmp_path, jupyter_dirs):
    identity = str(tmp_path / "clear-while-saving.ipynb")
    kernel = start_kernel(session=identity)
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    assert not kernel.execute(slow_cell("late", "saved while clear ran", seconds=4)).error
    nb = open_store(environ=jupyter_dirs).notebook(identity)
    _saving(nb)
    done = _cli(jupyter_dirs, "clear", identity)
    assert done.returncode == 0, done.stderr
    wait_saved(kernel)
    assert nb.checkpoint_ids() == []  # not the late checkpoint, committed right after the clear
    kernel.kill()
    assert user_variables(start_kernel(session=identity)) == []


def test_durable_kernel_mv_waits_for_a_checkpoint_still_being_written(start_kernel, tmp_path, jupyter_dirs):
    old, new = str(tmp_path / "a.ipynb"), str(tmp_path / "b.ipynb")
    kernel = start_kernel(session=old)
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    assert not kernel.execute(slow_cell("late", "saved while mv ran", seconds=4)).error
    store = open_store(environ=jupyter_dirs)
    _saving(store.notebook(old))
    done = _cli(jupyter_dirs, "mv", old, new)
    assert done.returncode == 0, done.stderr
    wait_saved(kernel)
    kernel.kill()
    assert store.notebook(old).checkpoint_ids() == []  # nothing committed under the old name after the move
    assert start_kernel(session=new).value("(x, late)") == "(1, 'saved while mv ran')"


# --- 2. renamed and moved notebooks -------------------------------------------------------------


@pytest.fixture
def server(tmp_path, jupyter_dirs):
    root = tmp_path / "server-root"
    root.mkdir()
    env = {**os.environ, **jupyter_dirs, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    env.pop("DURABLE_KERNEL_SESSION", None)
    env.pop("JPY_SESSION_NAME", None)
    srv = JupyterServer(root, env, tmp_path / "server.log")
    yield srv
    srv.stop()


def test_jupyterlab_rename_on_first_save_then_restart_keeps_the_state(server, capsys):
    server.new_notebook("Untitled.ipynb")
    session = server.open_notebook("Untitled.ipynb")
    kernel_id = session["kernel"]["id"]
    client = server.client(kernel_id)
    assert client.run("nums = [1, 2, 3]")["error"] == ""
    client.run("assert get_ipython().kernel.wait_for_checkpoint(60)")
    server.rename(session, "Untitled.ipynb", "analysis.ipynb")
    server.restart(kernel_id)  # Kernel -> Restart
    client.wait_for_ready()
    out = client.run("print(nums)")
    assert out["stdout"] == "[1, 2, 3]\n", out
    assert f"restored 1 variable for {server.root / 'analysis.ipynb'}" in out["stderr"], out
    client.close()
    report("JupyterLab rename, then Kernel -> Restart (jupyter_server)", capsys, rounds=1, lost=0, untrusted_code_ran=0)


def test_kernel_follows_a_rename_made_while_it_ran_even_without_the_server_extension(tmp_path, jupyter_dirs):
    root = tmp_path / "bare-root"
    root.mkdir()
    env = {**os.environ, **jupyter_dirs, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    server = JupyterServer(
        root, env, tmp_path / "bare-server.log", ["--ServerApp.jpserver_extensions=durable_kernel.serverext=False"]
    )
    try:
        server.new_notebook("Untitled.ipynb")
        session = server.open_notebook("Untitled.ipynb")
        client = server.client(session["kernel"]["id"])
        assert client.run("nums = [1, 2, 3]")["error"] == ""
        server.rename(session, "Untitled.ipynb", "analysis.ipynb")
        server.restart(session["kernel"]["id"])
        client.wait_for_ready()
        out = client.run("print(nums)")
        assert out["stdout"] == "[1, 2, 3]\n", out
        assert f"this notebook was renamed from {root / 'Untitled.ipynb'}" in out["stderr"], out
        client.close()
    finally:
        server.stop()


def test_cells_saved_under_the_old_name_after_the_extension_moved_the_state_follow_it_at_restart(server, jupyter_dirs):
    old, new = str(server.root / "Untitled.ipynb"), str(server.root / "analysis.ipynb")
    store = open_store(environ=jupyter_dirs)
    server.new_notebook("Untitled.ipynb")
    session = server.open_notebook("Untitled.ipynb")
    client = server.client(session["kernel"]["id"])
    assert client.run("nums = [1, 2, 3]")["error"] == ""
    client.run("assert get_ipython().kernel.wait_for_checkpoint(60)")
    server.rename(session, "Untitled.ipynb", "analysis.ipynb")
    deadline = time.monotonic() + 60
    while store.notebook(old).checkpoint_ids() or not store.notebook(new).checkpoint_ids():
        assert time.monotonic() < deadline, "the server extension did not move the state"
        time.sleep(0.1)
    # The running kernel knows nothing of the rename: it saves this cell under the old name.
    assert client.run("more = 4")["error"] == ""
    client.run("assert get_ipython().kernel.wait_for_checkpoint(60)")
    assert store.notebook(old).checkpoint_ids()
    server.restart(session["kernel"]["id"])
    client.wait_for_ready()
    out = client.run("print(nums, more)")
    assert out["stdout"] == "[1, 2, 3] 4\n", out
    assert f"this notebook was renamed from {old}" in out["stderr"], out
    client.close()


def test_a_pid_based_kernel_id_does_not_take_another_notebooks_state(start_kernel, tmp_path, jupyter_dirs):
    """jupyter console and ipykernel name the connection file after a pid: a later kernel
    with the same pid (so the same id) for another notebook is not the same kernel session."""
    a, b = str(tmp_path / "a.ipynb"), str(tmp_path / "b.ipynb")
    (tmp_path / "run-1").mkdir()
    (tmp_path / "run-2").mkdir()
    first = start_kernel(session=a, connection_file=str(tmp_path / "run-1" / "kernel-4242.json"))
    assert not first.execute("x = 1").error
    wait_saved(first)
    first.kill()
    second = start_kernel(session=b, connection_file=str(tmp_path / "run-2" / "kernel-4242.json"))
    assert user_variables(second) == []
    assert open_store(environ=jupyter_dirs).notebook(a).checkpoint_ids() == [1]


def test_jupyterlab_rename_while_closed_then_reopen_keeps_the_state(server, capsys):
    server.new_notebook("Untitled.ipynb")
    session = server.open_notebook("Untitled.ipynb")
    client = server.client(session["kernel"]["id"])
    assert client.run("nums = [1, 2, 3]")["error"] == ""
    client.run("assert get_ipython().kernel.wait_for_checkpoint(60)")
    client.close()
    server.close(session)  # shut down
    server.call("PUT", "contents/reports", {"type": "directory"})
    server.rename(None, "Untitled.ipynb", "reports/analysis.ipynb")  # moved in the file browser
    reopened = server.open_notebook("reports/analysis.ipynb")
    client = server.client(reopened["kernel"]["id"])
    assert client.run("print(nums)")["stdout"] == "[1, 2, 3]\n"
    client.close()
    report(
        "JupyterLab rename while shut down, then reopen (jupyter_server)",
        capsys,
        rounds=1,
        lost=0,
        untrusted_code_ran=0,
    )


def test_vscode_rename_of_a_running_notebook_moves_its_state(start_kernel, tmp_path):
    old, new = tmp_path / "Untitled-1.ipynb", tmp_path / "analysis.ipynb"
    kernel = start_kernel(session=None, cwd=str(tmp_path))
    kernel.execute(f"__vsc_ipynb_file__ = {str(old)!r}", silent=False, store_history=False)
    assert not kernel.execute("nums = [1, 2, 3]").error
    wait_saved(kernel)
    kernel.execute(f"__vsc_ipynb_file__ = {str(new)!r}", silent=False, store_history=False)  # VS Code: Save As
    told = kernel.execute("more = 4")
    assert f"this notebook was renamed from {old}" in told.stderr, told.stderr
    wait_saved(kernel)
    kernel.kill()
    again = start_kernel(session=str(new))
    assert again.value("(nums, more)") == "([1, 2, 3], 4)"


def test_notebook_moved_in_a_file_manager_is_offered_and_adopted(start_kernel, tmp_path):
    old = tmp_path / "old-place" / "analysis.ipynb"
    new = tmp_path / "new-place" / "analysis.ipynb"
    kernel = start_kernel(session=str(old))
    assert not kernel.execute("nums = [1, 2, 3]").error
    wait_saved(kernel)
    kernel.shutdown()
    # `mv old-place new-place` while no kernel runs: the old path no longer exists
    (tmp_path / "new-place").mkdir()
    moved = start_kernel(session=str(new))
    first = moved.execute("x = 1")
    assert f"'%checkpoint adopt {old}' brings its state here" in first.stderr, first.stderr
    out = moved.execute(f"%checkpoint adopt {old}")
    assert not out.error and "Adopted 1 checkpoint" in out.stdout, out
    holds(moved, "nums == [1, 2, 3]")
    wait_saved(moved)
    moved.kill()
    assert start_kernel(session=str(new)).value("nums") == "[1, 2, 3]"


def test_durable_kernel_mv_moves_the_state_to_the_new_path(start_kernel, tmp_path, jupyter_dirs):
    old, new = tmp_path / "a.ipynb", tmp_path / "b.ipynb"
    kernel = start_kernel(session=str(old))
    assert not kernel.execute("nums = [1, 2, 3]").error
    wait_saved(kernel)
    kernel.shutdown()
    done = subprocess.run(
        [sys.executable, "-m", "durable_kernel", "mv", str(old), str(new)],
        capture_output=True,
        text=True,
        env={**os.environ, **jupyter_dirs},
        timeout=60,
    )
    assert done.returncode == 0 and f"to {new}" in done.stdout, done
    assert start_kernel(session=str(new)).value("nums") == "[1, 2, 3]"
