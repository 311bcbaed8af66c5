"""Cell numbers after a restore: a new kernel counts from In [1], and everything agrees.

The rule: a kernel that restored a notebook's variables still numbers its cells from 1,
as every new kernel does.  Clients show the kernel's count (execute_reply and
execute_input) except where they cannot ask: ``jupyter console`` always shows
``In [1]`` as its first prompt, and a notebook's "Restart Kernel and Clear Outputs"
expects [1] next.  What was restored is named by its own kernel's count, said to be
an earlier kernel's: the banner's "as of In [3] of an earlier kernel", and in
``%checkpoint list`` those rows are set apart from this kernel's.  The same rule
through jupyter console and JupyterLab: test_clients_console.py,
test_clients_jupyterlab.py.
"""

from __future__ import annotations

import re

from conftest import checkpoint_list, wait_saved
from durable_kernel.magics import EARLIER_KERNEL

SESSION = "numbers.ipynb"
BEFORE = ["a = 1", "b = 2", "c = a + b"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def restored(pool):
    """A kernel started after the notebook's previous kernel ran BEFORE (In [1] to [3]) and was SIGKILLed."""
    before = pool.start(session=SESSION)
    for cell in BEFORE:
        assert not before.execute(cell).error
        # Each cell its own checkpoint: one still waiting for its turn when the next cell ends is superseded.
        wait_saved(before)
    before.kill()
    return pool.start(session=SESSION)


def traceback_text(out) -> str:
    content = next(m["content"] for m in out.messages if m["msg_type"] == "error")
    return ANSI.sub("", "\n".join(content["traceback"]))


def test_the_cells_after_a_restore_are_in_1_and_in_2(pool):
    kernel = restored(pool)
    assert [kernel.execute(cell).execution_count for cell in ("d = 4", "e = 5")] == [1, 2]


def test_a_traceback_after_a_restore_names_the_cell_as_its_prompt_does(pool):
    kernel = restored(pool)
    out = kernel.execute("1 / 0")
    assert out.error_name == "ZeroDivisionError"
    assert out.execution_count == 1 and "Cell In[1], line 1" in traceback_text(out), traceback_text(out)


def test_in_holds_each_cell_under_the_number_its_reply_gives(pool):
    kernel = restored(pool)
    first = kernel.execute("d = 4")
    assert kernel.value(f"In[{first.execution_count}]") == repr("d = 4")


def test_the_banner_names_the_restored_cell_as_an_earlier_kernels(pool):
    kernel = restored(pool)
    assert "as of In [3] of an earlier kernel: a, b, c" in kernel.banner, kernel.banner


def test_checkpoint_list_sets_the_earlier_kernels_cells_apart_from_this_ones(pool):
    kernel = restored(pool)
    made = kernel.execute("d = 4")
    wait_saved(kernel)
    listed = checkpoint_list(kernel)
    shown = [line if isinstance(line, str) else (line["In"], line["cell"]) for line in listed]
    assert shown == [
        (str(made.execution_count), "d = 4"),
        EARLIER_KERNEL,
        ("3", "c = a + b"),
        ("2", "b = 2"),
        ("1", "a = 1"),
    ]


def test_checkpoint_status_names_an_earlier_kernels_cell_as_such(pool):
    kernel = restored(pool)
    assert "as of In [3] of an earlier kernel," in kernel.execute("%checkpoint").stdout


def test_restoring_an_earlier_kernels_checkpoint_names_its_cell_as_that_kernels(pool):
    kernel = restored(pool)
    out = kernel.execute("%checkpoint restore 1")
    assert out.stdout.startswith("Restored checkpoint 1 (In [1] of an earlier kernel, "), out.stdout
