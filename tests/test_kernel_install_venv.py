"""A plain, non-editable `pip install .` into a fresh virtualenv ships the kernelspec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_makes_jupyter_list_durable_python3(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # Only the venv's own kernelspecs may answer: no user-level or JUPYTER_PATH ones.
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_PATH"}
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "empty-user-data")
    listed = subprocess.run(
        [str(venv / "bin" / "jupyter"), "kernelspec", "list"], capture_output=True, text=True, check=True, env=env
    )
    line = next((row for row in listed.stdout.splitlines() if row.split()[:1] == ["durable-python3"]), None)
    assert line is not None, listed.stdout
    assert line.split()[1].startswith(str(venv / "share" / "jupyter" / "kernels")), line
