"""nbclient (and papermill, which runs notebooks through nbclient) under durable-python3.

A first notebook builds variables; nbclient shuts its kernel down at the end.
A second notebook whose cells only read those variables then runs with the same
``DURABLE_KERNEL_SESSION`` and succeeds.  nbclient names no notebook, so without
that variable the identity is the kernel's working folder.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_notebook

KERNELSPEC = {"name": "durable-python3", "display_name": "Python 3 (durable)", "language": "python"}

BUILD = [
    "import math",
    "radius = 2.0\narea = math.pi * radius ** 2",
    "records = [{'id': i, 'square': i * i} for i in range(5)]",
    "def describe(r):\n    return f\"{len(r)} records, last square {r[-1]['square']}\"",
]
READ_ONLY = [
    "assert round(area, 3) == 12.566, area",
    "print(describe(records))",
    "print(math.sqrt(radius ** 2))",
]


@pytest.fixture
def nb_env(tmp_path: Path, jupyter_dirs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """nbclient starts kernels with this process's environment: make all of it private."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter-config"))
    folder = tmp_path / "notebooks"
    folder.mkdir()
    return folder


def notebook(cells: list[str], path: Path) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_code_cell(c) for c in cells], metadata={"kernelspec": KERNELSPEC})
    nbformat.write(nb, path)
    return nb


def run(path: Path) -> nbformat.NotebookNode:
    """Execute a notebook file as ``jupyter execute`` does; returns the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb,
        kernel_name="durable-python3",
        timeout=120,
        startup_timeout=60,
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return nb


def text_of(nb: nbformat.NotebookNode, stream: str = "stdout") -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == stream
    )


@pytest.mark.slow
def test_second_notebook_with_the_same_session_reads_the_first_ones_variables(nb_env, monkeypatch):
    monkeypatch.setenv("DURABLE_KERNEL_SESSION", "pipeline")
    built = run_and_check(nb_env / "build.ipynb", BUILD)
    assert "no saved state for pipeline" not in text_of(built, "stderr")  # said in the banner only

    read = run_and_check(nb_env / "read.ipynb", READ_ONLY)
    assert text_of(read) == "5 records, last square 16\n2.0\n"
    assert text_of(read, "stderr").startswith("durable-kernel: restored 5 variables for pipeline, saved "), text_of(
        read, "stderr"
    )
    assert "area, describe, math, radius, records" in text_of(read, "stderr")

    monkeypatch.setenv("DURABLE_KERNEL_SESSION", "another-pipeline")
    with pytest.raises(CellExecutionError, match="NameError"):
        run(nb_env / "read.ipynb")


@pytest.mark.slow
def test_without_a_session_notebooks_in_one_folder_share_the_folders_state(nb_env, tmp_path):
    run_and_check(nb_env / "build.ipynb", BUILD)
    read = run_and_check(nb_env / "read.ipynb", READ_ONLY)
    assert f"restored 5 variables for {nb_env}, " in text_of(read, "stderr")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    notebook(READ_ONLY, elsewhere / "read.ipynb")
    with pytest.raises(CellExecutionError, match="NameError"):
        run(elsewhere / "read.ipynb")


def run_and_check(path: Path, cells: list[str]) -> nbformat.NotebookNode:
    notebook(cells, path)
    nb = run(path)
    errors = [out for cell in nb.cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    return nb


@pytest.mark.slow
def test_papermill_parameters_are_saved_for_the_next_notebook(nb_env, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("DURABLE_KERNEL_SESSION", "papermill-run")
    template = new_notebook(
        metadata={"kernelspec": KERNELSPEC},
        cells=[
            new_code_cell("alpha = 0.5\nlabel = 'default'", metadata={"tags": ["parameters"]}),
            new_code_cell("scaled = [alpha * n for n in range(4)]"),
        ],
    )
    nbformat.write(template, nb_env / "template.ipynb")
    papermill.execute_notebook(
        str(nb_env / "template.ipynb"),
        str(nb_env / "template-out.ipynb"),
        parameters={"alpha": 2.0, "label": "from papermill"},
        kernel_name="durable-python3",
        cwd=str(nb_env),
        progress_bar=False,
        log_output=False,
    )
    read = run_and_check(nb_env / "read-params.ipynb", ["print(alpha, label, scaled)"])
    assert text_of(read) == "2.0 from papermill [0.0, 2.0, 4.0, 6.0]\n"
