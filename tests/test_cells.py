"""What a cell read and assigned, from its source (kernel/cells.py), and which cells make a name again."""

from __future__ import annotations

from durable_kernel.cells import CellRecord, chain_for, names_of


def test_an_assignment_reads_its_value_before_it_assigns_its_target():
    assert names_of("y = x + 1") == (["x"], ["y"])


def test_a_name_assigned_earlier_in_the_cell_is_not_an_input():
    assert names_of("x = 1\ny = x + z") == (["z"], ["x", "y"])


def test_an_augmented_assignment_reads_the_name_first():
    assert names_of("total += step") == (["step", "total"], ["total"])


def test_imports_assign_the_top_name_or_the_alias():
    assert names_of("import os.path\nimport numpy as np\nfrom a import b as c") == ([], ["os", "np", "c"])


def test_a_function_body_is_not_read_when_defined_but_its_globals_are_assigned():
    reads, binds = names_of("def f(a=default):\n    global g\n    g = a + later\n    return hidden")
    assert reads == ["default"] and binds == ["g", "f"]


def test_a_class_body_runs_at_once_so_its_free_names_are_inputs():
    assert names_of("class C(Base):\n    size = width * 2") == (["Base", "width"], ["C"])


def test_comprehension_variables_stay_inside_the_comprehension():
    assert names_of("squares = [i * k for i in items if i]") == (["items", "k"], ["squares"])


def test_builtins_are_not_inputs():
    assert names_of("n = len(range(3))") == ([], ["n"])


def test_del_makes_nothing():
    assert names_of("del x") == ([], [])


def test_a_cell_that_does_not_parse_has_no_names():
    assert names_of("x = (") is None


def _records(*cells: tuple[str, list[str], list[str]]) -> list[CellRecord]:
    return [CellRecord(i + 1, source, reads, binds) for i, (source, reads, binds) in enumerate(cells)]


def test_the_chain_is_the_makers_of_the_wanted_name_and_of_its_missing_inputs_in_order():
    records = _records(
        ("path = 'db'", [], ["path"]),
        ("conn = connect(path)", ["connect", "path"], ["conn"]),
        ("other = 1", [], ["other"]),
        ("cur = conn.cursor()", ["conn"], ["cur"]),
    )
    cells, missing = chain_for(["cur"], records, available=["path", "connect", "other"], makeable=["conn"])
    assert [c.execution_count for c in cells] == [2, 4] and missing == {}


def test_an_input_deleted_since_stops_the_chain_and_runs_nothing():
    records = _records(("seed = 1", [], ["seed"]), ("lock = make(seed)", ["make", "seed"], ["lock"]))
    cells, missing = chain_for(["lock"], records, available=["make"])
    assert cells == [] and "seed, which is gone" in missing["lock"]


def test_a_maker_that_failed_is_not_run_again():
    records = [CellRecord(1, "lock = make()", ["make"], ["lock"], ok=False)]
    cells, missing = chain_for(["lock"], records, available=["make"])
    assert cells == [] and "failed when it ran" in missing["lock"]


def test_the_maker_of_an_input_is_the_last_cell_before_the_one_reading_it():
    records = _records(
        ("x = 1", [], ["x"]),
        ("y = f(x)", ["f", "x"], ["y"]),
        ("x = 2", [], ["x"]),
    )
    cells, _ = chain_for(["y"], records, available=["f"], makeable=["x"])
    assert [c.execution_count for c in cells] == [1, 2]
