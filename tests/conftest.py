"""Shared fixtures: real kernels through jupyter_client, each with its own store."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest

import durable_kernel
from durable_kernel.client import Kernel

ROOT = Path(__file__).resolve().parent.parent


def _installed_copy_is_current() -> list[str]:
    """Source files that differ from the installed package (tests run the installed one)."""
    installed = Path(durable_kernel.__file__).parent
    stale = []
    for src_dir, dest in ((ROOT / "kernel", installed), (ROOT / "checkpoints", installed / "checkpoints")):
        for src in src_dir.glob("*.py"):
            if not (dest / src.name).exists() or not filecmp.cmp(src, dest / src.name, shallow=False):
                stale.append(str(src.relative_to(ROOT)))
    return stale


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = _installed_copy_is_current()
    if stale:
        raise pytest.UsageError(
            "the installed durable_kernel is older than the source tree "
            f"({', '.join(stale[:5])}); run: pip install --no-deps --no-build-isolation ."
        )


@pytest.fixture
def jupyter_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private Jupyter data dir (signing key) and checkpoint store, for this test and its kernels."""
    env = {
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
        "DURABLE_KERNEL_DIR": str(tmp_path / "store"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.delenv("DURABLE_KERNEL_SESSION", raising=False)
    return env


@pytest.fixture
def start_kernel(tmp_path: Path, jupyter_dirs: dict[str, str]):
    """Factory: start a real durable-python3 kernel; all are killed at the end of the test.

    ``start_kernel(session="nb", env={...}, cwd=...)``; ``session=None`` starts it
    with no identity in the environment (as VS Code and jupyter console do).
    """
    started: list[Kernel] = []

    def start(session: str | None = "notebook.ipynb", env: dict[str, str] | None = None, **kwargs) -> Kernel:
        full_env = dict(jupyter_dirs)
        if session is not None:
            full_env["DURABLE_KERNEL_SESSION"] = session
        full_env.update(env or {})
        log = tmp_path / f"kernel-{len(started)}.log"
        kernel = Kernel("durable-python3", env=full_env, log_file=str(log), **kwargs)
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        if kernel.km.is_alive():
            kernel.close()


def wait_saved(kernel: Kernel, timeout: float = 60) -> None:
    """Wait until the kernel's last checkpoint is committed (a silent request: no new checkpoint)."""
    out = kernel.execute(f"get_ipython().kernel.wait_for_checkpoint({timeout})", silent=True)
    assert not out.error, out.error
