"""Which notebook is this kernel running? The identity its state is stored under.

In order: ``DURABLE_KERNEL_SESSION`` (explicit), ``JPY_SESSION_NAME`` (set by
jupyter_server to the notebook's path), VS Code's ``__vsc_ipynb_file__`` (set by
a silent execute after start), else the kernel's working folder (jupyter
console).  The store hashes the identity into a folder name; this module only
picks the readable string.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

VSCODE_NAME = "__vsc_ipynb_file__"


def from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The identity the launcher gave us, or None if it gave none."""
    environ = os.environ if environ is None else environ
    for var in ("DURABLE_KERNEL_SESSION", "JPY_SESSION_NAME"):
        value = environ.get(var, "").strip()
        if value:
            return value
    return None


def from_vscode(user_ns: Mapping[str, object]) -> str | None:
    """The notebook VS Code told us about, if it has."""
    value = user_ns.get(VSCODE_NAME)
    return value if isinstance(value, str) and value else None


def working_folder() -> str:
    """The fallback identity: the folder the kernel was started in."""
    return os.getcwd()
