"""``%checkpoint list`` tells the truth, and stepping through the checkpoints keeps them.

Each row names the cell that made its state (In [n] and the cell's first line) and
what that cell changed: a later cell that changed nothing adds no row and relabels
none; the oldest kept row shows what its own cell changed (recorded when it was
made), not "everything added" once the row before it is pruned; a variable
restored and left alone (a notebook class, a set of strings: pickled differently by
another process) is not shown as changed.  ``%checkpoint undo`` and ``restore`` go
back to kept states, which do not count toward ``keep_generations``: stepping back
and forth never pushes out a checkpoint.
"""

from __future__ import annotations

from conftest import checkpoint_rows, wait_saved

SESSION = "listed.ipynb"


def run(kernel, code: str):
    """Run a cell and let its checkpoint be committed (each cell its own checkpoint)."""
    out = kernel.execute(code)
    assert not out.error, out.error
    wait_saved(kernel)
    return out


def test_later_cells_that_change_nothing_do_not_relabel_the_row(pool):
    kernel = pool.start(session=SESSION)
    run(kernel, "a = 1")
    run(kernel, "print(a)")
    run(kernel, "a")
    rows = checkpoint_rows(kernel)
    assert [(r["id"], r["In"], r["cell"], r["changes"]) for r in rows] == [("1", "1", "a = 1", "+a")]


def test_the_oldest_kept_row_shows_what_its_own_cell_changed(pool):
    kernel = pool.start(session=SESSION)
    for value, name in enumerate("abcdefg"):
        run(kernel, f"{name} = {value}")
    rows = checkpoint_rows(kernel)
    assert [(r["cell"], r["changes"]) for r in rows] == [
        ("g = 6", "+g"),
        ("f = 5", "+f"),
        ("e = 4", "+e"),
        ("d = 3", "+d"),
        ("c = 2", "+c"),
    ]


NOTEBOOK_CLASS = (
    "class Point:\n"
    "    def __init__(self, x):\n"
    "        self.x = x\n"
    "    def get(self):\n"
    "        return self.x\n"
    "\n"
    "origin = Point(0)"
)


def test_a_notebook_class_restored_and_left_alone_is_not_shown_changed(pool):
    before = pool.start(session=SESSION)
    run(before, NOTEBOOK_CLASS)
    before.kill()
    kernel = pool.start(session=SESSION)
    run(kernel, "moved = Point(1)")
    assert checkpoint_rows(kernel)[0]["changes"] == "+moved"


def test_a_set_of_strings_restored_and_left_alone_is_not_shown_changed(pool):
    tags = "tags = {'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'}"
    # Two processes with other string hashes iterate (and pickle) the set in other orders.
    before = pool.start(session=SESSION, env={"PYTHONHASHSEED": "1"})
    run(before, tags)
    order_before = before.value("list(tags)")
    before.kill()
    kernel = pool.start(session=SESSION, env={"PYTHONHASHSEED": "2"})
    run(kernel, "more = 1")  # the first cell after the restore: its checkpoint pickles tags again
    assert kernel.value("list(tags)") != order_before  # else this test would prove nothing
    assert [r["changes"] for r in checkpoint_rows(kernel)] == ["+more", "+tags"]


def x_steps(kernel, last: int = 5) -> None:
    for value in range(1, last + 1):
        run(kernel, f"x = {value}")


def test_undo_steps_back_through_every_kept_checkpoint(pool):
    kernel = pool.start(session=SESSION)
    x_steps(kernel)
    for expected in (4, 3, 2, 1):
        run(kernel, "%checkpoint undo")
        assert kernel.value("x") == str(expected)
    assert {"1", "2", "3", "4", "5"} <= {r["id"] for r in checkpoint_rows(kernel)}


def test_restoring_back_and_forth_pushes_no_checkpoint_out(pool):
    kernel = pool.start(session=SESSION)
    x_steps(kernel)
    for target in (1, 5, 2, 4, 1, 5):
        run(kernel, f"%checkpoint restore {target}")
        assert kernel.value("x") == str(target)
    assert {"1", "2", "3", "4", "5"} <= {r["id"] for r in checkpoint_rows(kernel)}


def test_the_row_an_undo_made_says_which_checkpoint_it_went_back_to(pool):
    kernel = pool.start(session=SESSION)
    x_steps(kernel, 2)
    undo = run(kernel, "%checkpoint undo")
    newest = checkpoint_rows(kernel)[0]
    assert (newest["In"], newest["cell"], newest["changes"]) == (
        str(undo.execution_count),
        "%checkpoint undo",
        "~x (same as 1)",
    )
