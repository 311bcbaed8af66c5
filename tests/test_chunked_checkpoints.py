"""Checkpoints cost what changed: chunked buffers and pickles, dirty pages, arrays backed by their chunks.

Store level: bytes written after a small change inside a large variable; the
chunk digests that page tracking reuses agree with hashing the memory; an
array backed by its chunk files keeps its values, its writes, and nothing of
malloc's is disturbed.  Kernel level (real kernels, kill -9): after a cell
that changes nothing the checkpoint hashes nothing, after one element it
hashes one chunk, and the state comes back exactly.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import pytest
from conftest import holds, wait_saved
from durable_kernel.checkpoints import Store, chunking, mapping, snapshot
from durable_kernel.checkpoints.blobs import digest, digests
from durable_kernel.checkpoints.location import open_store

KEY = b"chunk-key-" * 7
KIB, MIB = 1 << 10, 1 << 20


@pytest.fixture
def nb(tmp_path):
    return Store(tmp_path / "store", KEY).notebook("chunks.ipynb")


def commit(nb, values, count=1):
    return nb.commit(snapshot(values), execution_count=count, report_adoptable=True)


def random_array(nbytes: int, seed: int = 0) -> np.ndarray:
    """Random floats; over 32 MiB malloc always takes them from mmap (below, maybe from its heap,
    which is never backed by chunk files)."""
    return np.random.default_rng(seed).random(nbytes // 8)


# --- bytes written are what changed ---------------------------------------------------------------


def test_one_changed_element_of_a_large_array_writes_one_chunk_and_the_manifest(nb):
    arr = random_array(256 * MIB)
    commit(nb, {"arr": arr})
    arr[12_345_678] = -1.0
    second = commit(nb, {"arr": arr}, count=2)
    assert second.blobs_written == 1
    assert second.bytes_written < chunking.BUFFER_CHUNK_BYTES + 128 * KIB  # the manifest lists 513 chunks
    assert np.array_equal(nb.load_latest().values["arr"], arr)


def test_one_changed_field_among_many_dicts_rewrites_a_few_stream_chunks(nb):
    rows = [{"id": i, "score": float(i), "name": f"row {i}"} for i in range(200_000)]
    commit(nb, {"rows": rows})
    rows[150_000]["score"] = -1.0
    second = commit(nb, {"rows": rows}, count=2)
    assert second.bytes_written <= 256 * KIB
    assert nb.load_latest().values["rows"] == rows


def test_an_appended_string_rewrites_only_the_last_stream_chunks(nb):
    strings = [f"line {i} of a long text" for i in range(200_000)]
    commit(nb, {"strings": strings})
    strings.append("one more line")
    second = commit(nb, {"strings": strings}, count=2)
    assert second.bytes_written <= 256 * KIB
    assert nb.load_latest().values["strings"] == strings


def test_content_defined_cuts_resynchronise_after_an_insertion():
    data = np.random.default_rng(1).integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes()
    inserted = data[: 3 * MIB] + b"twelve bytes" + data[3 * MIB :]
    before = {data[a:b] for a, b in chunking.stream_cuts(data)}
    after = [inserted[a:b] for a, b in chunking.stream_cuts(inserted)]
    assert sum(len(c) for c in after if c not in before) <= 2 * chunking.STREAM_MAX_BYTES


def test_a_schema_3_manifest_lists_chunks_and_pieces(nb):
    arr = random_array(2 * MIB)
    commit(nb, {"arr": arr, "text": [str(i) for i in range(300_000)]})
    variables = {v["name"]: v for v in nb.read_manifest(1).variables}
    assert nb.read_manifest(1).data["schema"] == 3
    assert variables["arr"]["pieces"] == [len(variables["arr"]["buffers"])]
    assert sum(b["size"] for b in variables["arr"]["buffers"]) == arr.nbytes
    assert len(variables["text"]["stream"]) > 1 and "stamp" not in variables["text"]


# --- dirty pages agree with hashing ---------------------------------------------------------------


def chunk_states(buffer: np.ndarray, blob_path) -> list[tuple[str | None, str]]:
    """(digest page tracking gives or None, digest of the memory) for each chunk of ``buffer``."""
    from durable_kernel.checkpoints.blobs import digest

    view = memoryview(buffer).cast("B")
    address = mapping.address_of(view)
    clean = mapping.CleanChunks()
    try:
        return [
            (clean.digest_if_clean(address + a, b - a, blob_path), digest(view[a:b]))
            for a, b in chunking.buffer_cuts(view.nbytes, address)
        ]
    finally:
        clean.close()


@pytest.mark.parametrize("how", ["restored", "adopted"])
def test_page_tracking_and_hashing_agree_on_every_chunk(nb, how):
    arr = random_array(40 * MIB, seed=2)  # over 32 MiB: malloc always gets it from mmap
    first = commit(nb, {"arr": arr})
    if how == "restored":
        arr = nb.load_latest().values["arr"]
    else:
        assert mapping.Adopter(nb.blob_path).adopt(first.adoptable, 60.0)[0] > 0
    stored = {b["digest"] for b in nb.read_manifest(1).variables[0]["buffers"]}
    rng = np.random.default_rng(3)
    written = set()
    for index in rng.integers(0, arr.size, 12):
        arr[index] = -arr[index] - 1.0  # always a different value
        written.add(int(index) * 8)
    arr[arr.size - 1] = 5.0  # the last, short chunk
    written.add(arr.nbytes - 8)
    address = mapping.address_of(memoryview(arr).cast("B"))
    cuts = chunking.buffer_cuts(arr.nbytes, address)
    states = chunk_states(arr, nb.blob_path)
    for (start, end), (tracked, hashed) in zip(cuts, states, strict=True):
        touched = any(start <= w < end for w in written)
        if tracked is not None:
            assert tracked == hashed and not touched  # a chunk said clean holds exactly its blob's bytes
        elif not touched and (end - start) % mapping.PAGE == 0 and (address + start) % mapping.PAGE == 0:
            assert hashed in stored  # a clean whole-page chunk is only ever hashed if not mapped
    mapped_chunks = sum(1 for t, _ in states if t is not None)
    assert mapped_chunks >= len(cuts) - len(written) - 2  # all but the written chunks and the head/tail


def commit_in_child(nb, values: dict) -> None:
    """Commit as a checkpoint child does: in a forked process that lets go of the memory it saved."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            nb.commit(snapshot(values), execution_count=1, release_buffers=True)
            status = 0
        finally:
            os._exit(status)
    assert os.waitpid(pid, 0)[1] == 0


def test_a_child_lets_go_of_memory_only_after_the_last_variable_whose_buffer_shares_it(nb):
    arr = random_array(40 * MIB, seed=7)

    def over(start: int, nbytes: int) -> np.ndarray:
        """An array over part of ``arr``'s memory that shares no Python object with it (saved apart)."""
        return np.frombuffer((ctypes.c_char * nbytes).from_address(arr.ctypes.data + start), dtype=np.float64)

    values = {
        "a_whole": arr,
        "b_other": random_array(8 * MIB, seed=8),
        "c_head": over(8000, 16 * MIB),
        "d_other": random_array(8 * MIB, seed=9),
        "e_tail": over(24 * MIB, 16 * MIB),
    }
    expected = {name: value.copy() for name, value in values.items()}
    commit_in_child(nb, values)
    restored = nb.load_latest().values
    for name, value in expected.items():
        assert np.array_equal(restored[name], value), name


def test_a_child_lets_go_of_no_memory_before_the_end_while_a_read_only_buffer_may_share_it(nb):
    arr = random_array(16 * MIB, seed=10)
    # Read-only, over arr's memory, with no ndarray base: saved apart, and where it lies is not known.
    view = np.frombuffer(memoryview(arr).cast("B")[: 8 * MIB].toreadonly(), dtype=np.float64)
    expected = view.copy()
    commit_in_child(nb, {"a_first": arr, "b_view": view})
    assert np.array_equal(nb.load_latest().values["b_view"], expected)


# --- arrays backed by their chunk files -----------------------------------------------------------


def test_an_adopted_array_keeps_its_values_and_its_writes(nb):
    arr = random_array(32 * MIB, seed=4)
    copy = arr.copy()
    first = commit(nb, {"arr": arr})
    adopted, left = mapping.Adopter(nb.blob_path).adopt(first.adoptable, 60.0)
    assert adopted == 64 and left == []  # every chunk but the head and tail pieces (shorter than a page)
    assert np.array_equal(arr, copy)
    arr[1_000_000] = 42.0
    copy[1_000_000] = 42.0
    arr *= 2
    copy *= 2
    assert np.array_equal(arr, copy)
    assert np.array_equal(nb.load_latest().values["arr"], random_array(32 * MIB, seed=4))  # the blobs unchanged


def test_a_chunk_written_after_the_checkpoint_is_not_adopted(nb):
    arr = random_array(40 * MIB, seed=5)  # over 32 MiB: malloc always gets it from mmap
    first = commit(nb, {"arr": arr})
    arr[600_000] = 7.0  # in a chunk the checkpoint wrote before this write
    adopted, _ = mapping.Adopter(nb.blob_path).adopt(first.adoptable, 60.0)
    assert adopted == len(first.adoptable[0][2]) - 1
    assert arr[600_000] == 7.0


def test_memory_malloc_gets_back_from_an_adopted_array_is_zeroed_by_calloc(nb):
    arr = random_array(64 * MIB, seed=6)
    first = commit(nb, {"arr": arr})
    assert mapping.Adopter(nb.blob_path).adopt(first.adoptable, 60.0)[0] > 0
    del arr, first
    again = np.zeros(8 * MIB)  # calloc: trusts fresh memory to be zero
    assert not again.any()


def test_a_view_into_the_middle_of_an_array_is_never_adopted(nb):
    base = random_array(16 * MIB, seed=7)
    view = base[1000:]
    first = commit(nb, {"view": np.frombuffer(memoryview(view), dtype=np.float64)})
    assert mapping.Adopter(nb.blob_path).adopt(first.adoptable, 60.0)[0] == 0


def test_glibc_header_check_refuses_heap_memory(nb):
    small = np.ones(100_000)  # 800 KB: below the mmap threshold malloc may keep it in its heap
    address = small.ctypes.data
    header = ctypes.c_uint64.from_address(address - 8).value
    first = commit(nb, {"small": small})
    adopted, _ = mapping.Adopter(nb.blob_path).adopt(first.adoptable, 60.0)
    assert adopted == 0 or header & 0x2  # only ever memory malloc says it got from mmap


# --- real kernels ---------------------------------------------------------------------------------


#: Arrays backed by their chunk files (off by default: see c.DurableKernel.map_arrays).
MAPPED = ["--DurableKernel.map_arrays=True"]


def outcome(kernel, field: str) -> int:
    return int(kernel.value(f"get_ipython().kernel.last_outcome.{field}"))


def wait_adopted(kernel, at_least: int) -> None:
    """Wait until the kernel has backed ``at_least`` chunks by their files and has nothing left to do
    (it does so between cells: polled with silent requests, which take no checkpoint)."""
    deadline = time.monotonic() + 120
    check = f"a = get_ipython().kernel.adoption\nassert a.adopted >= {at_least} and not a.busy, (a.adopted, a.busy)"
    while True:
        out = kernel.execute(check, silent=True)
        if not out.error:
            return
        assert time.monotonic() < deadline, out.error
        time.sleep(0.2)


def test_a_cell_that_changes_nothing_hashes_no_chunk_of_a_large_array(start_kernel):
    kernel = start_kernel(session="chunks.ipynb", extra_arguments=MAPPED)
    assert not kernel.execute("import numpy as np\nbig = np.random.default_rng(0).random(32 << 20)").error
    wait_saved(kernel)
    assert outcome(kernel, "bytes_hashed") >= 256 * MIB  # the first checkpoint reads everything
    wait_adopted(kernel, 500)
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    assert outcome(kernel, "bytes_hashed") < MIB  # 256 MiB, none of it read (only the head page)
    assert not kernel.execute("big[20_000_000] = -1.0").error
    wait_saved(kernel)
    assert outcome(kernel, "bytes_hashed") <= 2 * chunking.BUFFER_CHUNK_BYTES  # the chunk, the head and the tail
    assert outcome(kernel, "bytes_written") < MIB


def test_a_killed_kernel_brings_back_an_array_changed_after_it_was_backed_by_its_chunks(start_kernel):
    kernel = start_kernel(session="chunks.ipynb", extra_arguments=MAPPED)
    assert not kernel.execute("import numpy as np\nbig = np.random.default_rng(0).random(8 << 20)").error
    wait_saved(kernel)
    wait_adopted(kernel, 120)
    assert not kernel.execute("big[5_000_000] = 42.0\nbig[:1000] *= 2").error
    wait_saved(kernel)
    kernel.kill()
    again = start_kernel(session="chunks.ipynb", extra_arguments=MAPPED)
    holds(
        again,
        "big[5_000_000] == 42.0 and np.array_equal(big[1000:5_000_000], "
        "np.random.default_rng(0).random(8 << 20)[1000:5_000_000]) and big[999] == "
        "2 * np.random.default_rng(0).random(8 << 20)[999]",
    )
    # The restored array is its chunk files, mapped: a change is seen as one chunk again.
    assert not again.execute("big[6_000_000] = 1.0").error
    wait_saved(again)
    assert outcome(again, "bytes_hashed") <= 2 * chunking.BUFFER_CHUNK_BYTES


def test_no_array_is_backed_by_its_chunks_while_a_thread_of_the_users_runs(start_kernel):
    kernel = start_kernel(session="chunks.ipynb", extra_arguments=MAPPED)
    cell = (
        "import threading, numpy as np\nstop = threading.Event()\n"
        "worker = threading.Thread(target=stop.wait)\nworker.start()\n"
        "big = np.random.default_rng(0).random(8 << 20)"
    )
    assert not kernel.execute(cell).error
    wait_saved(kernel)
    time.sleep(1)
    holds(kernel, "get_ipython().kernel.adoption.adopted == 0")  # the thread could write `big` meanwhile
    assert not kernel.execute("stop.set()\nworker.join()").error
    wait_adopted(kernel, 100)


def test_a_chunk_file_written_in_place_under_a_backed_array_is_told_and_saved_as_memory_now_holds(
    start_kernel, jupyter_dirs
):
    kernel = start_kernel(session="chunks.ipynb", extra_arguments=MAPPED)
    assert not kernel.execute("import numpy as np\nbig = np.random.default_rng(0).random(8 << 20)").error
    wait_saved(kernel)
    wait_adopted(kernel, 120)
    nb = open_store(environ=jupyter_dirs).notebook("chunks.ipynb")
    manifest = nb.read_manifest(nb.checkpoint_ids()[0])
    chunk = next(v["buffers"][20] for v in manifest.variables if v["name"] == "big")
    with open(nb.blob_path(chunk["digest"]), "r+b") as f:  # one byte, in place: the array's clean pages show it
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    told = kernel.execute("y = 2").stderr
    assert "was changed on disk while big was backed by it" in told, told
    checksum = kernel.value("float(big.sum())")
    wait_saved(kernel)
    kernel.kill()
    again = start_kernel(session="chunks.ipynb", extra_arguments=MAPPED)
    assert again.value("float(big.sum())") == checksum  # what memory held, saved under its true digest


def test_by_default_arrays_are_not_backed_by_their_chunk_files(start_kernel):
    kernel = start_kernel(session="chunks.ipynb", extra_arguments=["--DurableKernel.track_writes=False"])
    assert not kernel.execute("import numpy as np\nbig = np.random.default_rng(0).random(8 << 20)").error
    wait_saved(kernel)
    holds(kernel, "get_ipython().kernel.adoption is None")
    assert not kernel.execute("x = 1").error
    wait_saved(kernel)
    assert outcome(kernel, "bytes_hashed") >= 64 * MIB  # read again: nothing tells what changed
    kernel.kill()
    again = start_kernel(session="chunks.ipynb")
    holds(again, "np.array_equal(big, np.random.default_rng(0).random(8 << 20))")
    holds(again, "any('/blobs/' in line for line in open('/proc/self/maps'))")  # restored arrays are mapped


def test_chunk_digests_hashed_on_several_threads_come_back_in_chunk_order():
    # 37 chunks of unequal sizes, 12 MiB in all: enough to be hashed in parallel.
    chunks = [os.urandom((i % 5 + 1) * 64 * 1024) for i in range(37)] + [os.urandom(6 << 20)]
    assert digests(chunks) == [digest(c) for c in chunks]
