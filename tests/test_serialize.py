"""serialize.py on its own: which sharing between variables survives a round trip, and that nothing is lost to it."""

from __future__ import annotations

from durable_kernel.checkpoints.serialize import Loader, snapshot


def round_trip(source: str) -> tuple[dict, dict]:
    """Run ``source`` in a fresh namespace (as a notebook's cells would), snapshot it, load it back."""
    namespace: dict = {}
    exec(source, namespace)
    names = [name for name in namespace if name != "__builtins__"]
    snap = snapshot(namespace, names)
    assert snap.skipped == []
    by_name = {v.name: v for v in snap.variables}
    groups = {v.name: v.members for v in snap.variables if v.members}
    entries = {
        v.name: (
            v.kind,
            v.target,
            lambda v=v: (v.payload, [b for m in v.members or [v.name] for b in by_name[m].buffers]),
        )
        for v in snap.variables
    }
    return Loader(entries, groups=groups).load_all()


def test_list_held_in_a_later_dict_stays_the_same_list():
    values, failed = round_trip("rows = [1, 2]\ntable = {'rows': rows}")
    assert failed == {} and values["table"]["rows"] is values["rows"]


def test_list_held_in_an_earlier_dict_stays_the_same_list():
    values, failed = round_trip("table = {}\nrows = [1, 2]\ntable['rows'] = rows")
    assert failed == {} and values["table"]["rows"] is values["rows"]


def test_containers_holding_each_other_both_come_back():
    values, failed = round_trip("a = []\nb = [a]\na.append(b)")
    assert failed == {}
    assert values["b"][0] is values["a"]


def test_objects_holding_each_other_both_come_back():
    values, failed = round_trip(
        "class Node:\n    pass\nfirst = Node()\nsecond = Node()\nfirst.peer = second\nsecond.peer = first"
    )
    assert failed == {}
    assert values["second"].peer is values["first"]
    assert isinstance(values["first"], values["Node"])


def test_instance_of_a_class_defined_after_it_keeps_that_class():
    values, failed = round_trip("thing = None\nclass Thing:\n    pass\nthing = Thing()")
    assert failed == {} and type(values["thing"]) is values["Thing"]


def test_unshared_containers_are_not_tied_to_each_other():
    values, failed = round_trip("a = [1]\nb = [1]")
    assert failed == {} and values["a"] == values["b"] and values["a"] is not values["b"]
