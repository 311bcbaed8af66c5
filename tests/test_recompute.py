"""What cannot be saved is made again from the cells that made it (issue 11, items 3 and 4).

A database connection and its cursor cannot be pickled.  After SIGKILL and a restart the notice
names the cells that make them; ``%checkpoint recompute`` runs them again from the restored
inputs; with ``recompute = "auto"`` safe cells run at start.  The "not saved" warning is output
of the cell that made the variable, not of whichever cell runs next.
"""

from __future__ import annotations

from conftest import holds, wait_saved

CELLS = [
    "import sqlite3",
    "path = ':memory:'\nconn = sqlite3.connect(path)",
    "conn.execute('create table t (x)')\nrows = 3",
    "cur = conn.cursor()",
]
AUTO = ["--DurableKernel.recompute=auto"]


def build_and_kill(start_kernel, session: str, cells: list[str] = CELLS, **kwargs):
    kernel = start_kernel(session=session, **kwargs)
    outputs = []
    for cell in cells:
        out = kernel.execute(cell)
        assert not out.error, (cell, out.error)
        outputs.append(out)
    wait_saved(kernel)
    kernel.kill()
    return outputs


def test_the_restore_notice_names_the_cells_that_make_an_unsaved_variable_again(start_kernel):
    build_and_kill(start_kernel, "notice.ipynb")
    banner = start_kernel(session="notice.ipynb").banner
    assert (
        "conn was not saved (sqlite3.Connection); `%checkpoint recompute conn` re-runs "
        "an earlier kernel's In [2]: path = ':memory:' …" in banner
    ), banner
    assert (
        "`%checkpoint recompute cur` re-runs an earlier kernel's In [2]: path = ':memory:' …; an earlier kernel's In [4]: cur = conn.cursor()"
        in banner
    )


def test_checkpoint_recompute_makes_the_missing_variables_again_and_shows_what_it_ran(start_kernel):
    build_and_kill(start_kernel, "magic.ipynb")
    kernel = start_kernel(session="magic.ipynb")
    out = kernel.execute("%checkpoint recompute")
    assert not out.error, out.error
    assert (
        "re-ran an earlier kernel's In [2]: path = ':memory:' …\nre-ran an earlier kernel's In [4]: cur = conn.cursor()"
        in out.stdout
    ), out.stdout
    assert "made again: conn, cur" in out.stdout, out.stdout
    holds(kernel, "cur.connection is conn and conn.execute('select 1').fetchone() == (1,)")


def test_recompute_puts_back_a_restored_variable_the_cell_also_assigns(start_kernel):
    cells = ["import threading", "lock = threading.Lock()\ncount = 1", "count = 5"]
    build_and_kill(start_kernel, "keep.ipynb", cells)
    kernel = start_kernel(session="keep.ipynb")
    assert not kernel.execute("%checkpoint recompute lock").error
    holds(kernel, "count == 5 and lock.acquire(blocking=False)")


def test_a_variable_whose_cell_read_something_gone_is_not_recomputed_and_the_notice_says_why(start_kernel):
    cells = ["import threading", "seed = 1", "lock = threading.Lock() if seed else None", "del seed"]
    build_and_kill(start_kernel, "gone.ipynb", cells)
    kernel = start_kernel(session="gone.ipynb")
    assert "lock was not saved (_thread.lock) and cannot be recomputed" in kernel.banner, kernel.banner
    out = kernel.execute("%checkpoint recompute lock")
    assert "lock cannot be recomputed: " in out.stdout and "seed" in out.stdout, out.stdout
    assert "re-ran" not in out.stdout


def test_recompute_auto_runs_quick_cells_that_make_only_what_is_missing_and_lists_them(start_kernel):
    cells = ["import sqlite3", "path = ':memory:'", "conn = sqlite3.connect(path)", "cur = conn.cursor()"]
    build_and_kill(start_kernel, "auto.ipynb", cells, extra_arguments=AUTO)
    kernel = start_kernel(session="auto.ipynb", extra_arguments=AUTO)
    ran = "an earlier kernel's In [3]: conn = sqlite3.connect(path); an earlier kernel's In [4]: cur = conn.cursor()"
    assert f"made conn, cur again by running {ran}" in kernel.banner, kernel.banner
    holds(kernel, "cur.connection is conn")


def test_recompute_auto_does_not_run_a_cell_that_also_assigns_restored_variables(start_kernel):
    cells = ["import threading", "lock = threading.Lock()\ncount = 1", "count = 5"]
    build_and_kill(start_kernel, "auto-unsafe.ipynb", cells, extra_arguments=AUTO)
    kernel = start_kernel(session="auto-unsafe.ipynb", extra_arguments=AUTO)
    assert "an earlier kernel's In [2] was not run again at start: it also assigns count" in kernel.banner, (
        kernel.banner
    )
    holds(kernel, "'lock' not in globals() and count == 5")


def test_the_history_of_cells_survives_more_than_one_restart(start_kernel):
    build_and_kill(start_kernel, "twice.ipynb")
    again = start_kernel(session="twice.ipynb")
    assert not again.execute("more = 1").error
    wait_saved(again)
    again.kill()
    kernel = start_kernel(session="twice.ipynb")
    assert not kernel.execute("%checkpoint recompute cur").error
    holds(kernel, "cur.connection is conn and more == 1")


def test_the_not_saved_warning_is_output_of_the_cell_that_made_the_variable(start_kernel):
    kernel = start_kernel(session="placement.ipynb")
    made = kernel.execute("import threading\nlock = threading.Lock()")
    later = kernel.execute("x = 1")
    wait_saved(kernel)
    after = kernel.execute("y = 2")
    assert "not saved: lock (_thread.lock: TypeError: cannot pickle '_thread.lock' object)" in kernel.stderr_of(made)
    assert "not saved" not in kernel.stderr_of(later) + after.stderr
