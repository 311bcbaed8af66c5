"""VS Code's flow, message for message, as its Jupyter extension drives a local kernel.

What the extension does (vscode-jupyter ``src/kernels/kernel.ts``,
``initializeAfterStart``, and ``helpers.ts`` ``executeSilently``): start the
kernelspec with the notebook's folder as working directory and no
``JPY_SESSION_NAME``; run an ipywidgets version probe, then one execute with its
start-up code, ``__vsc_ipynb_file__ = "<notebook path>"`` among it -- both with
``silent=False, store_history=False, stop_on_error=False, allow_stdin=True`` --;
ask for kernel_info; then run the user's cells (``store_history=True``).  The
Variables view queries the kernel the same quiet way between cells.  A restart
is a shutdown_request with ``restart=True``, a new process on the same ports,
and the same start-up sequence again.

Driven here with jupyter_client alone (not the project's own client).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from durable_kernel.testing import collect
from jupyter_client.manager import KernelManager

WIDGETS_PREFIX = "e976ee50-99ed-4aba-9b6b-9dcd5634d07d:IPyWidgets:"
WIDGETS_PROBE = (
    "try:\n"
    "    import ipywidgets as _VSCODE_ipywidgets\n"
    f'    print("{WIDGETS_PREFIX}" + _VSCODE_ipywidgets.__version__)\n'
    "    del _VSCODE_ipywidgets\n"
    "except:\n"
    "    pass"
)
# A Variables-view query: a helper defined, used and deleted in one quiet execute.
VARIABLES_QUERY = (
    "def _VSCODE_getVariableSummaries():\n"
    "    import json as _VSCODE_json\n"
    "    return _VSCODE_json.dumps(sorted(n for n in globals() if not n.startswith('_')))\n"
    "print(_VSCODE_getVariableSummaries())\n"
    "del _VSCODE_getVariableSummaries"
)
QUIET = {"silent": False, "store_history": False, "stop_on_error": False, "allow_stdin": True}
CELL = {"silent": False, "store_history": True, "stop_on_error": False, "allow_stdin": True}
WHO = "print(sorted(get_ipython().run_line_magic('who_ls', '')))"


class Reply(dict):
    @property
    def stdout(self) -> str:
        return self["stdout"]

    @property
    def stderr(self) -> str:
        return self["stderr"]


class VSCodeNotebook:
    """One notebook open in VS Code: its kernel process and the extension's requests to it."""

    def __init__(self, path: Path, env: dict[str, str], log: Path):
        self.path = path
        self.env = env
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.km = KernelManager(kernel_name="durable-python3")
        self.km.start_kernel(cwd=str(path.parent), env=env, stdout=self._log, stderr=self._log)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.setup = self._initialize_after_start()

    def _initialize_after_start(self) -> list[Reply]:
        self.kc.wait_for_ready(timeout=60)
        probe = self.request(WIDGETS_PROBE, **QUIET)
        startup = self.request(
            "\n".join([f'__vsc_ipynb_file__ = "{self.path}"', "%config Completer.use_jedi = False"]), **QUIET
        )
        self.info = self.kc.kernel_info(reply=True, timeout=30)["content"]
        return [probe, startup]

    def request(self, code: str, timeout: float = 60, **options) -> Reply:
        got = collect(self.kc, self.kc.execute(code, **options), timeout, code)
        return Reply(
            stdout=got.stdout,
            stderr=got.stderr,
            error=got.error or None,
            result=got.result or None,
            status=got.status,
            execution_count=got.execution_count,
        )

    def cell(self, code: str) -> Reply:
        out = self.request(code, **CELL)
        assert out["status"] == "ok", out
        return out

    def variables_view(self) -> str:
        out = self.request(VARIABLES_QUERY, **QUIET)
        assert out["status"] == "ok", out
        return out.stdout

    def restart(self) -> None:
        """The toolbar's Restart: same kernel ports, new process, start-up sequence again."""
        self.km.restart_kernel(now=False)
        self.setup = self._initialize_after_start()

    def kill9(self) -> None:
        os.kill(self.km.provisioner.pid, signal.SIGKILL)
        self.km.provisioner.process.wait(timeout=30)

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=True)
        self._log.close()


@pytest.fixture
def vscode(tmp_path: Path, jupyter_dirs: dict[str, str]):
    """Factory: open a notebook in "VS Code"; every kernel is shut down at the end."""
    env = {
        name: value for name, value in os.environ.items() if name not in ("JPY_SESSION_NAME", "DURABLE_KERNEL_SESSION")
    }
    env.update(jupyter_dirs)
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    opened: list[VSCodeNotebook] = []

    def open_notebook(path: Path) -> VSCodeNotebook:
        notebook = VSCodeNotebook(path, env, tmp_path / f"kernel-{path.stem}-{len(opened)}.log")
        opened.append(notebook)
        return notebook

    yield open_notebook
    for notebook in opened:
        notebook.close()


@pytest.mark.slow
def test_two_vscode_notebooks_in_one_folder_each_get_their_own_state_back(tmp_path, vscode):
    folder = tmp_path / "project"
    folder.mkdir()
    a_path, b_path = folder / "a.ipynb", folder / "b.ipynb"

    a = vscode(a_path)
    assert [r["status"] for r in a.setup] == ["ok", "ok"]
    assert a.cell(WHO).stdout.strip() == "[]"
    a.cell("import statistics\nsamples = [3, 1, 4, 1, 5]")
    assert '"samples"' in a.variables_view()
    a.cell("mean = statistics.mean(samples)")

    b = vscode(b_path)
    assert b.cell(WHO).stdout.strip() == "[]", "b.ipynb sees a.ipynb's variables"
    b.cell("label = 'only in b'")
    b.variables_view()

    # a: Restart from the toolbar (the kernel waits for its checkpoint before it goes).
    a.restart()
    assert all(r["status"] == "ok" and "durable-kernel" not in r.stderr for r in a.setup), a.setup
    first = a.cell("print(mean, samples)")
    assert first.stdout == "2.8 [3, 1, 4, 1, 5]\n"
    assert first.stderr.startswith(f"durable-kernel: restored 3 variables for {a_path}, saved "), first.stderr
    assert first.stderr.rstrip().endswith(": mean, samples, statistics"), first.stderr
    assert a.cell(WHO).stdout.strip() == "['mean', 'samples', 'statistics']"
    assert "durable-kernel" not in a.cell("pass").stderr

    # b: the kernel dies (kill -9); VS Code starts it again.  Wait for b's checkpoint first:
    # a SIGKILL while it is written keeps the previous one, by design.
    assert b.request("get_ipython().kernel.wait_for_checkpoint(30)", silent=True)["status"] == "ok"
    b.kill9()
    b_again = vscode(b_path)
    again = b_again.cell("print(label)")
    assert again.stdout == "only in b\n"
    assert again.stderr.startswith(f"durable-kernel: restored 1 variable for {b_path}, ")
    assert b_again.cell(WHO).stdout.strip() == "['label']"


@pytest.mark.slow
def test_vscode_banner_and_execution_count_after_restore(tmp_path, vscode):
    path = tmp_path / "count.ipynb"
    nb = vscode(path)
    nb.cell("x = 1")
    last = nb.cell("y = 2")["execution_count"]
    nb.restart()
    # kernel_info is asked after the startup execute named the notebook: the banner names it.
    assert f"durable-kernel: restored 2 variables for {path}, " in nb.info["banner"]
    assert f"as of In [{last}] of an earlier kernel: x, y" in nb.info["banner"]
    # A new kernel counts from 1, as VS Code shows after any restart (test_cell_numbers.py).
    assert nb.cell("z = x + y")["execution_count"] == 1
