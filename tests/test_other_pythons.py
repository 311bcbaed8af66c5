"""The smoke subset on every other supported Python this machine has.

The whole suite runs on the interpreter running pytest.  For each other supported
minor version that is installed (pyenv's versions, or ``python3.X`` on PATH), one test
makes a fresh virtualenv with it, ``pip install``s this checkout with the ``smoke``
extra, checks that a kernel started there runs that virtualenv's Python and its copy
of durable_kernel, and runs the smoke subset there with that virtualenv's pytest:

* install: ``durable-kernel install`` and the kernelspec ``pip install`` ships
  (tests/test_install_command.py);
* every kind of value back after a clean restart and after SIGKILL
  (tests/test_kernel_restart.py);
* every ``%checkpoint`` command (tests/test_magic.py).

A version that is not installed is skipped, with the reason in the skip and in the
warnings summary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: ``requires-python = ">=3.10"``: the minor versions the project supports (add new ones here).
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
RUNNING = f"{sys.version_info[0]}.{sys.version_info[1]}"
SMOKE = ("tests/test_install_command.py", "tests/test_kernel_restart.py", "tests/test_magic.py")

#: Variables of this process that must not reach the other Python: they would put this
#: environment's packages, plugins, options or kernelspecs in front of the virtualenv's own.
NOT_INHERITED = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONEXECUTABLE",
    "PYTHONSAFEPATH",
    "__PYVENV_LAUNCHER__",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTEST_CURRENT_TEST",
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "JUPYTER_PATH",
    "JUPYTER_DATA_DIR",
    "JPY_SESSION_NAME",
    "DURABLE_KERNEL_SESSION",
    "DURABLE_KERNEL_DIR",
)

#: Run by the candidate interpreter: its version, and whether it can make a virtualenv with pip.
_PROBE = "import sys; print('%d.%d' % sys.version_info[:2]); import venv, ensurepip"

#: Run by the virtualenv's Python: where durable_kernel and its kernelspec come from, and
#: which Python the kernel it starts runs (kernel.json says "python": jupyter_client runs
#: the client's own sys.executable, here the virtualenv's).
_KERNEL_CHECK = textwrap.dedent("""
    import json, sys
    import durable_kernel
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    spec_dir = KernelSpecManager().get_kernel_spec("durable-python3").resource_dir
    km, kc = start_new_kernel(kernel_name="durable-python3", startup_timeout=120)
    try:
        out = []
        code = "import sys, durable_kernel; print(repr((sys.executable, sys.prefix, durable_kernel.__file__)))"
        reply = kc.execute_interactive(
            code, timeout=120,
            output_hook=lambda msg: out.append(msg["content"]["text"]) if msg["msg_type"] == "stream" else None,
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        executable, prefix, kernel_package = eval("".join(out))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(json.dumps({
        "client_executable": sys.executable, "package": durable_kernel.__file__, "kernelspec": spec_dir,
        "kernel_executable": executable, "kernel_prefix": prefix, "kernel_package": kernel_package,
    }))
""")


def _pyenv_roots() -> list[Path]:
    roots = [os.environ.get("PYENV_ROOT")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            asked = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30)
            roots.append(asked.stdout.strip() if asked.returncode == 0 else None)
        except (OSError, subprocess.TimeoutExpired):
            pass
    roots += [str(Path.home() / ".pyenv"), "/root/.pyenv"]
    unique: list[Path] = []
    for root in roots:
        if root and Path(root) not in unique:
            unique.append(Path(root))
    return unique


def _candidates(version: str) -> list[Path]:
    """``python3.X`` executables that may be Python ``version``: pyenv's plain CPython releases,
    newest patch first, then each one on PATH (a pyenv shim for an unselected version fails the probe)."""
    found: list[Path] = []
    for root in _pyenv_roots():
        releases = []
        for exe in (root / "versions").glob(f"{version}.*/bin/python{version}"):
            patch = re.fullmatch(rf"{re.escape(version)}\.(\d+)", exe.parent.parent.name)
            if patch:
                releases.append((int(patch.group(1)), exe))
        found += [exe for _, exe in sorted(releases, key=lambda release: release[0], reverse=True)]
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        exe = Path(directory or ".") / f"python{version}"
        if exe.is_file() and os.access(exe, os.X_OK):
            found.append(exe)
    unique: list[Path] = []
    for exe in found:
        if exe not in unique:
            unique.append(exe)
    return unique


def find_python(version: str) -> tuple[Path | None, str]:
    """The first working Python ``version`` that can make a virtualenv, or None and why not."""
    rejected = []
    for exe in _candidates(version):
        try:
            probe = subprocess.run([str(exe), "-c", _PROBE], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            rejected.append(f"{exe}: {exc}")
            continue
        said = probe.stdout.split()
        if said[:1] != [version]:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            rejected.append(f"{exe}: not a working Python {version} ({last})")
        elif probe.returncode != 0:
            rejected.append(f"{exe}: cannot make a virtualenv with pip (no venv or ensurepip module)")
        else:
            return exe, ""
    where = ", ".join(str(root / "versions" / f"{version}.*") for root in _pyenv_roots())
    reason = f"Python {version} is not installed here (looked in {where} and for python{version} on PATH)"
    if rejected:
        reason += "; found but unusable: " + "; ".join(rejected)
    return None, reason


def _run(step: str, argv: list[str], timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a step of the test; fail the test with its output if it fails (``check``) or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        tail = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"{step} did not finish in {timeout:.0f} s: {' '.join(argv)}\n{tail[-6000:]}", pytrace=False)
    if check and done.returncode != 0:
        pytest.fail(
            f"{step} failed (exit status {done.returncode}): {' '.join(argv)}\n"
            f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}",
            pytrace=False,
        )
    return done


@pytest.mark.slow
@pytest.mark.parametrize("version", SUPPORTED, ids=[f"python{version}" for version in SUPPORTED])
def test_install_round_trip_after_sigkill_and_magics_pass_on(version, tmp_path, record_property):
    if version == RUNNING:
        pytest.skip(f"Python {version} runs the whole suite (this pytest)")
    python, reason = find_python(version)
    if python is None:
        warnings.warn(f"smoke subset not run on Python {version}: {reason}", stacklevel=1)
        pytest.skip(reason)

    venv = tmp_path / "venv"
    bin_dir = venv / "bin"
    env = {name: value for name, value in os.environ.items() if name not in NOT_INHERITED}
    env.update(
        VIRTUAL_ENV=str(venv),
        PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]),  # `durable-kernel` is the venv's
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),  # no user-level kernelspecs
        DURABLE_KERNEL_DIR=str(tmp_path / "store"),
    )
    timings = {}

    start = time.monotonic()
    _run("making the virtualenv", [str(python), "-m", "venv", str(venv)], 300, env=env)
    timings["venv"] = time.monotonic() - start

    start = time.monotonic()
    _run(
        f"pip install {ROOT}[smoke]",
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{ROOT}[smoke]"],
        1200,
        env=env,
        cwd=tmp_path,
    )
    timings["install"] = time.monotonic() - start

    start = time.monotonic()
    check = _run(
        "starting a kernel from the virtualenv",
        [str(bin_dir / "python"), "-c", _KERNEL_CHECK],
        300,
        env=env,
        cwd=tmp_path,
    )
    seen = json.loads(check.stdout.strip().splitlines()[-1])
    venv_python = str(bin_dir / "python")
    assert seen["client_executable"] == venv_python, seen
    assert seen["kernel_executable"] == venv_python, seen
    assert Path(seen["kernel_prefix"]).resolve() == venv.resolve(), seen
    for copy in (seen["package"], seen["kernel_package"], seen["kernelspec"]):
        assert Path(copy).resolve().is_relative_to(venv.resolve()), seen
    timings["kernel check"] = time.monotonic() - start

    start = time.monotonic()
    smoke = _run(
        f"the smoke subset on Python {version}",
        [
            venv_python,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "--basetemp",
            str(tmp_path / "pytest"),
            *SMOKE,
        ],
        1200,
        check=False,
        env=env,
        cwd=ROOT,
    )
    timings["smoke"] = time.monotonic() - start
    summary = (smoke.stdout.strip().splitlines() or [""])[-1]
    report = f"Python {version} ({python}): " + ", ".join(f"{step} {took:.0f} s" for step, took in timings.items())
    print(f"{report}; {summary}")
    record_property("timings", report)
    if smoke.returncode != 0 or " passed" not in summary or "skipped" in summary:
        pytest.fail(
            f"smoke subset failed on Python {version} (exit status {smoke.returncode}); {report}\n"
            f"{smoke.stdout[-12000:]}\n{smoke.stderr[-4000:]}",
            pytrace=False,
        )
