"""Which notebook is this? Each client's way of naming it keeps notebooks apart.

JupyterLab names the notebook with ``JPY_SESSION_NAME``; VS Code gives no name
at start and sets ``__vsc_ipynb_file__`` with a setup execute
(``store_history=False``) before the user's cells; ``jupyter console`` gives no
name at all, so the kernel's working folder is the identity.
"""

from __future__ import annotations

import pytest
from conftest import KernelPool, user_variables, wait_saved


def jupyterlab(pool: KernelPool, folder, notebook: str):
    return pool.start(session=None, env={"JPY_SESSION_NAME": str(folder / notebook)}, cwd=str(folder))


def test_two_jupyterlab_notebooks_in_one_folder_never_see_each_others_variables(pool, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    a = jupyterlab(pool, folder, "a.ipynb")
    assert not a.execute("only_in_a = 'a'").error
    wait_saved(a)
    b = jupyterlab(pool, folder, "b.ipynb")
    assert user_variables(b) == []
    assert not b.execute("only_in_b = 'b'").error
    wait_saved(b)
    a.kill()
    b.kill()
    assert user_variables(jupyterlab(pool, folder, "a.ipynb")) == ["only_in_a"]
    assert user_variables(jupyterlab(pool, folder, "b.ipynb")) == ["only_in_b"]


# --- VS Code and jupyter console in one folder -------------------------------------

SEEN = "print(sorted(get_ipython().run_line_magic('who_ls', '')))"


class VSCodeSession:
    """A kernel started the way VS Code starts one: no identity, then the setup execute."""

    def __init__(self, pool: KernelPool, folder, notebook: str):
        self.path = str(folder / notebook)
        self.kernel = pool.start(session=None, cwd=str(folder))
        self.setup = self.kernel.execute(f"__vsc_ipynb_file__ = {self.path!r}", store_history=False)
        assert not self.setup.error, self.setup.error


@pytest.fixture(scope="module")
def folder_story(kernel_pools):
    """One folder used by jupyter console, then by two VS Code notebooks, then by console again."""
    pool = kernel_pools()
    folder = pool.base / "project"
    folder.mkdir()
    story = {"folder": folder}

    console = pool.start(session=None, cwd=str(folder))
    assert not console.execute("console_var = 'typed in jupyter console'").error
    wait_saved(console)
    console.kill()

    a = VSCodeSession(pool, folder, "a.ipynb")
    story["a first cell"] = a.kernel.execute(SEEN)
    assert not a.kernel.execute("a_var = 'from a.ipynb'").error
    wait_saved(a.kernel)

    b = VSCodeSession(pool, folder, "b.ipynb")
    story["b first cell"] = b.kernel.execute(SEEN)
    assert not b.kernel.execute("b_var = 'from b.ipynb'").error
    wait_saved(b.kernel)
    b.kernel.kill()

    a.kernel.shutdown()  # VS Code's restart: shut down, start again, setup execute again
    a_again = VSCodeSession(pool, folder, "a.ipynb")
    story["a again setup"] = a_again.setup
    story["a again first cell"] = a_again.kernel.execute(SEEN)
    story["a again second cell"] = a_again.kernel.execute("pass")
    a_again.kernel.kill()

    console_again = pool.start(session=None, cwd=str(folder))
    story["console again"] = console_again
    story["console again first cell"] = console_again.execute(SEEN)
    story["console elsewhere"] = pool.start(session=None, cwd=str(pool.base))
    return story


def test_vscode_notebook_after_restart_sees_its_state_once_the_setup_execute_names_it(folder_story):
    assert folder_story["a again first cell"].stdout.strip() == "['a_var']"


def test_vscode_notebooks_in_one_folder_never_see_each_others_variables(folder_story):
    assert folder_story["b first cell"].stdout.strip() == "[]"


def test_vscode_notebook_does_not_inherit_the_folders_console_state(folder_story):
    assert folder_story["a first cell"].stdout.strip() == "[]"


def test_vscode_restore_notice_shows_in_the_first_user_cell_not_in_the_setup_execute(folder_story):
    path = folder_story["folder"] / "a.ipynb"
    assert folder_story["a again setup"].stderr == ""
    assert folder_story["a again first cell"].stderr.startswith(f"durable-kernel: restored 1 variable for {path}")
    assert folder_story["a again second cell"].stderr == ""


def test_jupyter_console_restart_in_the_same_folder_restores(folder_story):
    assert folder_story["console again first cell"].stdout.strip() == "['console_var']"
    assert folder_story["console again"].value("console_var") == "'typed in jupyter console'"


def test_jupyter_console_banner_names_the_folder(folder_story):
    folder = folder_story["folder"]
    assert f"durable-kernel: restored 1 variable for {folder}, " in folder_story["console again"].banner


def test_jupyter_console_in_another_folder_starts_fresh(folder_story):
    assert user_variables(folder_story["console elsewhere"]) == []


def test_new_vscode_notebook_counts_cells_from_one_even_where_the_folder_has_console_state(folder_story):
    assert folder_story["a first cell"].execution_count == 1
