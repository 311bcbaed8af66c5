"""Fuzzing the loader with hypothesis: it refuses bad input cleanly, never runs untrusted code.

Three generators, each counting the inputs it tried (printed as ``RELIABILITY fuzz ...``):

* random bytes as a manifest (``manifest.decode``);
* a real store with 1-4 random file mutations (flipped, truncated, extended, replaced,
  swapped or deleted files, evil pickles, symlinks pointing elsewhere, sparse
  manifests past the size limit) loaded by ``NotebookStore.load_latest_with_reasons``;
* real manifests with random structural changes (wrong schema versions, missing
  fields, wrong types, huge declared sizes, bad digests), *validly signed*, as if
  written by a buggy or different version.

The only exceptions allowed are ``CheckpointError`` subclasses; whatever loads must be
exactly one committed generation, less the variables it names as not restored (a
damaged blob costs only the variables stored in it and those that refer to them);
an evil pickle's sentinel file must never appear.
Blobs that are directories, FIFOs or huge sparse files are covered by explicit tests
(in test_reliability_hostile.py and below) rather than here.

``DURABLE_FUZZ_EXAMPLES`` multiplies the number of inputs (default 1: CI's share);
``DURABLE_FUZZ_SEED`` picks the seed (default fixed, so runs are repeatable).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_saved
from durable_kernel.checkpoints import CheckpointError, Store, snapshot
from durable_kernel.checkpoints import manifest as manifest_format
from durable_kernel.checkpoints.location import open_store
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from reliability_support import evil_pickle, report

KEY = b"fuzz-key-" * 8
SESSION = "fuzz.ipynb"
SCALE = float(os.environ.get("DURABLE_FUZZ_EXAMPLES", "1"))
SEED = int(os.environ.get("DURABLE_FUZZ_SEED", "20261122"))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def fuzz_settings(n: int):
    return settings(
        max_examples=examples(n),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def states() -> dict[int, dict]:
    """What each generation of the template store holds."""
    arr = np.arange(10_000, dtype=np.float64)  # 80 kB: an out-of-band buffer blob
    big = list(range(20_000))  # a pickle blob
    wide = np.arange(200_000, dtype=np.float64)  # 1.6 MB: a buffer in 512 KiB chunks
    long = [str(i) for i in range(200_000)]  # a pickle over 1 MiB: content-defined chunks
    return {
        1: {"x": 1, "s": "short"},  # inline only
        2: {"x": 2, "big": big, "same": big, "arr": arr, "np": np, "wide": wide},  # blob, alias, buffer, module
        # dedup'd buffer, dill, chunks shared with generation 2 and one changed
        3: {
            "x": 3,
            "big": list(range(20_001)),
            "arr": arr,
            "f": lambda v: v + 1,
            "wide": wide + (wide == 7),
            "long": long,
        },
    }


def values_equal(got: dict, want: dict) -> bool:
    """Every value in ``got`` is the one ``want`` has under its name."""
    if not set(got) <= set(want):
        return False
    for name, value in want.items():
        if name not in got:
            continue
        if isinstance(value, np.ndarray):
            if not np.array_equal(got[name], value):
                return False
        elif callable(value) and not isinstance(value, type(np)):
            if got[name](1) != value(1):
                return False
        elif got[name] != value:
            return False
    if "same" in got and got["same"] is not got.get("big"):
        return False
    return True


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template") / "store"
    nb = Store(root, KEY).notebook(SESSION)
    for gen, values in states().items():
        nb.commit(snapshot(values), execution_count=gen, keep=5)
    assert nb.checkpoint_ids() == [3, 2, 1]
    return root


def fresh_copy(template: Path, where: Path):
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(template, where, symlinks=True)
    return Store(where, KEY).notebook(SESSION)


def store_files(nb) -> list[Path]:
    return sorted(p for p in nb.dir.rglob("*") if p.is_file() and not p.is_symlink())


def check_load(nb, sentinel: Path) -> str:
    """Load; the only allowed outcomes. Returns 'gen N', 'none' or 'refused'."""
    want = states()
    try:
        restored, reasons = nb.load_latest_with_reasons()
    except CheckpointError:
        outcome = "refused"
    else:
        if restored is None:
            outcome = "none"
        else:
            gen = restored.manifest.generation
            assert gen in want, gen
            assert values_equal(restored.values, want[gen]), (gen, sorted(restored.values))
            missing = set(want[gen]) - set(restored.values)
            assert missing == {s.name for s in restored.not_restored}, (missing, restored.not_restored)
            outcome = f"gen {gen}" + (" less damaged variables" if missing else "")
    assert not sentinel.exists(), "untrusted code ran"
    return outcome


# --- 1. random bytes as a manifest ------------------------------------------------------------


def test_fuzz_manifest_decode_with_random_bytes(capsys):
    tried = 0
    refused = 0

    @fuzz_settings(3000)
    @seed(SEED)
    @given(
        prefix=st.sampled_from([b"", manifest_format.MAGIC, manifest_format.MAGIC + b"0" * 64 + b"\n"]),
        body=st.binary(max_size=512),
    )
    def fuzz(prefix, body):
        nonlocal tried, refused
        tried += 1
        try:
            manifest_format.decode(prefix + body, KEY, "checkpoint 1")
        except CheckpointError:
            refused += 1

    fuzz()
    assert refused == tried  # nothing unsigned is ever accepted
    report(
        "fuzz decode random bytes",
        capsys,
        inputs=tried,
        refused=refused,
        other_exceptions=0,
        seed=SEED,
    )


# --- 2. random file mutations of a real store ----------------------------------------------------

OPS = ["flip", "truncate", "append", "replace", "evil", "delete", "swap", "symlink", "sparse_manifest"]


@st.composite
def mutation(draw):
    return {
        "op": draw(st.sampled_from(OPS)),
        "target": draw(st.integers(min_value=0, max_value=10_000)),
        "pos": draw(st.integers(min_value=0, max_value=1 << 20)),
        "mask": draw(st.integers(min_value=1, max_value=255)),
        "data": draw(st.binary(max_size=300)),
        "other": draw(st.integers(min_value=0, max_value=10_000)),
        "link": draw(st.sampled_from(["evil", "passwd", "missing", "other", "dir"])),
    }


def apply(nb, m: dict, outside: Path, sentinel: Path) -> None:
    files = store_files(nb)
    if not files:
        return
    path = files[m["target"] % len(files)]
    other = files[m["other"] % len(files)]
    op = m["op"]
    if path.stat().st_size > 1 << 20 or other.stat().st_size > 1 << 20:
        return  # a manifest an earlier mutation made huge (sparse): already as bad as it gets
    raw = path.read_bytes() if op in ("flip", "truncate", "append") else b""
    if op == "flip" and raw:
        pos = m["pos"] % len(raw)
        raw = raw[:pos] + bytes([raw[pos] ^ m["mask"]]) + raw[pos + 1 :]
        path.write_bytes(raw)
    elif op == "truncate":
        path.write_bytes(raw[: m["pos"] % (len(raw) + 1)])
    elif op == "append":
        path.write_bytes(raw + m["data"])
    elif op == "replace":
        path.write_bytes(m["data"])
    elif op == "evil":
        path.write_bytes(evil_pickle(sentinel))
    elif op == "delete":
        path.unlink()
    elif op == "swap":
        path.write_bytes(other.read_bytes())
    elif op == "symlink":
        targets = {
            "evil": outside / "evil.pkl",
            "passwd": Path("/etc/passwd"),
            "missing": outside / "no-such-file",
            "other": other,
            "dir": outside,
        }
        path.unlink()
        path.symlink_to(targets[m["link"]])
    elif op == "sparse_manifest":
        manifests = [f for f in files if f.parent.name == "manifests"]
        if manifests:
            victim = manifests[m["target"] % len(manifests)]
            with open(victim, "r+b") as f:
                f.truncate(manifest_format.MAX_MANIFEST_BYTES + 1 + m["pos"])


def test_fuzz_store_with_mutated_files(template, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = tmp_path / "untrusted-code-ran"
    (outside / "evil.pkl").write_bytes(evil_pickle(sentinel))
    outcomes: dict[str, int] = {}
    tried = 0

    @fuzz_settings(1200)
    @seed(SEED)
    @given(st.lists(mutation(), min_size=1, max_size=4))
    def fuzz(mutations):
        nonlocal tried
        tried += 1
        nb = fresh_copy(template, tmp_path / "store")
        for m in mutations:
            apply(nb, m, outside, sentinel)
        outcome = check_load(nb, sentinel)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    fuzz()
    report(
        "fuzz mutated store files",
        capsys,
        inputs=tried,
        outcomes=dict(sorted(outcomes.items())),
        other_exceptions=0,
        untrusted_code_ran=0,
        seed=SEED,
    )


# --- 3. signed manifests with random structure ---------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
TOP_KEYS = [
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
]
VAR_KEYS = ["name", "type", "kind", "size", "digest", "inline", "buffers", "target"]
MISSING = object()


@st.composite
def structural_change(draw):
    where = draw(st.sampled_from(["top", "variable", "buffer", "skipped", "list"]))
    key = draw(st.sampled_from(TOP_KEYS if where == "top" else VAR_KEYS if where == "variable" else ["digest", "size"]))
    if where == "top" and key == "schema":
        value = draw(st.sampled_from([MISSING, 0, -1, 2, 10**9, "1", 1.0, True, None, [1]]))
    elif key == "size":
        value = draw(st.sampled_from([MISSING, -1, 0, 1 << 62, 10**30, "80000", 8e4, None]))
    elif key == "target":  # never a random module name: module targets are imported (a signed manifest is trusted)
        value = draw(st.sampled_from([MISSING, "", "no_such_module_zz", "x", "big", 5, None]))
    elif key == "kind":
        value = draw(st.sampled_from([MISSING, "pickle", "module", "alias", "exe", None, 1]))
    elif key == "digest":
        value = draw(st.sampled_from([MISSING, "", "0" * 64, "../" * 21 + "x", "A" * 64, "f" * 63, 7]))
    else:
        value = draw(st.one_of(st.just(MISSING), JSON_VALUES))
    return {
        "where": where,
        "key": key,
        "value": value,
        "index": draw(st.integers(min_value=0, max_value=50)),
        "list_op": draw(st.sampled_from(["drop", "duplicate", "insert", "reverse"])),
        "item": draw(JSON_VALUES),
    }


def change_structure(data: dict, c: dict) -> None:
    def put(obj, key, value):
        if value is MISSING:
            obj.pop(key, None)
        else:
            obj[key] = value

    variables = data.get("variables")
    if c["where"] == "top":
        put(data, c["key"], c["value"])
    elif c["where"] == "list":
        seq = data.get("variables" if c["index"] % 2 else "skipped")
        if isinstance(seq, list):
            if c["list_op"] == "drop" and seq:
                seq.pop(c["index"] % len(seq))
            elif c["list_op"] == "duplicate" and seq:
                seq.append(seq[c["index"] % len(seq)])
            elif c["list_op"] == "insert":
                seq.insert(c["index"] % (len(seq) + 1), c["item"])
            else:
                seq.reverse()
    elif isinstance(variables, list) and variables:
        var = variables[c["index"] % len(variables)]
        if not isinstance(var, dict):
            return
        if c["where"] == "variable":
            put(var, c["key"], c["value"])
        elif c["where"] == "buffer" and isinstance(var.get("buffers"), list) and var["buffers"]:
            buf = var["buffers"][c["index"] % len(var["buffers"])]
            if isinstance(buf, dict):
                put(buf, c["key"], c["value"])
        elif c["where"] == "skipped":
            data.setdefault("skipped", [])
            if isinstance(data["skipped"], list):
                data["skipped"].append({"name": c["item"], "type": "t", "reason": "r"})


def test_fuzz_signed_manifests_with_random_structure(template, tmp_path, capsys):
    sentinel = tmp_path / "untrusted-code-ran"
    tried = 0
    outcomes: dict[str, int] = {}

    @fuzz_settings(800)
    @seed(SEED)
    @given(gen=st.sampled_from([1, 2, 3]), changes=st.lists(structural_change(), min_size=1, max_size=4))
    def fuzz(gen, changes):
        nonlocal tried
        tried += 1
        nb = fresh_copy(template, tmp_path / "store")
        path = nb.manifest_path(gen)
        data = json.loads(path.read_bytes().split(b"\n", 2)[2])
        for c in changes:
            change_structure(data, c)
        path.write_bytes(manifest_format.encode(data, KEY))
        try:  # the changed generation on its own: accepted or refused, nothing else
            nb.load(gen)
            outcome = "changed one accepted"
        except CheckpointError:
            outcome = "changed one refused"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        try:  # and the newest loadable one
            restored, _ = nb.load_latest_with_reasons()
        except CheckpointError:
            latest = "latest: refused"
        else:
            latest = "latest: none" if restored is None else f"latest: gen {restored.manifest.generation}"
        outcomes[latest] = outcomes.get(latest, 0) + 1
        assert not sentinel.exists()

    fuzz()
    report(
        "fuzz signed manifests, random structure",
        capsys,
        inputs=tried,
        outcomes=dict(sorted(outcomes.items())),
        other_exceptions=0,
        seed=SEED,
    )


def test_non_ascii_signature_byte_is_refused_cleanly(template, tmp_path):
    nb = fresh_copy(template, tmp_path / "store")
    path = nb.manifest_path(3)
    raw = bytearray(path.read_bytes())
    raw[len(manifest_format.MAGIC)] |= 0x80  # one bit of the signature line flips
    path.write_bytes(bytes(raw))
    restored, reasons = nb.load_latest_with_reasons()
    assert restored.manifest.generation == 2 and "not signed" in reasons[0]


# --- huge declared and actual sizes --------------------------------------------------------------


def test_manifest_past_the_size_limit_is_refused_unread(template, tmp_path):
    nb = fresh_copy(template, tmp_path / "store")
    with open(nb.manifest_path(3), "r+b") as f:
        f.truncate(manifest_format.MAX_MANIFEST_BYTES + 1)  # sparse: nothing is allocated
    restored, reasons = nb.load_latest_with_reasons()
    assert restored.manifest.generation == 2 and "implausibly large" in reasons[0]


def test_buffer_with_a_huge_declared_size_is_refused_and_costs_only_its_variable(template, tmp_path):
    nb = fresh_copy(template, tmp_path / "store")
    path = nb.manifest_path(3)
    data = json.loads(path.read_bytes().split(b"\n", 2)[2])
    arr = next(v for v in data["variables"] if v["name"] == "arr")
    arr["buffers"][0]["size"] = 1 << 62
    path.write_bytes(manifest_format.encode(data, KEY))
    restored, reasons = nb.load_latest_with_reasons()
    assert restored.manifest.generation == 3 and "expected 4611686018427387904" in restored.damaged["arr"]
    assert "arr" not in restored.values and restored.values["x"] == 3


def test_payload_blob_far_larger_than_the_manifest_says_is_refused_unread(template, tmp_path):
    nb = fresh_copy(template, tmp_path / "store")
    big = next(v for v in nb.read_manifest(3).variables if v["name"] == "big")
    with open(nb.blob_path(big["digest"]), "r+b") as f:
        f.truncate(1 << 40)  # 1 TiB, sparse
    restored, reasons = nb.load_latest_with_reasons()
    assert restored.manifest.generation == 3, reasons
    assert "more than the manifest says" in restored.damaged["big"]


def test_huge_manifest_among_the_kept_generations_does_not_stop_commits(template, tmp_path):
    nb = fresh_copy(template, tmp_path / "store")
    with open(nb.manifest_path(2), "r+b") as f:
        f.truncate(1 << 40)  # 1 TiB, sparse
    nb.commit(snapshot({"x": 4}), execution_count=4, keep=5)
    assert nb.load_latest().values == {"x": 4}


# --- the kernel starts over a hostile store ------------------------------------------------------


def test_kernel_starts_and_falls_back_over_a_store_full_of_hostile_files(start_kernel, jupyter_dirs, tmp_path, capsys):
    sentinel = tmp_path / "untrusted-code-ran"
    data_dir = Path(jupyter_dirs["JUPYTER_DATA_DIR"])
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    nb = open_store(environ=jupyter_dirs).notebook(SESSION)
    nb.commit(snapshot({"good": "gen 1"}), execution_count=1, keep=20)
    for gen in range(2, 9):
        nb.commit(snapshot({"good": f"gen {gen}", "big": list(range(20_000 + gen))}), execution_count=gen, keep=20)
    manifests = {gen: nb.manifest_path(gen) for gen in range(2, 9)}
    blob = {gen: nb.blob_path(nb.read_manifest(gen).variables[1]["digest"]) for gen in range(2, 9)}
    raw = bytearray(manifests[8].read_bytes())
    raw[-3] ^= 1
    manifests[8].write_bytes(bytes(raw))  # flipped byte
    blob[7].write_bytes(evil_pickle(sentinel))  # evil blob
    (tmp_path / "evil.pkl").write_bytes(evil_pickle(sentinel))
    blob[6].unlink()
    blob[6].symlink_to(tmp_path / "evil.pkl")  # symlink elsewhere
    body = json.loads(manifests[5].read_bytes().split(b"\n", 2)[2])
    body["variables"][0]["inline"] = base64.b64encode(evil_pickle(sentinel)).decode()
    manifests[5].write_bytes(manifest_format.encode(body, b"another key"))  # another key
    manifests[4].write_bytes(os.urandom(2000))  # garbage
    with open(manifests[3], "r+b") as f:  # huge (pruned by the kernel's first commit: see the test above)
        f.truncate(manifest_format.MAX_MANIFEST_BYTES + 1)
    manifests[2].unlink()  # missing
    (nb.manifests_dir / ".tmp-1-dead").write_bytes(evil_pickle(sentinel))  # crash leftover
    kernel = start_kernel(session=SESSION)
    assert kernel.value("good") == "'gen 7'"  # its manifest is intact: only its evil blob is refused
    assert (
        "checkpoint 8 is not signed" in kernel.banner
        and "not restored: big (its saved data is damaged" in kernel.banner
    )
    kernel.execute("more = 1")
    wait_saved(kernel)
    assert not sentinel.exists()
    report(
        "fuzz: kernel over hostile store",
        capsys,
        hostile_generations=6,
        kernel_started=True,
        restored="gen 7 less its evil blob",
        untrusted_code_ran=0,
    )
