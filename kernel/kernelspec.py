"""Install the ``durable-python3`` kernelspec, as ``python -m ipykernel install`` does.

The kernelspec is one folder in the source tree (``kernelspec/durable-python3``:
kernel.json and logos), shipped twice by the wheel: as shared data, which puts
it where Jupyter looks when the package is installed, and inside the package,
where :func:`install` copies it from for other places (``--user``, ``--prefix``).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

KERNEL_NAME = "durable-python3"
DISPLAY_NAME = "Python 3 (durable)"
SPEC_FOLDER = Path(__file__).parent / "kernelspec"


def kernel_dict(display_name: str = DISPLAY_NAME) -> dict:
    """kernel.json for this interpreter: the shipped one, run by ``sys.executable``."""
    spec = json.loads((SPEC_FOLDER / "kernel.json").read_text())
    spec["argv"][0] = sys.executable
    spec["display_name"] = display_name
    return spec


def install(
    user: bool = False,
    prefix: str | None = None,
    name: str = KERNEL_NAME,
    display_name: str = DISPLAY_NAME,
) -> str:
    """Write the kernelspec and install it; returns the folder it went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / name
        shutil.copytree(SPEC_FOLDER, spec)
        (spec / "kernel.json").write_text(json.dumps(kernel_dict(display_name), indent=1) + "\n")
        return KernelSpecManager().install_kernel_spec(str(spec), kernel_name=name, user=user, prefix=prefix)
