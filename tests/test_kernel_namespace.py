"""The restored namespace mirrors the live one: sharing, deletions, failures, unpicklables.

A notebook runs the cells below, its last checkpoint is committed, the kernel
is killed with SIGKILL and a new kernel restores it.  Each test checks one
rule of what "the same namespace" means.
"""

from __future__ import annotations

import pytest
from conftest import holds, user_variables, wait_saved

SESSION = "namespace.ipynb"


@pytest.fixture(scope="module")
def session(kernel_pools):
    """The notebook's kernel outputs before the kill, and the restored kernel."""
    pool = kernel_pools()
    before = pool.start(session=SESSION)
    outputs = {}
    for name, cell in [
        ("alias", "a = b = []\na.append('shared')"),
        ("nested", "rows = []\ntable = {'rows': rows}\nrows.append('row 1')"),
        ("array", "import numpy as np\nvec = np.zeros(3)\nholder = {'vec': vec}"),
        ("doomed", "doomed = 'about to be deleted'"),
        ("del", "del doomed"),
        ("unpicklable", "import threading\nlock = threading.Lock()\ngen = (n for n in range(3))\nkept = 'kept'"),
        ("after unpicklable", "pass"),
    ]:
        outputs[name] = before.execute(cell)
        assert not outputs[name].error, (cell, outputs[name].error)
        wait_saved(before)  # so the cell's checkpoint has told its outcome
    outputs["unpicklable"].stderr = before.stderr_of(outputs["unpicklable"])
    # The last cell before the kill fails half-way.
    outputs["failed"] = before.execute("set_before_error = 'kept'\nraise ValueError('the cell fails')")
    assert outputs["failed"].error == "ValueError: the cell fails"
    wait_saved(before)
    before.kill()
    after = pool.start(session=SESSION)
    return outputs, after


def test_variables_bound_to_one_object_stay_one_object(session):
    _, kernel = session
    holds(kernel, "a is b and a == ['shared']")


def test_container_shared_inside_another_variable_stays_shared(session):
    _, kernel = session
    holds(kernel, "table['rows'] is rows")


def test_array_shared_inside_another_variable_stays_shared(session):
    _, kernel = session
    holds(kernel, "holder['vec'] is vec")


def test_deleted_variable_stays_deleted(session):
    _, kernel = session
    assert "doomed" not in user_variables(kernel)
    holds(kernel, "'doomed' not in globals()")


def test_unpicklable_variables_are_named_with_their_reason_under_the_cell_that_made_them(session):
    outputs, _ = session
    assert "not saved" not in outputs["after unpicklable"].stderr
    stderr = outputs["unpicklable"].stderr
    assert "durable-kernel: not saved: " in stderr
    assert "lock (_thread.lock: TypeError: cannot pickle '_thread.lock' object)" in stderr
    assert "gen (builtins.generator: TypeError: cannot pickle 'generator' object)" in stderr


def test_unpicklable_variables_are_named_with_their_reason_at_restore(session):
    _, kernel = session
    notice = [line for line in kernel.banner.splitlines() if line.startswith("durable-kernel: not restored: ")]
    assert len(notice) == 1, kernel.banner
    assert "lock (TypeError: cannot pickle '_thread.lock' object)" in notice[0]
    assert "gen (TypeError: cannot pickle 'generator' object)" in notice[0]


def test_unpicklable_variables_cost_the_others_nothing(session):
    _, kernel = session
    names = user_variables(kernel)
    assert "lock" not in names and "gen" not in names
    assert kernel.value("kept") == "'kept'"
    assert kernel.value("threading.__name__") == "'threading'"


def test_failed_cell_is_still_checkpointed(session):
    _, kernel = session
    assert kernel.value("set_before_error") == "'kept'"
