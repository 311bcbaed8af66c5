"""Options set in the config files README.md names reach a real kernel.

Each test writes ``c.DurableKernel...`` into one config file, in a Jupyter
config dir and an IPython dir of its own (so the user's real ``~/.jupyter`` and
``~/.ipython`` never leak in), starts a notebook's kernel with them, sets a
variable the option is about and one it is not, commits the checkpoint, kills
the kernel with SIGKILL and starts it again with the same config.

Until issue 9, only ``ipython_config.py`` was read: the app's name made
IPython look for ``durable_kernel_config.py`` instead of
``ipython_kernel_config.py``, and no kernel reads Jupyter's config dir unless
it is told to (``kernelapp.DurableKernelApp.load_config_file``).
"""

from __future__ import annotations

from pathlib import Path

from conftest import checkpoint_rows, holds, wait_saved

EXCLUDE_SECRETS = 'c.DurableKernel.exclude = ["secret*"]\n'

# Where a config file goes, relative to the test's own config dirs.
JUPYTER_CONFIG_DIR = "jupyter-config"  # JUPYTER_CONFIG_DIR, ~/.jupyter by default
IPYTHON_PROFILE = "ipython/profile_default"  # IPYTHONDIR is ipython/, ~/.ipython by default


def start_with_config(pool, session: str, config_file: str, text: str):
    """A kernel for ``session`` whose config dirs hold only ``text`` in ``config_file``."""
    path = pool.base / config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    env = {
        "JUPYTER_CONFIG_DIR": str(pool.base / JUPYTER_CONFIG_DIR),
        "IPYTHONDIR": str(pool.base / "ipython"),
        "JUPYTER_CONFIG_PATH": None,
    }
    return pool.start(session=session, env=env)


def saved_names(pool, session: str) -> list[str]:
    """The variables in the notebook's newest checkpoint, read from the store."""
    notebook = pool.notebook(session)
    newest = notebook.checkpoint_ids()[0]
    return sorted(v["name"] for v in notebook.read_manifest(newest).variables)


def assert_exclude_is_honoured(pool, config_file: str) -> None:
    """The excluded variable is neither saved nor restored after SIGKILL; the other one is both."""
    session = f"{Path(config_file).name}.ipynb"
    kernel = start_with_config(pool, session, config_file, EXCLUDE_SECRETS)
    out = kernel.execute("secret_token = 'hunter2'\npublic = 'kept'")
    assert not out.error, out.error
    wait_saved(kernel)
    seen = kernel.value("get_ipython().kernel.exclude")
    kernel.kill()

    assert saved_names(pool, session) == ["public"], f"the kernel's exclude was {seen}"
    restarted = start_with_config(pool, session, config_file, EXCLUDE_SECRETS)
    assert restarted.value("public") == "'kept'"
    holds(restarted, "'secret_token' not in globals()")


def test_exclude_in_ipython_kernel_config_py_in_the_jupyter_config_dir_is_honoured(pool):
    assert_exclude_is_honoured(pool, f"{JUPYTER_CONFIG_DIR}/ipython_kernel_config.py")


def test_exclude_in_ipython_kernel_config_py_in_the_ipython_profile_is_honoured(pool):
    assert_exclude_is_honoured(pool, f"{IPYTHON_PROFILE}/ipython_kernel_config.py")


def test_exclude_in_jupyter_config_py_in_the_jupyter_config_dir_is_honoured(pool):
    assert_exclude_is_honoured(pool, f"{JUPYTER_CONFIG_DIR}/jupyter_config.py")


def test_exclude_in_ipython_config_py_in_the_ipython_profile_is_honoured(pool):
    assert_exclude_is_honoured(pool, f"{IPYTHON_PROFILE}/ipython_config.py")


def test_keep_generations_in_a_config_file_sets_how_many_checkpoints_are_kept(pool):
    session = "keep.ipynb"
    config = f"{IPYTHON_PROFILE}/ipython_config.py"
    kernel = start_with_config(pool, session, config, "c.DurableKernel.keep_generations = 2\n")
    for value in (1, 2, 3):
        out = kernel.execute(f"x = {value}")
        assert not out.error, out.error
        wait_saved(kernel)  # one checkpoint per cell
    kernel.kill()

    assert pool.notebook(session).checkpoint_ids() == [3, 2]
    restarted = start_with_config(pool, session, config, "c.DurableKernel.keep_generations = 2\n")
    assert restarted.value("x") == "3"
    assert [row["id"] for row in checkpoint_rows(restarted)] == ["3", "2"]
