"""The restore notice for frontend extensions (JupyterLab's, labextension/): machine-readable in
kernel_info's ``durable_kernel`` and over the ``durable_kernel`` comm; a frontend that opens the comm
with ``shows_notices`` shows it itself, so the first cell's stderr copy is dropped (plain clients
keep it); ``%checkpoint empty`` (the extension's Undo restore) empties the namespace, undoably."""

from __future__ import annotations

import time
import uuid

from conftest import wait_saved


def open_comm(kernel, data: dict) -> dict:
    """Open the durable_kernel comm as the extension does; the kernel's first message on it."""
    comm_id = uuid.uuid4().hex
    msg = kernel.kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "durable_kernel", "data": data})
    kernel.kc.shell_channel.send(msg)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = kernel.kc.get_iopub_msg(timeout=30)
        if got["msg_type"] == "comm_msg" and got["content"]["comm_id"] == comm_id:
            return got["content"]["data"]
    raise AssertionError("no answer on the durable_kernel comm")


def saved_kernel(start_kernel):
    kernel = start_kernel()
    kernel.execute("a = 1\nb = 'two'")
    wait_saved(kernel)
    kernel.restart()
    return kernel


def test_kernel_info_and_comm_carry_the_restore_notice(start_kernel):
    kernel = saved_kernel(start_kernel)
    info = kernel.info["durable_kernel"]
    assert info["start"]["state"] == "restored"
    assert info["start"]["names"] == ["a", "b"]
    assert info["start"]["warning"] is False
    assert info["start"]["execution_count"] == 1
    assert info["start"]["lines"][0].startswith("durable-kernel: restored 2 variables")
    assert info["enabled"] is True and info["comm_target"] == "durable_kernel"

    first = open_comm(kernel, {"frontend": "jupyterlab", "shows_notices": True})
    assert first["first"] is True and first["start"]["names"] == ["a", "b"]
    again = open_comm(kernel, {"frontend": "jupyterlab", "shows_notices": True})
    assert again["first"] is False  # a reloaded page does not announce the same start twice
    out = kernel.execute("print(a, b)")
    assert out.stdout.strip() == "1 two"
    assert "restored" not in kernel.stderr_of(out)


def test_without_the_comm_the_first_cell_still_gets_the_notice(start_kernel):
    kernel = saved_kernel(start_kernel)
    out = kernel.execute("print(a)")
    assert "durable-kernel: restored 2 variables" in kernel.stderr_of(out)


def test_checkpoint_empty_is_undone_by_undo(start_kernel):
    kernel = saved_kernel(start_kernel)
    out = kernel.execute("%checkpoint empty")
    assert "Emptied the namespace" in out.stdout, out.stdout + out.stderr
    assert kernel.value("'a' in globals()") == "False"
    wait_saved(kernel)
    kernel.execute("%checkpoint undo")
    assert kernel.value("(a, b)") == "(1, 'two')"
    off = open_comm(kernel, {})
    assert off["enabled"] is True


def test_a_variable_not_restored_makes_the_start_a_warning(start_kernel):
    kernel = start_kernel()
    kernel.execute("import sqlite3\nconn = sqlite3.connect(':memory:')\nx = 1")
    wait_saved(kernel)
    kernel.restart()
    start = kernel.info["durable_kernel"]["start"]
    assert start["state"] == "restored" and start["warning"] is True
    assert any("conn" in line and "not restored" in line for line in start["lines"]), start["lines"]
