"""JupyterLab in a real browser: headless Chromium driven by Playwright.

A JupyterLab server on 127.0.0.1 (random port and token, a temporary root with a
notebook) and Debian's Chromium (never Playwright's own download).  As a user:
open the notebook, choose **Python 3 (durable)** in the kernel picker, run the
cell that builds variables, restart the kernel from the Kernel menu, run the
cell that prints them: values and restore notice are on the page.  Then save,
close the browser, stop the server, start it again, open the notebook, run the
print cell: the values are back.  A screenshot of the final page is kept as a
test artifact (and copied to /tmp/durable-lab-final.png).

Skipped only when there is no Chromium (``.ci/run`` installs Debian's package
when it is missing); the reason is printed as a warning in pytest's summary.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

CHROMIUM_ARGS = [
    "--no-sandbox",  # as root, Chromium's sandbox refuses to start
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-gpu",
]
BUILD = "answer = 6 * 7\nwords = ['durable', 'lab']\nsquares = {n: n * n for n in range(5)}"
SHOW = "print('answer =', answer)\nprint('words =', words)\nprint('squares =', squares)"
SHOWN = ["answer = 42", "words = ['durable', 'lab']", "squares = {0: 0, 1: 1, 2: 4, 3: 9, 4: 16}"]
FINAL_SCREENSHOT_COPY = Path("/tmp/durable-lab-final.png")


def chromium_or_skip() -> str:
    """Debian's Chromium, or skip with the reason (shown in the warnings summary too)."""
    for candidate in (
        os.environ.get("DURABLE_TEST_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    reason = (
        "no Chromium browser is installed (/usr/bin/chromium missing; .ci/run installs Debian's "
        "'chromium' package with apt-get, which failed or was not available)"
    )
    warnings.warn(f"JupyterLab browser test skipped: {reason}", stacklevel=2)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class LabServer:
    """``jupyter lab`` on 127.0.0.1 with a random port and token, serving ``root``."""

    def __init__(self, root: Path, env: dict[str, str], log: Path):
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
        ]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, f"jupyter lab exited ({self.process.returncode}); see {log}"
            try:
                with urllib.request.urlopen(self.api("status"), timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"jupyter lab did not answer within 90 s; see {log}"
            time.sleep(0.3)

    def api(self, path: str) -> str:
        return f"{self.url}/api/{path}?token={self.token}"

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"

    def stop(self) -> None:
        """Stop it as Ctrl+C Ctrl+C (or a service manager) does: it shuts its kernels down first."""
        if self.process.poll() is None:
            kernels = children_of(self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("jupyter lab did not stop within 60 s of SIGTERM") from None
            deadline = time.monotonic() + 30
            while any(alive(k) for k in kernels):
                assert time.monotonic() < deadline, "kernels outlived the server"
                time.sleep(0.1)
        self._log.close()


@pytest.fixture
def lab_env(tmp_path: Path, jupyter_dirs: dict[str, str]) -> dict[str, str]:
    """Private config, data (signing key), runtime, IPython and store dirs for the server and its kernels."""
    env = {
        name: value for name, value in os.environ.items() if name not in ("JPY_SESSION_NAME", "DURABLE_KERNEL_SESSION")
    }
    env.update(jupyter_dirs)
    config = tmp_path / "jupyter-config"
    env.update(
        {
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
            "IPYTHONDIR": str(tmp_path / "ipython"),
            "JUPYTERLAB_SETTINGS_DIR": str(config / "lab" / "user-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(config / "lab" / "workspaces"),
        }
    )
    # No "Would you like to get notified about official Jupyter news?" toast over the notebook.
    settings = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    return env


@pytest.fixture
def browser_factory(tmp_path: Path):
    """Factory: a new headless Chromium with a fresh profile dir; all are closed at the end."""
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    contexts = []

    def launch():
        profile = tmp_path / f"chromium-profile-{len(contexts)}"
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(60_000)
        contexts.append(context)
        return context

    yield launch
    for context in contexts:
        try:
            context.close()
        except Exception:
            pass
    playwright.stop()


class LabPage:
    """The notebook open in JupyterLab, and what a user does with mouse and keyboard."""

    def __init__(self, page):
        from playwright.sync_api import expect

        self.page = page
        # expect() waits 5 s by default, apart from the context's 60 s: too short for a dialog
        # JupyterLab opens while a 2-core machine is busy starting kernels.
        expect.set_options(timeout=60_000)
        self.expect = expect
        self.cells = page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell")

    def wait_idle(self) -> None:
        self.expect(self.page.locator(".jp-StatusBar-TextItem", has_text="Python 3 (durable) | Idle")).to_be_visible(
            timeout=90_000
        )

    def choose_kernel(self, display_name: str) -> None:
        dialog = self.page.locator(".jp-Dialog")
        self.expect(dialog.locator(".jp-Dialog-header")).to_have_text("Select Kernel")
        dialog.locator("select").select_option(label=display_name)
        dialog.get_by_role("button", name="Select").click()
        self.expect(dialog).to_have_count(0)

    def run_cell(self, index: int) -> str:
        """Select cell ``index``, Shift+Enter, wait until it ran; its new prompt, e.g. ``[2]:``.

        It ran once its prompt has shown ``[*]:`` and then a number (which may be the number it
        had: a new kernel counts from 1 again)."""
        cell = self.cells.nth(index)
        prompt = cell.locator(".jp-InputArea-prompt")
        handle = prompt.element_handle()
        handle.evaluate(
            "el => { el.__durableRunning = false; new MutationObserver(() => {"
            " if (el.textContent.includes('*')) el.__durableRunning = true; })"
            ".observe(el, {subtree: true, childList: true, characterData: true}); }"
        )
        prompt.click()
        self.page.keyboard.press("Shift+Enter")
        self.page.wait_for_function(
            "el => el.__durableRunning && /^\\[\\d+\\]:$/.test(el.textContent.trim())", arg=handle
        )
        return prompt.inner_text().strip()

    def outputs(self, index: int, mime: str) -> str:
        items = self.cells.nth(index).locator(f'.jp-OutputArea-output[data-mime-type="{mime}"]')
        return "\n".join(items.all_inner_texts())

    def restart_from_kernel_menu(self, item: str = "Restart Kernel…") -> None:
        # Record the kernel statuses the status bar shows, to know the restart happened.
        self.page.evaluate("""() => {
            window.__durableStatuses = [];
            const seen = () => document.querySelectorAll('.jp-StatusBar-TextItem').forEach(
                el => window.__durableStatuses.push(el.textContent));
            new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, characterData: true});
        }""")
        self.page.locator(".lm-MenuBar-item", has_text="Kernel").click()
        self.page.locator(".lm-Menu-item", has_text=item).first.click()
        dialog = self.page.locator(".jp-Dialog")
        self.expect(dialog.locator(".jp-Dialog-header")).to_contain_text("Restart Kernel")
        dialog.get_by_role("button", name="Confirm Kernel Restart").click()
        self.page.wait_for_function(
            "() => window.__durableStatuses.some(s => /Restarting|Starting|Busy/.test(s)) && "
            "document.body.textContent.includes('Python 3 (durable) | Idle')",
            timeout=90_000,
        )
        self.wait_idle()

    def save(self) -> None:
        self.page.locator(".lm-MenuBar-item", has_text="File").click()
        self.page.locator(".lm-Menu-item", has_text="Save Notebook").first.click()
        self.expect(self.page.locator(".jp-mod-current.jp-mod-dirty")).to_have_count(0)


def disable_extension(env: dict[str, str]) -> None:
    """Disable the durable-kernel labextension for servers run with ``env`` (its config dir)."""
    labconfig = Path(env["JUPYTER_CONFIG_DIR"]) / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": {"durable-kernel": True}}))


@pytest.mark.slow
def test_jupyterlab_restart_and_server_restart_bring_the_variables_back(tmp_path, lab_env, browser_factory):
    root = tmp_path / "lab-root"
    root.mkdir()
    notebook_path = root / "analysis.ipynb"
    # No kernelspec in the notebook: opening it asks which kernel to start.
    nbformat.write(new_notebook(cells=[new_code_cell(BUILD), new_code_cell(SHOW)]), notebook_path)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    # JupyterLab without durable-kernel's extension (a plain frontend): the restore notice is the
    # kernel's text on stderr of the first cell.  tests/test_clients_jupyterlab_extension.py has it on.
    disable_extension(lab_env)

    # --- first server: pick the kernel, build, restart from the Kernel menu, print ---
    server = LabServer(root, lab_env, tmp_path / "lab-server-1.log")
    try:
        browser = browser_factory()
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.goto(server.notebook_url("analysis.ipynb"))
        lab = LabPage(page)
        lab.choose_kernel("Python 3 (durable)")
        lab.wait_idle()
        assert lab.run_cell(0) == "[1]:"
        assert lab.outputs(0, "application/vnd.jupyter.stderr") == ""

        lab.restart_from_kernel_menu()
        lab.run_cell(1)
        stdout = lab.outputs(1, "application/vnd.jupyter.stdout")
        stderr = lab.outputs(1, "application/vnd.jupyter.stderr")
        page.screenshot(path=str(artifacts / "durable-lab-after-kernel-restart.png"))
        assert stdout.splitlines() == SHOWN, stdout
        assert stderr.startswith(f"durable-kernel: restored 3 variables for {notebook_path}, saved "), stderr
        assert stderr.rstrip().endswith(": answer, squares, words"), stderr

        lab.save()
        saved = nbformat.read(notebook_path, as_version=4)
        assert saved.metadata.kernelspec.name == "durable-python3"
        browser.close()
    finally:
        server.stop()

    # --- second server, new browser: open, run the print cell ---------------------
    server = LabServer(root, lab_env, tmp_path / "lab-server-2.log")
    try:
        browser = browser_factory()
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.goto(server.notebook_url("analysis.ipynb"))
        lab = LabPage(page)
        lab.wait_idle()  # the notebook names its kernel now: no picker
        lab.run_cell(1)
        stdout = lab.outputs(1, "application/vnd.jupyter.stdout")
        stderr = lab.outputs(1, "application/vnd.jupyter.stderr")
        final = artifacts / "durable-lab-final.png"
        page.screenshot(path=str(final))
        shutil.copyfile(final, FINAL_SCREENSHOT_COPY)
        assert stdout.splitlines() == SHOWN, stdout
        assert stderr.startswith(f"durable-kernel: restored 3 variables for {notebook_path}, saved "), stderr
        browser.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_jupyterlab_restart_and_clear_outputs_numbers_the_next_cell_1(tmp_path, lab_env, browser_factory):
    """Kernel > Restart Kernel and Clear Outputs: the variables are back, and the next cell is [1],
    as with any kernel (the restored state is named by the earlier kernel's count)."""
    root = tmp_path / "lab-root"
    root.mkdir()
    nbformat.write(new_notebook(cells=[new_code_cell(BUILD), new_code_cell(SHOW)]), root / "count.ipynb")
    disable_extension(lab_env)  # a plain frontend: the restore notice is the kernel's text on stderr
    server = LabServer(root, lab_env, tmp_path / "lab-server.log")
    try:
        browser = browser_factory()
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.goto(server.notebook_url("count.ipynb"))
        lab = LabPage(page)
        lab.choose_kernel("Python 3 (durable)")
        lab.wait_idle()
        assert (lab.run_cell(0), lab.run_cell(1)) == ("[1]:", "[2]:")

        lab.restart_from_kernel_menu("Restart Kernel and Clear Outputs of All Cells…")
        assert lab.run_cell(1) == "[1]:"
        assert lab.outputs(1, "application/vnd.jupyter.stdout").splitlines() == SHOWN
        stderr = lab.outputs(1, "application/vnd.jupyter.stderr")
        assert "as of In [1] of an earlier kernel: answer, squares, words" in stderr, stderr
        browser.close()
    finally:
        server.stop()
