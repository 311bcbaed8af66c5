"""durable-kernel's JupyterLab extension (labextension/) in a real browser: Debian's headless Chromium
driven by Playwright, as tests/test_clients_jupyterlab.py (same server, browser and skip rule).

``pip install .`` alone installs and enables it (no ``jupyter labextension install``).  In a
notebook on a durable kernel: the status bar item appears and turns to "Saved … ago" after a cell;
after Kernel > Restart the notification says what came back, and the first cell's stderr has no
copy of the notice; the Checkpoints panel lists the checkpoints and its Restore (confirmed in a
dialog) brings an older state back into the running kernel; the Kernel menu's Pause/Resume
Checkpoints and Restart Kernel Fresh work; a variable that cannot be saved is named in the status bar;
the server serves the kernelspec's own logo.  Screenshots are kept as test artifacts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from test_clients_jupyterlab import (  # noqa: F401 - fixtures
    BUILD,
    SHOW,
    SHOWN,
    LabPage,
    LabServer,
    browser_factory,
    lab_env,
)

ROOT = Path(__file__).resolve().parent.parent
CHANGE = "answer = 0"
UNSAVABLE = "import sqlite3\nconn = sqlite3.connect(':memory:')"
KERNELSPEC = {"name": "durable-python3", "display_name": "Python 3 (durable)", "language": "python"}


def test_pip_install_alone_enables_the_extension(lab_env):  # noqa: F811
    listed = subprocess.run(
        [sys.executable, "-m", "jupyterlab.labextensions", "list"],
        env=lab_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = re.sub(r"\x1b\[[0-9;]*m", "", listed.stdout + listed.stderr)
    assert re.search(r"durable-kernel v\S+ enabled\s+OK", text), text
    installed = Path(sys.prefix, "share", "jupyter", "labextensions", "durable-kernel", "package.json")
    assert installed.is_file(), f"{installed} missing: the wheel's shared-data did not install the bundle"


def test_kernelspec_has_its_own_logo():
    """The launcher tile and kernel picker show durable-kernel's logo, not the stock Python one."""
    import ipykernel
    from jupyter_client.kernelspec import KernelSpecManager

    spec = Path(KernelSpecManager().get_kernel_spec("durable-python3").resource_dir)
    stock = Path(ipykernel.__file__).parent / "resources"
    for name in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
        ours = (spec / name).read_bytes()
        assert ours != (stock / name).read_bytes(), f"{name} is ipykernel's stock logo"
        assert ours == (ROOT / "kernelspec" / "durable-python3" / name).read_bytes(), f"installed {name} is stale"


@pytest.mark.slow
def test_status_notification_and_checkpoints_panel(tmp_path, lab_env, browser_factory):  # noqa: F811
    root = tmp_path / "lab-root"
    root.mkdir()
    notebook = new_notebook(
        cells=[new_code_cell(BUILD), new_code_cell(SHOW), new_code_cell(CHANGE), new_code_cell(UNSAVABLE)]
    )
    notebook.metadata["kernelspec"] = KERNELSPEC
    nbformat.write(notebook, root / "analysis.ipynb")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    server = LabServer(root, lab_env, tmp_path / "lab-server.log")
    try:
        browser = browser_factory()
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.goto(server.notebook_url("analysis.ipynb"))
        lab = LabPage(page)
        expect = lab.expect
        lab.wait_idle()
        with urllib.request.urlopen(
            f"{server.url}/kernelspecs/durable-python3/logo-64x64.png?token={server.token}"
        ) as r:
            assert r.read() == (ROOT / "kernelspec" / "durable-python3" / "logo-64x64.png").read_bytes()
        status = page.locator(".jp-durable-status")
        expect(status).to_have_text("Not saved yet", timeout=30_000)

        # --- the status bar item follows the cells ---------------------------------------
        assert lab.run_cell(0) == "[1]:"
        expect(status).to_have_text(re.compile(r"^Saved \d+ s ago · \d+(\.\d)? [KM]?B$"), timeout=30_000)

        # --- restart: the notification, and no stderr copy of the notice ----------------
        lab.restart_from_kernel_menu()
        toast = page.locator(".Toastify__toast", has_text="Restored 3 variables from")
        expect(toast).to_be_visible(timeout=30_000)
        expect(toast).to_contain_text(re.compile(r"Restored 3 variables from \d+ s ago \(In \[1\]\)"))
        expect(toast.get_by_role("button", name="Details")).to_be_visible()
        expect(toast.get_by_role("button", name="Undo restore")).to_be_visible()
        page.screenshot(path=str(artifacts / "durable-lab-extension-notification.png"))
        toast.get_by_role("button", name="Details").click()
        details = page.locator(".jp-Dialog")
        expect(details).to_contain_text("restored 3 variables for")
        details.get_by_role("button", name="Ok").click()
        expect(details).to_have_count(0)
        lab.run_cell(1)
        assert lab.outputs(1, "application/vnd.jupyter.stdout").splitlines() == SHOWN
        assert lab.outputs(1, "application/vnd.jupyter.stderr") == ""

        # --- the panel: a new checkpoint, then Restore the first one ---------------------
        lab.run_cell(2)  # answer = 0
        status.click()
        panel = page.locator("#durable-kernel-checkpoints")
        expect(panel).to_be_visible()
        changed = panel.locator(".jp-durable-checkpoint", has_text="~answer")
        expect(changed).to_have_count(1, timeout=30_000)
        first = panel.locator(".jp-durable-checkpoint", has_text="+answer")
        # In [1]: a cell that changes nothing (SHOW) re-dates the newest checkpoint but keeps naming the
        # cell that made its state, as %checkpoint list shows.
        expect(first).to_contain_text("In [1]")
        expect(first).to_contain_text(BUILD.splitlines()[0])
        page.screenshot(path=str(artifacts / "durable-lab-extension-panel.png"))
        first.get_by_role("button", name="Restore").click()
        dialog = page.locator(".jp-Dialog")
        expect(dialog.locator(".jp-Dialog-header")).to_contain_text("Restore checkpoint")
        dialog.get_by_role("button", name="Restore").click()
        expect(panel.locator(".jp-durable-message")).to_contain_text("Restored checkpoint", timeout=60_000)
        lab.run_cell(1)
        assert lab.outputs(1, "application/vnd.jupyter.stdout").splitlines() == SHOWN

        # --- Kernel menu: pause checkpoints, and the status bar says so -----------------
        page.locator(".lm-MenuBar-item", has_text="Kernel").click()
        page.locator(".lm-Menu-item", has_text="Pause/Resume Checkpoints").click()
        expect(status).to_have_text("Checkpoints off", timeout=30_000)
        page.locator(".lm-MenuBar-item", has_text="Kernel").click()
        page.locator(".lm-Menu-item", has_text="Pause/Resume Checkpoints").click()
        expect(status).not_to_have_text("Checkpoints off", timeout=30_000)

        # --- Restart Kernel Fresh: empty namespace, the state before kept for undo ---------
        page.locator(".lm-MenuBar-item", has_text="Kernel").click()
        page.locator(".lm-Menu-item", has_text="Restart Kernel Fresh").click()
        fresh = page.locator(".Toastify__toast", has_text="Restarted fresh")
        expect(fresh).to_be_visible(timeout=60_000)
        expect(fresh).to_contain_text("%checkpoint undo")
        lab.wait_idle()
        lab.run_cell(1)
        assert "NameError" in lab.outputs(1, "application/vnd.jupyter.stderr")

        # --- a variable that cannot be saved is named in the status bar ----------------
        lab.run_cell(3)
        expect(status).to_have_text("Not saved: conn", timeout=30_000)
        page.screenshot(path=str(artifacts / "durable-lab-extension-final.png"))
        browser.close()
    finally:
        server.stop()
    assert os.path.exists(root / "analysis.ipynb")
