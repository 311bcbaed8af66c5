"""A notebook's variables come back, equal, after a clean restart and after SIGKILL.

One kernel defines every kind of value a user keeps, its checkpoint is
committed, the kernel ends (clean shutdown, or SIGKILL: no chance for a last
save), and a new kernel for the same notebook starts.  Each test checks one
kind of value, or one thing the user is told, in that restored kernel.
"""

from __future__ import annotations

import os

import pytest
from conftest import holds, wait_saved

SESSION = "roundtrip.ipynb"

CELLS = [
    "import numpy as np\nimport pandas as pd",
    "i = 42\nbig = 2 ** 100\nf = 0.1 + 0.2\nneg_inf = float('-inf')",
    "s = 'héllo\\nwörld ✓'\nby = b'\\x00\\xffraw bytes'",
    "d = {'a': 1, 'nested': {'b': [1, 2]}, 3: None}\nl = [1, 'two', 3.0, None, (4, 5)]\nst = {1, 2, 3}",
    "arr = np.arange(100_000, dtype=np.float64).reshape(1000, 100)\nsmall = np.array([1, -2, 3], dtype=np.int16)",
    "df = pd.DataFrame({'x': [1, 2, 3], 'y': ['a', 'b', 'c'], 'z': [0.5, None, 2.5]})",
    "def square(n):\n    return n * n\n\ndef times_i(n):\n    return n * i",
    "cube = lambda n: n ** 3",
    "def make_counter(start):\n    count = start\n    def step():\n        nonlocal count\n"
    "        count += 1\n        return count\n    return step\n\ncounter = make_counter(10)\ncounter()",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
    "    def norm2(self):\n        return self.x ** 2 + self.y ** 2\n\np = Point(3, 4)",
]
VARIABLES = sorted(
    "np pd i big f neg_inf s by d l st arr small df square times_i cube make_counter counter Point p".split()
)


@pytest.fixture(scope="module", params=["clean restart", "SIGKILL"])
def restored(request, kernel_pools):
    """A kernel restored after the notebook's kernel ended as the param says, with the
    outputs of its first two user cells (run before any test looks at it)."""
    pool = kernel_pools()
    before = pool.start(session=SESSION)
    for cell in CELLS:
        out = before.execute(cell)
        assert not out.error, (cell, out.error)
    last_count = out.execution_count
    wait_saved(before)
    if request.param == "SIGKILL":
        before.kill()
    else:
        before.shutdown()
    kernel = pool.start(session=SESSION)
    kernel.first = kernel.execute("first_cell = 1")
    kernel.second = kernel.execute("second_cell = 2")
    kernel.last_count_before = last_count
    return kernel


# --- values -------------------------------------------------------------------


def test_ints_come_back_equal(restored):
    assert restored.value("(i, big)") == repr((42, 2**100))


def test_floats_come_back_equal(restored):
    assert restored.value("(f, neg_inf)") == repr((0.1 + 0.2, float("-inf")))


def test_str_comes_back_equal(restored):
    assert restored.value("s") == repr("héllo\nwörld ✓")


def test_bytes_come_back_equal(restored):
    assert restored.value("by") == repr(b"\x00\xffraw bytes")


def test_dict_comes_back_equal(restored):
    holds(restored, "d == {'a': 1, 'nested': {'b': [1, 2]}, 3: None} and type(d) is dict")


def test_list_comes_back_equal(restored):
    holds(restored, "l == [1, 'two', 3.0, None, (4, 5)] and type(l) is list")


def test_set_comes_back_equal(restored):
    holds(restored, "st == {1, 2, 3} and type(st) is set")


def test_numpy_arrays_come_back_equal_with_dtype_and_shape(restored):
    holds(restored, "np.array_equal(arr, np.arange(100_000, dtype=np.float64).reshape(1000, 100))")
    holds(restored, "arr.dtype == np.float64 and arr.shape == (1000, 100)")
    holds(restored, "small.dtype == np.int16 and small.tolist() == [1, -2, 3]")


def test_pandas_dataframe_comes_back_equal(restored):
    holds(restored, "df.equals(pd.DataFrame({'x': [1, 2, 3], 'y': ['a', 'b', 'c'], 'z': [0.5, None, 2.5]}))")
    holds(
        restored,
        "list(df.dtypes.astype(str)) == list(pd.DataFrame({'x': [1], 'y': ['a'], 'z': [0.5]}).dtypes.astype(str))",
    )


def test_function_defined_in_the_notebook_still_works(restored):
    assert restored.value("square(7)") == "49"


def test_restored_function_reads_the_live_globals(restored):
    assert restored.value("times_i(2)") == "84"
    restored.execute("i = 1000")
    assert restored.value("times_i(2)") == "2000"
    restored.execute("i = 42")


def test_lambda_still_works(restored):
    assert restored.value("cube(3)") == "27"


def test_closure_keeps_its_captured_state(restored):
    # counter() was called once before the restart (11); the next call gives 12.
    assert restored.value("counter()") == "12"


def test_class_defined_in_the_notebook_still_works(restored):
    assert restored.value("Point(1, 2).norm2()") == "5"


def test_instance_of_a_notebook_class_comes_back_as_an_instance_of_that_class(restored):
    holds(restored, "type(p) is Point and (p.x, p.y) == (3, 4) and p.norm2() == 25")


def test_imported_module_aliases_are_the_real_modules(restored):
    holds(restored, "np is __import__('sys').modules['numpy'] and pd is __import__('sys').modules['pandas']")


def test_every_variable_comes_back(restored):
    names = restored.value("sorted(get_ipython().run_line_magic('who_ls', ''))")
    assert names == repr(sorted([*VARIABLES, "first_cell", "second_cell"]))


# --- what the user is told ------------------------------------------------------


def test_banner_tells_how_many_variables_came_back_and_as_of_which_cell(restored):
    assert f"durable-kernel: restored {len(VARIABLES)} variables for {SESSION}, saved " in restored.banner, (
        restored.banner
    )
    assert f"as of In [{restored.last_count_before}] of an earlier kernel: " in restored.banner
    assert "arr, big, by, counter, cube, d, df," in restored.banner


def test_first_user_cell_shows_the_restore_notice_on_stderr(restored):
    assert not restored.first.error
    assert restored.first.stderr.startswith(f"durable-kernel: restored {len(VARIABLES)} variables for {SESSION}")


def test_second_user_cell_does_not_repeat_the_restore_notice(restored):
    assert restored.second.stderr == ""


def test_execution_count_starts_again_at_1_after_restore(restored):
    # A new kernel counts from 1, as clients expect (test_cell_numbers.py says why).
    assert (restored.first.execution_count, restored.second.execution_count) == (1, 2)


# --- the last cell before a shutdown ---------------------------------------------------

#: On the kernel's PYTHONPATH: the memory check that runs after the reply is sent and before the
#: fork takes half a second, so a shutdown sent as soon as the reply arrives lands in that gap.
_SLOW_FORK = """
import time
import durable_kernel.background as background

_check = background.memory_for_fork

def memory_for_fork(margin):
    time.sleep(0.5)
    return _check(margin)

background.memory_for_fork = memory_for_fork
"""


def test_shutdown_sent_the_moment_the_last_reply_arrives_still_saves_that_cell(start_kernel, tmp_path):
    """papermill and nbclient shut the kernel down as soon as the last cell's reply arrives,
    before the kernel has forked that cell's checkpoint: the shutdown must wait for it."""
    inject = tmp_path / "slow-fork"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_SLOW_FORK)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))}
    kernel = start_kernel(session="shutdown-race.ipynb", env=env)
    # Saving it takes a second, far longer than the kernel takes to exit if nobody waits.
    slow = (
        "import time\nclass SlowToSave:\n    def __reduce__(self):\n        time.sleep(1)\n"
        "        return (str, ('the cell just before the shutdown',))\nlast = SlowToSave()"
    )
    assert not kernel.execute(slow).error
    kernel.shutdown()
    assert start_kernel(session="shutdown-race.ipynb").value("last") == "'the cell just before the shutdown'"
