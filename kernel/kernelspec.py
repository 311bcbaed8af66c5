"""Install the ``durable-python3`` kernelspec, as ``python -m ipykernel install`` does."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

KERNEL_NAME = "durable-python3"
DISPLAY_NAME = "Python 3 (durable)"


def kernel_dict(display_name: str = DISPLAY_NAME) -> dict:
    """kernel.json for this interpreter."""
    return {
        "argv": [sys.executable, "-m", "durable_kernel", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "metadata": {"debugger": True},
        "interrupt_mode": "signal",
        "kernel_protocol_version": "5.5",
    }


def install(
    user: bool = False,
    prefix: str | None = None,
    name: str = KERNEL_NAME,
    display_name: str = DISPLAY_NAME,
) -> str:
    """Write the kernelspec and install it; returns the folder it went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    import ipykernel

    logos = Path(ipykernel.__file__).parent / "resources"
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / name
        spec.mkdir()
        (spec / "kernel.json").write_text(json.dumps(kernel_dict(display_name), indent=1) + "\n")
        for logo in logos.glob("logo-*"):
            shutil.copy(logo, spec / logo.name)
        return KernelSpecManager().install_kernel_spec(str(spec), kernel_name=name, user=user, prefix=prefix)
