"""The file format is frozen: a store written by any release loads, exactly, with the current code.

tests/fixtures/format-<version>/ is a small store that release wrote
(tests/fixtures/make_format_store.py, run with that release installed): one
notebook, two checkpoints, every kind of stored variable (inline pickles, a
pickle blob, a raw buffer, dill-pickled notebook functions and a notebook
class, modules, an alias, a shared container, a skipped generator).  These
files are never rewritten.  If a change makes one of them load differently,
users' checkpoints would too: keep reading the old format (a format change
bumps the manifest schema and keeps the reader of the old one).

Notebook functions and classes are stored as bytecode, which runs only on the
Python minor version that wrote it (the fixtures: 3.11).  On that version they
must come back and work; on any other they must come back "not restored" with
the reason, and cost nothing else (test_notebook_code_from_another_python_...).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import pickletools
import shutil
import sys
from pathlib import Path

import blake3
import numpy as np
import pytest
from conftest import checkpoint_rows, holds, user_variables, wait_saved
from durable_kernel.checkpoints import NotRestored, Store, load_or_create_key, snapshot
from durable_kernel.checkpoints import manifest as manifest_format

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASES = sorted(p.name.removeprefix("format-") for p in FIXTURES.glob("format-*"))
IDENTITY = "format-fixture.ipynb"

#: What cell 1 left (checkpoint 1); cell 3 deleted ``draft`` and set ``revision = 2``.
CELL_1 = {
    "answer": 42,
    "ratio": 0.1 + 0.2,
    "greeting": "héllo, wörld ✓",
    "settings": {"depth": 3, "tags": ["a", "b"], None: (1, 2)},
    "pair": (1, "two", 3.0),
    "nothing": None,
    "raw": b"\x00\x01binary\xff",
    "primes": {2, 3, 5, 7},
    "draft": "first draft",
    "revision": 1,
}
#: Defined in the notebook (bytecode), or holding something that is.
NOTEBOOK_CODE = {"square", "describe", "halve", "make_counter", "tally", "Point", "where", "path", "toolbox"}
NEWEST = (set(CELL_1) - {"draft"}) | {"js", "np", "big_list", "same", "rows", "table", "wave", "small"} | NOTEBOOK_CODE

#: What a stored pickle may call in durable_kernel, by module path (the file format's
#: frozen names; see "what stored pickles reference" in checkpoints/serialize.py).
FROZEN_NAMES = {
    "durable_kernel.checkpoints.serialize.load_dill",
    "durable_kernel.checkpoints.serialize.import_module",
    "durable_kernel.checkpoints.serialize.variable",
    "durable_kernel.checkpoints.serialize.NotRestored",
    # 0.3: views kept as views, tensors sharing a storage
    "durable_kernel.checkpoints.serialize.ndarray_view",
    "durable_kernel.checkpoints.serialize.torch_tensor",
    # how 0.1.0 wrote the first three
    "durable_kernel.checkpoints.serialize._loads_dill",
    "durable_kernel.checkpoints.serialize._import_module",
    "durable_kernel.checkpoints.serialize._variable_ref",
    # notebook code pickled by value (0.3+): load_notebook_code's argument is a pickle calling the others
    "durable_kernel.checkpoints.serialize.load_notebook_code",
    *(
        f"durable_kernel.checkpoints.notebook_code.{name}"
        for name in (
            "make_code",
            "make_cell",
            "make_function",
            "set_function_state",
            "make_class",
            "make_enum",
            "set_class_state",
            "make_lru_cache",
            "make_typevar",
        )
    ),
}

#: Notebook code of every kind notebook_code.py pickles, for the pickles written now.
NOTEBOOK_CELLS = """
import dataclasses, enum, functools, typing
T = typing.TypeVar("T")
class Color(enum.Enum):
    RED = 1
@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    tags: list = dataclasses.field(default_factory=list)
class Pair(typing.NamedTuple):
    left: int
class Box(typing.Generic[T]):
    __slots__ = ("item",)
    @property
    def first(self):
        return self.item
    @classmethod
    def make(cls):
        return cls()
@functools.lru_cache(maxsize=8)
def fib(n):
    return n
def make_counter():
    count = 0
    def step():
        nonlocal count
        count += 1
        return count
    return step
counter = make_counter()
instances = [Color.RED, Point(1), Pair(2), fib, counter]
"""


# --- helpers ------------------------------------------------------------------------


def copy_fixture(release: str, dest: Path, kind: str = "format") -> Path:
    """A copy of a release's fixture with a real store's modes (git keeps none): folders 0700, files 0600."""
    shutil.copytree(FIXTURES / f"{kind}-{release}", dest)
    for folder, _, files in os.walk(dest):
        os.chmod(folder, 0o700)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o600)
    return dest


def open_notebook(copy: Path):
    key = load_or_create_key(copy / "durable_kernel_secret")
    return Store(copy / "store", key).notebook(IDENTITY)


def manifest_json(release: str, generation: int = 2) -> dict:
    """A fixture's manifest, as stored (read from the checked-in files, unverified)."""
    folder = FIXTURES / f"format-{release}" / "store" / manifest_format.folder_name(IDENTITY)
    raw = (folder / "manifests" / f"{generation:012d}.manifest").read_bytes()
    return json.loads(manifest_format.body_of(raw))


def written_by(release: str) -> str:
    """The Python minor version that wrote a fixture (its notebook code is that version's bytecode)."""
    return ".".join(manifest_json(release)["versions"]["python"].split(".")[:2])


RUNNING = f"{sys.version_info[0]}.{sys.version_info[1]}"


def needs_its_python(release: str) -> None:
    if written_by(release) != RUNNING:
        pytest.skip(
            f"the {release} fixture's notebook code is Python {written_by(release)} bytecode, which cannot run on "
            f"Python {RUNNING}; test_notebook_code_from_another_python_is_not_restored_and_costs_nothing_else "
            "checks what happens instead"
        )


def stored_pickles(release: str):
    """``(generation, variable name, pickle bytes)`` of every stored pickle of a fixture."""
    folder = FIXTURES / f"format-{release}" / "store" / manifest_format.folder_name(IDENTITY)
    for generation in (1, 2):
        for var in manifest_json(release, generation)["variables"]:
            if var["kind"] != "pickle":
                continue
            if "inline" in var:
                payload = base64.b64decode(var["inline"])
            else:
                payload = (folder / "blobs" / var["digest"][:2] / var["digest"]).read_bytes()
            yield generation, var["name"], payload


def referenced_globals(payload: bytes, found: set[str] | None = None) -> set[str]:
    """``module.name`` of every global a pickle looks up when it loads, read without loading it;
    dill payloads nested in it (bytes that are pickles themselves) included."""
    found = set() if found is None else found
    pushed: list = []  # what each opcode pushed: the str for strings, else None
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(payload):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = pushed[-1]
        elif op.name == "STACK_GLOBAL":
            found.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(None)
        elif op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
            pushed.append(None)
        else:
            if op.name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8") and _is_pickle(arg):
                referenced_globals(arg, found)  # a dill payload: load_dill's argument
            if op.stack_after:
                pushed.append(None)
    return found


def _is_pickle(data: bytes) -> bool:
    if data[:1] != b"\x80":
        return False
    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError:
        return False  # bytecode, a line table: bytes that only start like a pickle
    return True


def resolve(reference: str):
    """The object ``module.name`` (name may be dotted) stands for, as an unpickler would find it."""
    parts = reference.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise ImportError(reference)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(params=RELEASES)
def release(request) -> str:
    return request.param


@pytest.fixture
def notebook(release, tmp_path):
    return open_notebook(copy_fixture(release, tmp_path / "fixture"))


@pytest.fixture
def restored(notebook):
    """The newest checkpoint of the fixture, loaded by the current code."""
    return notebook.load_latest()


@pytest.fixture
def values(restored):
    return restored.values


# --- what is checked in ---------------------------------------------------------------


def test_the_released_format_has_a_fixture():
    assert "0.1.0" in RELEASES


def test_fixture_is_small(release):
    size = sum(p.stat().st_size for p in (FIXTURES / f"format-{release}").rglob("*") if p.is_file())
    assert size < 256 * 1024


def test_fixture_holds_every_kind_of_stored_variable(release):
    variables = {v["name"]: v for v in manifest_json(release)["variables"]}
    assert "inline" in variables["answer"]  # a small pickle inside the manifest
    assert "inline" not in variables["big_list"]  # a pickle blob
    assert [b["size"] for b in variables["wave"]["buffers"]] == [64 * 1024]  # a raw buffer blob
    assert "buffers" not in variables["small"]  # an array kept inside its pickle
    assert (variables["js"]["kind"], variables["js"]["target"]) == ("module", "json")
    assert (variables["same"]["kind"], variables["same"]["target"]) == ("alias", "big_list")
    assert {s["name"] for s in manifest_json(release)["skipped"]} == {"squares"}


def test_stored_pickles_call_only_the_frozen_names_of_durable_kernel(release):
    called = set()
    for _, _, payload in stored_pickles(release):
        called |= {g for g in referenced_globals(payload) if g.startswith("durable_kernel")}
    assert called and called <= FROZEN_NAMES


def test_the_0_1_0_fixture_calls_the_names_0_1_0_wrote():
    called = set()
    for _, _, payload in stored_pickles("0.1.0"):
        called |= {g for g in referenced_globals(payload) if g.startswith("durable_kernel")}
    serialize = "durable_kernel.checkpoints.serialize."
    assert called == {serialize + "_loads_dill", serialize + "_import_module", serialize + "_variable_ref"}


def test_pickles_written_now_call_only_the_frozen_names_of_durable_kernel():
    namespace: dict = {"__name__": "__main__"}
    exec(NOTEBOOK_CELLS, namespace)
    snap = snapshot(namespace, [name for name in namespace if not name.startswith("__")])
    assert snap.skipped == []
    called = set().union(*(referenced_globals(v.payload) for v in snap.variables if v.kind == "pickle"))
    ours = {g for g in called if g.startswith("durable_kernel")}
    assert "durable_kernel.checkpoints.serialize.load_notebook_code" in ours and ours <= FROZEN_NAMES, (
        ours - FROZEN_NAMES
    )
    for reference in called:
        resolve(reference)


def test_notebook_code_written_now_by_another_python_is_not_restored_and_costs_nothing_else(tmp_path):
    """What notebook_code.py stores is bytecode too: refused on another Python minor version, like dill's."""
    namespace: dict = {"__name__": "__main__"}
    exec(NOTEBOOK_CELLS + "\nanswer = 42", namespace)
    names = [name for name in namespace if not name.startswith("__")]
    nb = Store(tmp_path / "store", load_or_create_key(tmp_path / "key")).notebook(IDENTITY)
    nb.commit(snapshot(namespace, names), execution_count=1, cell="notebook code")
    assert set(nb.load_latest().values) == set(names)  # on this Python, everything comes back
    raw = nb.manifest_path(1).read_bytes()
    data = json.loads(manifest_format.body_of(raw))
    other = f"3.{sys.version_info[1] - 1}"
    data["versions"]["python"] = other + ".0"
    for entry in data["variables"]:
        entry.pop("python", None)
    nb.manifest_path(1).write_bytes(manifest_format.encode(data, nb.store.key))
    restored = nb.load(1)
    reasons = {s.name: s.reason for s in restored.not_restored}
    assert {"Color", "Point", "Box", "fib", "counter", "T"} <= set(reasons), reasons
    assert f"Python {other}" in reasons["Color"] and restored.values["answer"] == 42


def test_every_name_a_stored_pickle_calls_still_exists(release):
    # dill's Unpickler itself answers __builtin__.__main__ (the restoring process's __main__).
    called = set().union(*(referenced_globals(p) for _, _, p in stored_pickles(release))) - {"__builtin__.__main__"}
    missing = []
    for reference in sorted(called):
        try:
            resolve(reference)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{reference} ({exc})")
    assert not missing, f"stored pickles call names that no longer exist: {missing}"


def test_blobs_are_named_by_the_blake3_digest_of_their_bytes(release):
    blobs = FIXTURES / f"format-{release}" / "store" / manifest_format.folder_name(IDENTITY) / "blobs"
    files = [p for p in blobs.rglob("*") if p.is_file()]
    assert len(files) == 3
    for path in files:
        assert path.name == blake3.blake3(path.read_bytes()).hexdigest() and path.parent.name == path.name[:2]


def release_tuple(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in release.split("."))


def test_manifest_holds_the_documented_fields(release):
    data = manifest_json(release)
    fields = {
        "schema",
        "generation",
        "created",
        "execution_count",
        "identity",
        "cell",
        "writer",
        "versions",
        "variables",
        "skipped",
    }
    schema = 1
    if release_tuple(release) >= (0, 3, 0):  # groups (schema 2), what the cell changed, who ran it
        fields |= {"made_by", "changes"}
        schema = 2
    if release_tuple(release) >= (0, 5, 0):  # chunks (schema 3); the signing key's id (0.4)
        fields |= {"key_id"}
        schema = 3
    assert set(data) == fields
    assert (data["schema"], data["generation"], data["execution_count"], data["identity"]) == (schema, 2, 3, IDENTITY)
    assert {"python", "dill", "durable_kernel", "packages"} <= set(data["versions"])


# --- the current code loads it ----------------------------------------------------------


def test_newest_checkpoint_is_the_one_after_the_last_cell(notebook, restored):
    assert notebook.checkpoint_ids() == [2, 1]
    assert (restored.manifest.generation, restored.manifest.execution_count) == (2, 3)
    assert restored.manifest.data["cell"] == "# Cellule 3 — fonctions définies dans le notebook"


def test_nothing_is_damaged_and_no_checkpoint_is_passed_over(restored):
    assert restored.damaged == {} and restored.fallbacks == []


def test_every_saved_variable_comes_back(release, restored):
    needs_its_python(release)
    assert set(restored.values) == NEWEST
    assert [s.name for s in restored.not_restored] == ["squares"]


def test_unpicklable_variable_is_reported_with_its_reason(restored):
    (squares,) = [s for s in restored.not_restored if s.name == "squares"]
    assert (squares.type, squares.reason) == ("builtins.generator", "TypeError: cannot pickle 'generator' object")


def test_ints_floats_and_none_come_back_equal_with_their_types(values):
    expected = {"answer": 42, "ratio": 0.1 + 0.2, "nothing": None, "revision": 2}
    for name, value in expected.items():
        assert values[name] == value and type(values[name]) is type(value), name


def test_str_comes_back_equal(values):
    assert values["greeting"] == "héllo, wörld ✓"


def test_bytes_come_back_equal(values):
    assert values["raw"] == b"\x00\x01binary\xff" and type(values["raw"]) is bytes


def test_dict_tuple_and_set_come_back_equal_with_their_types(values):
    for name in ("settings", "pair", "primes"):
        assert values[name] == CELL_1[name] and type(values[name]) is type(CELL_1[name]), name


def test_list_stored_as_its_own_blob_comes_back_equal(values):
    assert values["big_list"] == [i * i for i in range(4000)]


def test_alias_is_the_same_object(values):
    assert values["same"] is values["big_list"]


def test_container_held_by_a_later_variable_is_still_shared(values):
    assert values["table"] == {"rows": [[1, "a"], [2, "b"]], "count": 2}
    assert values["table"]["rows"] is values["rows"]


def test_array_stored_as_a_raw_buffer_comes_back_equal_with_its_dtype(values):
    wave = values["wave"]
    assert wave.dtype == np.float64 and wave.shape == (8192,)
    assert np.array_equal(wave, np.arange(8192, dtype=np.float64) / 4)


def test_restored_raw_buffer_array_is_writable(values):
    values["wave"][0] = 99.0
    assert values["wave"][0] == 99.0


def test_array_stored_inside_its_pickle_comes_back_equal_with_dtype_and_shape(values):
    small = values["small"]
    assert small.dtype == np.int16 and small.shape == (2, 2) and small.tolist() == [[1, -2], [3, 4]]


def test_module_variables_are_the_imported_modules(values):
    assert values["js"] is sys.modules["json"] and values["np"] is sys.modules["numpy"]


def test_module_met_inside_a_variable_is_imported_again(release, values):
    needs_its_python(release)  # toolbox also holds a notebook function
    assert values["toolbox"]["encoder"] is sys.modules["json.encoder"]


def test_function_met_inside_a_variable_is_that_variable(release, values):
    needs_its_python(release)
    assert values["toolbox"]["square"] is values["square"]


def test_notebook_function_still_works(release, values):
    needs_its_python(release)
    assert values["square"](7) == 49


def test_lambda_still_works(release, values):
    needs_its_python(release)
    assert values["halve"](5) == 2.5


def test_closure_keeps_its_captured_state(release, values):
    needs_its_python(release)
    # tally() was called once before the checkpoint (11)
    assert (values["tally"](), values["tally"]()) == (12, 13)


def test_function_making_closures_still_makes_them(release, values):
    needs_its_python(release)
    assert values["make_counter"](0)() == 1


def test_notebook_function_reads_the_globals_of_the_restoring_main_module(release, values, monkeypatch):
    needs_its_python(release)
    describe = values["describe"]
    assert describe.__globals__ is sys.modules["__main__"].__dict__
    monkeypatch.setitem(describe.__globals__, "js", json)  # in a kernel: the notebook's own ``js``
    assert describe(values["where"]) == '{"x": 3, "y": 4}'


def test_notebook_class_still_works(release, values):
    needs_its_python(release)
    assert values["Point"](1, 2).norm2() == 5


def test_instance_keeps_its_notebook_class(release, values):
    needs_its_python(release)
    where = values["where"]
    assert type(where) is values["Point"] and (where.x, where.y) == (3, 4) and where.norm2() == 25


def test_instances_stored_in_a_blob_keep_their_notebook_class(release, values):
    needs_its_python(release)
    path = values["path"]
    assert len(path) == 1000 and all(type(p) is values["Point"] for p in path)
    assert (path[999].x, path[999].y) == (999, -999)


def test_older_checkpoint_loads_exactly(notebook):
    older = notebook.load(1)
    assert older.values.pop("js") is sys.modules["json"]
    assert older.values == CELL_1
    assert all(type(older.values[name]) is type(value) for name, value in CELL_1.items())
    assert (older.not_restored, older.damaged) == ([], {})


def test_notebook_code_from_another_python_is_not_restored_and_costs_nothing_else(release, tmp_path):
    """Notebook code is bytecode of the Python that wrote it: on another minor version it must not
    run (that can crash the interpreter), so it comes back "not restored", with the reason, and
    everything else loads.  On the fixture's own Python the checkpoint is re-signed as if written
    by another version."""
    copy = copy_fixture(release, tmp_path / "fixture")
    nb = open_notebook(copy)
    other = written_by(release)
    if other == RUNNING:
        data = manifest_json(release)
        other = f"3.{sys.version_info[1] - 1}"
        data["versions"]["python"] = other + ".0"
        nb.manifest_path(2).write_bytes(manifest_format.encode(data, nb.store.key))
    restored = nb.load(2)
    assert set(restored.values) == NEWEST - NOTEBOOK_CODE
    assert {s.name for s in restored.not_restored} == NOTEBOOK_CODE | {"squares"}
    reasons = {s.name: s.reason for s in restored.not_restored}
    for name in ("square", "halve", "tally", "Point"):
        assert f"Python {other}" in reasons[name] and f"Python {RUNNING}" in reasons[name], reasons[name]
    assert set(restored.unloaded) == NOTEBOOK_CODE  # kept, to come back on that Python
    assert restored.values["wave"].shape == (8192,) and restored.values["same"] is restored.values["big_list"]


def test_notebook_code_carried_forward_by_another_python_keeps_the_python_that_wrote_it(release, tmp_path):
    """A kernel on another Python keeps such variables as they are; a checkpoint it writes names
    the Python that pickled them, so they still come back only on that one."""
    copy = copy_fixture(release, tmp_path / "fixture")
    nb = open_notebook(copy)
    data = manifest_json(release)
    other = "3.10" if RUNNING != "3.10" else "3.9"
    data["versions"]["python"] = other + ".0"
    nb.manifest_path(2).write_bytes(manifest_format.encode(data, nb.store.key))
    restored = nb.load(2)
    placeholders = {
        name: NotRestored(name, entry["type"], "kept", "", entry) for name, entry in restored.unloaded.items()
    }
    nb.commit(snapshot({**restored.values, **placeholders}), execution_count=4, cell="kept")
    newest = nb.load_latest()
    assert newest.manifest.generation == 3 and newest.manifest.data["versions"]["python"].startswith(RUNNING)
    carried = {v["name"]: v.get("python") for v in newest.manifest.variables if v["name"] in NOTEBOOK_CODE}
    assert carried == dict.fromkeys(NOTEBOOK_CODE, other + ".0")
    assert set(newest.unloaded) == NOTEBOOK_CODE
    assert f"Python {other}" in {s.name: s.reason for s in newest.not_restored}["square"]


# --- through a real kernel ------------------------------------------------------------


@pytest.fixture
def kernel_on_0_1_0_store(start_kernel, tmp_path):
    """A durable kernel started on a copy of the 0.1.0 fixture (its store and its key)."""
    copy = copy_fixture("0.1.0", tmp_path / "fixture")
    kernel = start_kernel(
        session=IDENTITY, env={"DURABLE_KERNEL_DIR": str(copy / "store"), "JUPYTER_DATA_DIR": str(copy)}
    )
    kernel.copy = copy
    return kernel


def test_kernel_restores_the_data_of_a_0_1_0_store(kernel_on_0_1_0_store):
    kernel = kernel_on_0_1_0_store
    came_back = NEWEST if written_by("0.1.0") == RUNNING else NEWEST - NOTEBOOK_CODE
    assert f"restored {len(came_back)} variables for {IDENTITY}" in kernel.banner, kernel.banner
    holds(kernel, "(answer, ratio, nothing, revision) == (42, 0.1 + 0.2, None, 2)")
    holds(kernel, "greeting == 'héllo, wörld ✓' and raw == b'\\x00\\x01binary\\xff'")
    holds(kernel, "settings == {'depth': 3, 'tags': ['a', 'b'], None: (1, 2)} and pair == (1, 'two', 3.0)")
    holds(kernel, "primes == {2, 3, 5, 7} and big_list == [i * i for i in range(4000)] and same is big_list")
    holds(kernel, "table['rows'] is rows and table['count'] == 2")
    holds(kernel, "wave.dtype == np.float64 and np.array_equal(wave, np.arange(8192, dtype=np.float64) / 4)")
    holds(kernel, "small.dtype == np.int16 and small.tolist() == [[1, -2], [3, 4]]")
    holds(kernel, "js is __import__('sys').modules['json'] and np is __import__('sys').modules['numpy']")
    assert "squares" not in user_variables(kernel)


@pytest.mark.skipif(
    written_by("0.1.0") != RUNNING,
    reason="the 0.1.0 fixture's notebook code is Python "
    f"{written_by('0.1.0')} bytecode: test_kernel_on_another_python_... checks this Python instead",
)
def test_kernel_restores_the_notebook_code_of_a_0_1_0_store(kernel_on_0_1_0_store):
    kernel = kernel_on_0_1_0_store
    holds(kernel, "square(7) == 49 and halve(5) == 2.5 and tally() == 12 and make_counter(0)() == 1")
    holds(kernel, "type(where) is Point and where.norm2() == 25 and Point(1, 2).norm2() == 5")
    holds(kernel, "all(type(p) is Point for p in path) and toolbox['square'] is square")
    assert kernel.value("describe(where)") == repr('{"x": 3, "y": 4}')  # reads the notebook's ``js``


@pytest.mark.skipif(
    written_by("0.1.0") == RUNNING,
    reason=f"needs a Python other than {RUNNING}, which wrote the "
    "fixture (on this one, test_kernel_restores_the_notebook_code_of_a_0_1_0_store runs)",
)
def test_kernel_on_another_python_keeps_the_notebook_code_as_not_restored(kernel_on_0_1_0_store):
    kernel = kernel_on_0_1_0_store
    assert "square (OtherPython: notebook code saved by Python 3.11" in kernel.banner, kernel.banner
    holds(kernel, f"all(type(v).__name__ == 'NotRestored' for v in [{', '.join(sorted(NOTEBOOK_CODE))}])")


def test_kernel_on_a_0_1_0_store_goes_on_saving_checkpoints_that_load(kernel_on_0_1_0_store):
    kernel = kernel_on_0_1_0_store
    out = kernel.execute("revision = 3")
    assert not out.error, out.error
    wait_saved(kernel)
    newest = open_notebook(kernel.copy).load_latest()
    assert newest.manifest.generation == 3 and newest.values["revision"] == 3
    values = newest.values
    assert values["same"] is values["big_list"] and values["table"]["rows"] is values["rows"]
    assert np.array_equal(values["wave"], np.arange(8192, dtype=np.float64) / 4)


def kernel_on_a_copy(release: str, start_kernel, tmp_path: Path):
    copy = copy_fixture(release, tmp_path / "fixture")
    kernel = start_kernel(
        session=IDENTITY, env={"DURABLE_KERNEL_DIR": str(copy / "store"), "JUPYTER_DATA_DIR": str(copy)}
    )
    return kernel, copy


def test_a_cell_on_an_old_store_is_listed_with_only_what_it_changed(release, start_kernel, tmp_path):
    """The restored notebook code (functions, a class) and set are pickled again by this process,
    in other bytes: they are not shown as changed (nor stored again)."""
    needs_its_python(release)
    kernel, copy = kernel_on_a_copy(release, start_kernel, tmp_path)
    assert not kernel.execute("revision = 3").error
    wait_saved(kernel)
    changes = open_notebook(copy).read_manifest(3).data["changes"]
    assert (changes["added"], changes["removed"]) == ([], [])
    if release_tuple(release) >= (0, 3, 0):
        assert changes["changed"] == ["revision"]
    else:
        # Before 0.3, notebook code was pickled by dill and `table` referred to `rows` by name: the
        # first checkpoint after the upgrade saves them once more, in the new format (which no
        # comparison can match: a notebook_code pickle, a group), and nothing else.
        assert "revision" in changes["changed"]
        assert set(changes["changed"]) <= NOTEBOOK_CODE | {"revision", "table"}


def test_the_oldest_kept_checkpoint_of_an_old_store_does_not_claim_it_added_everything(release, start_kernel, tmp_path):
    """Checkpoints of 0.2.0 and before do not record what they changed: once the one before is gone, that is unknown."""
    copy = copy_fixture(release, tmp_path / "fixture")
    (copy / "store" / manifest_format.folder_name(IDENTITY) / "manifests" / f"{1:012d}.manifest").unlink()
    kernel = start_kernel(
        session=IDENTITY, env={"DURABLE_KERNEL_DIR": str(copy / "store"), "JUPYTER_DATA_DIR": str(copy)}
    )
    rows = checkpoint_rows(kernel)
    if release_tuple(release) >= (0, 3, 0):  # it recorded what its cell changed when it was made
        assert rows[0]["id"] == "2" and rows[0]["changes"].endswith("~revision -draft"), rows
    else:
        assert [(r["id"], r["changes"]) for r in rows] == [("2", "(the checkpoint before it is not kept)")]


# --- chunked data (schema 3): tests/fixtures/chunks-<version>/, make_chunked_store.py ----------------


CHUNKED_RELEASES = sorted(p.name.removeprefix("chunks-") for p in FIXTURES.glob("chunks-*"))


@pytest.mark.parametrize("chunked_release", CHUNKED_RELEASES)
def test_a_chunked_buffer_and_a_chunked_pickle_written_by_a_release_load(chunked_release, tmp_path):
    copy = copy_fixture(chunked_release, tmp_path / "fixture", kind="chunks")
    notebook = Store(copy / "store", load_or_create_key(copy / "durable_kernel_secret")).notebook(
        "chunked-fixture.ipynb"
    )
    newest = notebook.load_latest()
    assert newest.manifest.generation == 2 and newest.not_restored == []
    wide, long = newest.values["wide"], newest.values["long"]
    assert wide.shape == (200_000,) and wide[100_000] == 2.0 and wide[-1] == 1.0 and wide.sum() == 3.0
    assert long == [7] * 600_000 + [8]
    older = notebook.load(1).values
    assert older["wide"].sum() == 1.0 and older["long"] == [7] * 600_000
    variables = {v["name"]: v for v in newest.manifest.variables}
    assert variables["wide"]["pieces"] == [len(variables["wide"]["buffers"])] and len(variables["wide"]["buffers"]) > 1
    assert len(variables["long"]["stream"]) > 1


def test_the_chunked_format_has_a_fixture():
    assert "0.5.0" in CHUNKED_RELEASES
