"""Shared fixtures: real kernels through jupyter_client, each with its own store."""

from __future__ import annotations

import filecmp
from pathlib import Path

import durable_kernel
import pytest
from durable_kernel.checkpoints.location import open_store
from durable_kernel.testing import KernelProcess

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
    monkeypatch.delenv("DURABLE_KERNEL_KEY", raising=False)  # the key is the data dir's, not the runner's
    return env


@pytest.fixture
def start_kernel(tmp_path: Path, jupyter_dirs: dict[str, str]):
    """Factory: start a real durable-python3 kernel; all are killed at the end of the test.

    ``start_kernel(session="nb", env={...}, cwd=...)``; ``session=None`` starts it
    with no identity in the environment (as VS Code and jupyter console do).
    """
    started: list[KernelProcess] = []

    def start(session: str | None = "notebook.ipynb", env: dict[str, str] | None = None, **kwargs) -> KernelProcess:
        full_env = dict(jupyter_dirs)
        if session is not None:
            full_env["DURABLE_KERNEL_SESSION"] = session
        full_env.update(env or {})
        log = tmp_path / f"kernel-{len(started)}.log"
        kernel = KernelProcess("durable-python3", env=full_env, log_file=str(log), **kwargs)
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        if kernel.km.is_alive():
            kernel.close()


def wait_saved(kernel: KernelProcess, timeout: float = 60) -> None:
    """Wait until the kernel's last checkpoint is committed (a silent request: no new checkpoint)."""
    out = kernel.execute(
        f"assert get_ipython().kernel.wait_for_checkpoint({timeout}), 'still saving after {timeout} s'", silent=True
    )
    assert not out.error, out.error


# --- shared kernels and store inspection (used by the test_kernel_* files) -----


class KernelPool:
    """Kernels that share one Jupyter data dir (signing key) and one checkpoint store."""

    def __init__(self, base: Path):
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.dirs = {
            "JUPYTER_DATA_DIR": str(base / "jupyter-data"),
            "DURABLE_KERNEL_DIR": str(base / "store"),
        }
        self.started: list[KernelProcess] = []

    def start(
        self, session: str | None = "notebook.ipynb", env: dict[str, str | None] | None = None, **kwargs
    ) -> KernelProcess:
        """As ``start_kernel``; the test process's own identity variables never leak in."""
        full_env: dict[str, str | None] = {
            **self.dirs,
            "JPY_SESSION_NAME": None,
            "DURABLE_KERNEL_SESSION": None,
            "DURABLE_KERNEL_KEY": None,
        }
        if session is not None:
            full_env["DURABLE_KERNEL_SESSION"] = session
        full_env.update(env or {})
        log = self.base / f"kernel-{len(self.started)}.log"
        kernel = KernelProcess("durable-python3", env=full_env, log_file=str(log), **kwargs)  # type: ignore[arg-type]
        self.started.append(kernel)
        return kernel

    def notebook(self, identity: str):
        """The store of one notebook identity, read with this pool's signing key."""
        return open_store(environ=self.dirs).notebook(identity)

    def close_all(self) -> None:
        for kernel in self.started:
            if kernel.km.is_alive():
                kernel.close()


@pytest.fixture(scope="module")
def kernel_pools(tmp_path_factory: pytest.TempPathFactory):
    """Factory for kernels shared by several tests of a module: ``kernel_pools()`` is a new
    :class:`KernelPool` (own store and key); all its kernels are killed after the module."""
    pools: list[KernelPool] = []

    def new_pool() -> KernelPool:
        pool = KernelPool(tmp_path_factory.mktemp("pool"))
        pools.append(pool)
        return pool

    yield new_pool
    for pool in pools:
        pool.close_all()


@pytest.fixture
def pool(tmp_path: Path):
    """A private store and key for this test's kernels (``pool.start(...)``, ``pool.notebook(id)``)."""
    kernels = KernelPool(tmp_path / "pool")
    yield kernels
    kernels.close_all()


def holds(kernel: KernelProcess, condition: str) -> None:
    """Assert that a Python expression is true inside the kernel."""
    assert kernel.value(f"bool({condition})") == "True", f"not true in the kernel: {condition}"


def user_variables(kernel: KernelProcess) -> list[str]:
    """The user's variable names, as ``%who_ls`` lists them."""
    out = kernel.execute("print(sorted(get_ipython().run_line_magic('who_ls', '')))")
    assert not out.error, out.error
    return eval(out.stdout)  # a list of str literals


def checkpoint_list(kernel: KernelProcess) -> list[dict[str, str] | str]:
    """``%checkpoint list`` in the kernel: one dict per row (its columns by header name), and the
    lines that set rows apart (``--- ... ---``) as they are."""
    out = kernel.execute("%checkpoint list")
    assert not out.error, out.error
    return parse_checkpoint_list(out.stdout)


def parse_checkpoint_list(text: str) -> list[dict[str, str] | str]:
    """What :func:`checkpoint_list` returns, from the text ``%checkpoint list`` printed (from its header on)."""
    lines = [line.rstrip("\r") for line in text.splitlines()]
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("id ")) :]
    header, *lines = [line for line in lines if line.strip()]
    names = header.split()
    starts = [header.index(f" {n} ") + 1 if i else 0 for i, n in enumerate(names[:-1])] + [header.rindex(names[-1])]
    found: list[dict[str, str] | str] = []
    for line in lines:
        if line.startswith("---"):
            found.append(line)
            continue
        bounds = [*starts[1:], None]
        found.append({n: line[s:e].strip() for n, s, e in zip(names, starts, bounds, strict=True)})
    return found


def checkpoint_rows(kernel: KernelProcess) -> list[dict[str, str]]:
    """The rows of ``%checkpoint list``, newest first (see :func:`checkpoint_list`)."""
    return [row for row in checkpoint_list(kernel) if isinstance(row, dict)]


@pytest.fixture
def tracker():
    """A written-page tracker of this process (tests that use it skip where the system has none)."""
    from durable_kernel.checkpoints.tracking import WrittenPages

    made = WrittenPages.open()
    assert made is not None
    yield made
    made.close()
