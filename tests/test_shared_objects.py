"""An object reachable from two variables is one object after SIGKILL and restart (issue 11, item 1),
whatever order the variables were defined in; variables that share nothing are still saved apart.

One kernel per module builds every case, is killed with SIGKILL after its checkpoint, and a new
kernel on the same notebook is checked, one behaviour per test: the identity holds, and a change
made through one variable is seen through the other.
"""

from __future__ import annotations

import pytest
from conftest import holds, wait_saved

SESSION = "shared.ipynb"

CELLS = [
    "import numpy as np\nimport pandas as pd",
    # a parent defined before its child, and one defined after
    "class Node:\n    def __init__(self, parent=None):\n        self.parent, self.children = parent, []\n"
    "        if parent is not None:\n            parent.children.append(self)\n",
    "root = Node()\nleaf = Node(root)",
    "late_leaf = Node()\nlate_root = Node()\nlate_leaf.parent = late_root\nlate_root.children.append(late_leaf)",
    # a figure-and-axes shape: the container is defined first and holds the part
    "class Figure:\n    def __init__(self):\n        self.axes = [Axes(self)]\n"
    "class Axes:\n    def __init__(self, figure):\n        self.figure, self.title = figure, ''\n"
    "fig = Figure()\nax = fig.axes[0]",
    # a dict of arrays and one of them in its own variable, both orders
    "arrays = {'a': np.zeros(100_000), 'b': np.ones(10)}\nfirst = arrays['a']",
    "later = np.arange(50_000.0)\nholder = {'later': later}",
    "frame = pd.DataFrame({'x': np.arange(1000.0), 'y': np.arange(1000.0) * 2})\ncolumn = frame['y']",
    "base = np.zeros((200, 200))\nwindow = base[10:20, ::2]",
    "a = b = []\nouter = [[1]]\ninner = outer[0]",
    "alone = {'k': list(range(10))}\nnumbers = np.arange(10.0)",
]


@pytest.fixture(scope="module")
def restored(kernel_pools):
    pool = kernel_pools()
    before = pool.start(session=SESSION)
    for cell in CELLS:
        out = before.execute(cell)
        assert not out.error, (cell, out.error)
    wait_saved(before)
    before.kill()
    kernel = pool.start(session=SESSION)
    kernel.pool = pool
    return kernel


def test_a_child_defined_after_its_parent_is_the_parents_child(restored):
    holds(restored, "root.children[0] is leaf and leaf.parent is root")


def test_a_child_defined_before_its_parent_is_the_parents_child(restored):
    holds(restored, "late_root.children[0] is late_leaf and late_leaf.parent is late_root")


def test_axes_taken_from_a_figure_are_the_figures_axes(restored):
    holds(restored, "fig.axes[0] is ax and ax.figure is fig")


def test_a_change_made_through_the_axes_is_seen_through_the_figure(restored):
    out = restored.execute("ax.title = 'changed'\nprint(fig.axes[0].title)")
    assert out.stdout.strip() == "changed"


def test_an_array_taken_from_a_dict_is_the_dicts_array(restored):
    holds(restored, "arrays['a'] is first")
    out = restored.execute("first[0] = 7\nprint(arrays['a'][0])")
    assert out.stdout.strip() == "7.0"


def test_an_array_put_in_a_later_dict_is_the_dicts_array(restored):
    holds(restored, "holder['later'] is later")


def test_a_column_kept_in_a_variable_shares_memory_with_its_frame(restored):
    holds(restored, "np.shares_memory(column.to_numpy(), frame['y'].to_numpy())")
    holds(restored, "column.equals(frame['y'])")


def test_a_view_of_an_array_still_views_it(restored):
    holds(restored, "np.shares_memory(window, base)")
    out = restored.execute("window[0, 0] = 5\nprint(base[10, 0])")
    assert out.stdout.strip() == "5.0"


def test_two_names_for_one_list_are_one_list(restored):
    holds(restored, "a is b")


def test_a_list_inside_a_list_kept_in_a_variable_is_that_list(restored):
    holds(restored, "outer[0] is inner")


def test_variables_that_share_nothing_are_saved_on_their_own(restored):
    notebook = restored.pool.notebook(SESSION)
    latest = notebook.read_manifest(notebook.checkpoint_ids()[0])
    kinds = {v["name"]: (v["kind"], v.get("members")) for v in latest.variables}
    assert kinds["alone"] == ("pickle", None) and kinds["numbers"] == ("pickle", None)
    assert sorted(kinds["fig"][1] or kinds["ax"][1] or []) == ["ax", "fig"]


def test_a_variable_that_shares_nothing_is_not_rewritten_when_a_group_changes(restored):
    notebook = restored.pool.notebook(SESSION)
    before = {v["name"]: v for v in notebook.read_manifest(notebook.checkpoint_ids()[0]).variables}
    assert not restored.execute("fig.axes[0].title = 'again'").error
    wait_saved(restored)
    after = {v["name"]: v for v in notebook.read_manifest(notebook.checkpoint_ids()[0]).variables}
    assert after["alone"]["digest"] == before["alone"]["digest"]
    assert after["numbers"]["digest"] == before["numbers"]["digest"]
