"""`durable-kernel install` mirrors `python -m ipykernel install`."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _jupyter_kernelspecs(env) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["kernelspecs"]


def test_install_with_prefix_name_and_display_name_is_listed_by_jupyter(tmp_path):
    prefix = tmp_path / "prefix"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "durable_kernel",
            "install",
            "--prefix",
            str(prefix),
            "--name",
            "durable-test",
            "--display-name",
            "Durable Test",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "Installed kernelspec durable-test" in result.stdout
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    spec = _jupyter_kernelspecs(env)["durable-test"]["spec"]
    assert spec["display_name"] == "Durable Test"
    assert spec["argv"][:3] == [sys.executable, "-m", "durable_kernel"]


def test_install_rejects_two_destinations_with_one_clear_line(tmp_path):
    result = subprocess.run(
        ["durable-kernel", "install", "--user", "--prefix", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_plain_pip_install_ships_the_kernelspec_in_this_environment():
    specs = _jupyter_kernelspecs(dict(os.environ))
    assert specs["durable-python3"]["spec"]["display_name"] == "Python 3 (durable)"
