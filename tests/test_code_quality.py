"""The project's habits, checked where CI checks everything else (the README's test command).

ruff (lint and format, configured in pyproject.toml) over the whole tree, and
mypy (its configuration there too) over ``checkpoints/``: a new finding fails
the suite.  Run them yourself with ``ruff check . && ruff format --check . && mypy``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing_to_fix():
    done = run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_code_is_formatted_as_ruff_formats_it():
    done = run("ruff", "format", "--no-cache", "--check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_no_type_errors_in_the_store():
    done = run("mypy", "--no-incremental")
    assert done.returncode == 0, done.stdout + done.stderr
