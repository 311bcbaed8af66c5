#!/usr/bin/env python
"""Checkpoint cost of durable-kernel against its baselines, measured in one run (issue 3).

    python benchmarks/bench_checkpoints.py [--sizes 0.1,1,4] [--cells 50] [--profile]

For each size S (GiB of state) the workload is: a float64 numpy array of S/2 GiB,
a 5-column pandas DataFrame (3 float64 + 2 int64 columns) of S/2 GiB, 200k small
dicts (``rows``) and a lambda.  Phases, one after the other so that at most one
kernel holds the workload at a time:

1. stock ``python3`` ipykernel: build the workload, time trivial cells (``x = 1``).
2. ``durable-python3`` with a private store: first full checkpoint (vs ``dd``),
   trivial cells, one-small-variable change (bytes written), memory of the
   checkpoint child, then restore (kernel start to first result vs reading the
   checkpoint's bytes, warm and cold page cache).
3. in-process: ``dill.dump_module`` of the same namespace (the naive design),
   ``snapshot`` + ``NotebookStore.commit`` with their peak-RSS growth, and (once)
   200k small dicts: ``snapshot`` vs ``dill.dumps``.

Prints one markdown table (columns: sizes) and one line per target, and writes
both to ``benchmarks/results/latest.md`` (raw numbers to ``latest.json``).
The kernels run the *installed* durable_kernel package.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import cProfile
import datetime
import gc
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
GIB = 1 << 30
MIB = 1 << 20
SESSION = "bench"
KERNEL_TIMEOUT = 3600.0
#: command-line options of every durable kernel started (``--map-arrays``)
DURABLE_ARGUMENTS: list[str] = []
#: first cell after a restore: uses every variable (one value of the array and a column, a dict, the lambda)
RESTORE_CELL = "print(len(rows), arr.shape, df.shape, float(arr[-1]), float(df['a'].iloc[-1]), rows[-1]['id'], f(2))"


# --- workload -------------------------------------------------------------------


def data_code(gib: float) -> str:
    """Cell building the numpy/pandas half of the workload (about ``gib`` GiB)."""
    n_arr = int(gib * GIB / 2 / 8)
    n_rows = int(gib * GIB / 2 / (5 * 8))
    return f"""\
import numpy as np
import pandas as pd
_bench_rng = np.random.default_rng(0)
arr = _bench_rng.random({n_arr})
df = pd.DataFrame({{
    "a": _bench_rng.random({n_rows}),
    "b": _bench_rng.random({n_rows}),
    "c": _bench_rng.random({n_rows}),
    "i": np.arange({n_rows}, dtype=np.int64),
    "j": _bench_rng.integers(0, 1 << 40, {n_rows}),
}})
del _bench_rng
"""


def rest_code(n_dicts: int) -> str:
    """Cell adding the small objects: ``rows`` (small dicts), a lambda and a small int."""
    return f"""\
rows = [{{"id": i, "name": f"user{{i}}", "score": i * 0.5}} for i in range({n_dicts})]
f = lambda x: x * 2
small = 0
"""


SHARED_CODE = """\
import numpy as np
class Node:
    def __init__(self, parent=None):
        self.parent, self.children, self.value = parent, [], 0.5
        if parent is not None:
            parent.children.append(self)
root = Node()
for _ in range(200):
    branch = Node(root)
    for _ in range(100):
        Node(branch)
leaf = root.children[7].children[3]          # a part kept in its own variable
arrays = {f"a{i}": np.ones(1_000_000) for i in range(10)}
first = arrays["a0"]                          # an array of a dict, in its own variable
alone = [{"id": i} for i in range(20_000)]    # shares nothing
"""


def build_shared() -> types.ModuleType:
    """Objects shared between variables: a 20k-node tree and a part of it, a dict of arrays and one of them."""
    mod = types.ModuleType("bench_shared")
    sys.modules[mod.__name__] = mod
    exec(SHARED_CODE, mod.__dict__)
    return mod


#: cells timed right after a fresh allocation (where a new user once saw +9-12 ms at 2 GiB)
FRESH_CELLS = 20
#: checkpoints timed per case of issue 14's target 2 (the median is judged: one checkpoint alone is at the VM's mercy)
CHECKPOINT_REPEATS = 5


def fresh_code(gib: float) -> str:
    """A new array of a quarter of the workload's size, computed in one cell."""
    return f"fresh = np.random.default_rng(1).random({int(gib * GIB / 4 / 8)})"


# --- helpers --------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rss_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def smaps_kib(pid: int) -> dict[str, int] | None:
    """Fields of /proc/<pid>/smaps_rollup, KiB (None once the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return out or None


def anon_pss_kib(pid: int) -> int | None:
    """Proportional anonymous memory of a process: summed over processes, physical RAM counted once."""
    info = smaps_kib(pid)
    if info is None:
        return None
    return info.get("Pss_Anon", info.get("Pss", 0))


def children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return [k for k in kids if _state(k) not in ("Z", "X", "")]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class MemPoller:
    """Extra memory while a checkpoint child lives: Pss_Anon(kernel) + Pss_Anon(child) - Pss_Anon(kernel before).

    Pss splits each shared page between the processes mapping it, so the sum
    counts every physical page once: what the fork costs is exactly the pages
    copied on write (by either side) plus the child's own allocations.  A
    sample counts only if the same child is alive (not a zombie) before and
    after it.

    Except for huge pages the child unmaps in part (a chunk of an array it let
    go of, ``buffers_first.py``): Linux then counts the whole huge page in the
    parent's Pss and its mapped part in the child's, so the sum over-counts by
    hundreds of MiB where nothing was copied.  ``anon_extra_max`` is what was
    really allocated: the growth of the system's anonymous pages (``AnonPages``
    in /proc/meminfo; on a machine doing nothing else, that is the kernel, its
    child, and this benchmark's few samples).
    """

    def __init__(self, pid: int, period: float = 0.01, field: str = "Pss_Anon"):
        self.pid, self.period, self.field = pid, period, field
        self.base = self._pss(pid) or 0  # KiB, before the checkpoint
        self.extra_max = 0  # KiB
        self.child_dirty_max = 0  # KiB, Private_Dirty of the child (its copies and allocations)
        self.samples = 0
        self.anon_base = _anon_pages_kib()
        self.anon_extra_max = 0  # KiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pss(self, pid: int) -> int | None:
        info = smaps_kib(pid)
        return None if info is None else info.get(self.field, info.get("Pss", 0))

    def __enter__(self) -> MemPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon_extra_max = max(self.anon_extra_max, _anon_pages_kib() - self.anon_base)
            kids = children(self.pid)
            if kids:
                child = [smaps_kib(k) for k in kids]
                parent = self._pss(self.pid)
                if children(self.pid) == kids and None not in child and parent is not None:
                    self.samples += 1
                    child_pss = sum(c.get(self.field, c.get("Pss", 0)) for c in child)  # type: ignore[union-attr]
                    self.extra_max = max(self.extra_max, parent + child_pss - self.base)
                    dirty = sum(c.get("Private_Dirty", 0) for c in child)  # type: ignore[union-attr]
                    self.child_dirty_max = max(self.child_dirty_max, dirty)
            self._stop.wait(self.period)


def _anon_pages_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("AnonPages:"):
                return int(line.split()[1])
    return 0


def drop_caches_method(probe_dir: Path) -> str:
    """How a cold page cache can be had here: 'drop_caches', 'fadvise' or ''."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        return "drop_caches"
    except OSError:
        pass
    return "fadvise" if hasattr(os, "posix_fadvise") else ""


def make_cold(method: str, files: list[Path]) -> None:
    os.sync()
    if method == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
    elif method == "fadvise":
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_files(files: list[Path]) -> float:
    """Seconds to read every byte of ``files`` (buffered reads into one reused buffer)."""
    buf = bytearray(64 * MIB)
    view = memoryview(buf)
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - started


def dd_seconds(folder: Path, mib: int) -> float:
    target = folder / "dd.test"
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={max(mib, 1)}", "conv=fdatasync"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


# --- talking to a kernel ----------------------------------------------------------


@dataclass
class Run:
    seconds: float
    reply: dict[str, Any]
    stdout: str = ""
    stderr: str = ""
    error: str = ""


class BenchKernel:
    """A kernel through jupyter_client, with execute timed from request sent to reply and idle received."""

    def __init__(self, name: str, env: dict[str, str], log_file: Path, first_cell: str = "1 + 1"):
        from durable_kernel.testing import KernelProcess

        started = time.perf_counter()
        extra = DURABLE_ARGUMENTS if name == "durable-python3" else []
        self.k = KernelProcess(
            name, env=env, log_file=str(log_file), startup_timeout=KERNEL_TIMEOUT, extra_arguments=extra
        )
        self.kc = self.k.kc
        first = self.run(first_cell)
        self.start_to_first_result = time.perf_counter() - started
        self.first = first
        self.log_file = log_file

    @property
    def pid(self) -> int:
        return self.k.pid

    def run(
        self, code: str, silent: bool = False, user_expressions: dict[str, str] | None = None, check: bool = True
    ) -> Run:
        from durable_kernel.testing import collect

        kc = self.kc
        started = time.perf_counter()
        msg_id = kc.execute(code, silent=silent, store_history=not silent, user_expressions=user_expressions or {})
        got = collect(kc, msg_id, KERNEL_TIMEOUT, code)
        out = Run(time.perf_counter() - started, got.reply, got.stdout + got.result, got.stderr, got.error)
        if check and (out.error or out.reply.get("status") != "ok"):
            raise RuntimeError(f"cell {code[:60]!r} failed: {out.error or out.reply}")
        return out

    def evaluate(self, **expressions: str) -> dict[str, Any]:
        """Evaluate expressions in the kernel (silently: no checkpoint, no history)."""
        res = self.run("", silent=True, user_expressions=expressions)
        values = {}
        for key, value in res.reply["user_expressions"].items():
            if value.get("status") != "ok":
                raise RuntimeError(f"{expressions[key]!r}: {value.get('ename')}: {value.get('evalue')}")
            values[key] = ast.literal_eval(value["data"]["text/plain"])
        return values

    def wait_checkpoint(self) -> dict[str, Any]:
        """Wait for the checkpoint in flight; the kernel's ``last_outcome`` after it, as a dict."""
        got = self.evaluate(
            ok=f"get_ipython().kernel.wait_for_checkpoint({KERNEL_TIMEOUT})",
            result="__import__('json').dumps(__import__('dataclasses').asdict(get_ipython().kernel.last_outcome) if get_ipython().kernel.last_outcome else {}, default=str)",
        )
        if not got["ok"]:
            raise RuntimeError("checkpoint still running after the timeout")
        result = json.loads(got["result"])
        if result and not result.get("ok"):
            raise RuntimeError(f"checkpoint failed: {result.get('error')}")
        return result

    def quiesce(self) -> None:
        """Stock kernel equivalent of wait_checkpoint: one silent round trip."""
        self.run("", silent=True)

    def shutdown(self) -> None:
        self.k.shutdown()


def kernel_env(tmp: Path, durable: bool) -> dict[str, str]:
    env = {"JUPYTER_DATA_DIR": str(tmp / "jupyter-data"), "PYTHONWARNINGS": "ignore"}
    if durable:
        env.update(DURABLE_KERNEL_DIR=str(tmp / "store"), DURABLE_KERNEL_SESSION=SESSION)
    return env


def time_cells(kernel: BenchKernel, cells: int, between) -> list[float]:
    times = []
    for _ in range(cells):
        if between is not None:
            between()
        res = kernel.run("x = 1")
        if res.stderr.strip():
            print(f"    kernel said: {res.stderr.strip()[:200]}", flush=True)
        times.append(res.seconds)
    return times


# --- phases -----------------------------------------------------------------------


def stock_phase(gib: float, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    r: dict[str, Any] = {}
    k = BenchKernel("python3", kernel_env(tmp, False), tmp / "stock.log")
    try:
        r["start_empty_s"] = k.start_to_first_result
        rss0 = rss_kib(k.pid)["VmRSS"]
        k.run(data_code(gib))
        k.run(rest_code(args.dicts))
        gc_hint = k.run("import gc; gc.collect()")
        del gc_hint
        r["namespace_rss_bytes"] = (rss_kib(k.pid)["VmRSS"] - rss0) * 1024
        time_cells(k, 5, k.quiesce)
        r["lat_paced_ms"] = [t * 1e3 for t in time_cells(k, args.cells, k.quiesce)]
        r["lat_b2b_ms"] = [t * 1e3 for t in time_cells(k, args.cells, None)]
        k.run(fresh_code(gib))
        r["lat_fresh_ms"] = [t * 1e3 for t in time_cells(k, FRESH_CELLS, k.quiesce)]
    finally:
        k.shutdown()
    return r


def checkpoint_files(store_root: Path, jupyter_data: Path) -> tuple[list[Path], int]:
    """Files (manifest + blobs) of the newest checkpoint of SESSION, and their bytes."""
    from durable_kernel.checkpoints import manifest as manifest_format
    from durable_kernel.checkpoints.location import open_store

    nb = open_store(environ={"DURABLE_KERNEL_DIR": str(store_root), "JUPYTER_DATA_DIR": str(jupyter_data)}).notebook(
        SESSION
    )
    gen = nb.checkpoint_ids()[0]
    man = nb.read_manifest(gen)
    files = [nb.manifest_path(gen)]
    raw = files[0].read_bytes()
    data = json.loads(raw.split(b"\n", 2)[2])
    del man
    files += [nb.blob_path(d) for d in sorted(manifest_format.referenced_blobs(data))]
    return files, sum(p.stat().st_size for p in files)


def wait_adopted(k: BenchKernel, limit: float = 600.0) -> float:
    """Seconds until the kernel has backed its arrays by their chunk files (it does so between cells)."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if not k.evaluate(busy="getattr(get_ipython().kernel.adoption, 'busy', False)")["busy"]:
            break
        time.sleep(0.05)
    return time.perf_counter() - started


def changes_in_place(k: BenchKernel, r: dict[str, Any]) -> None:
    """Issue 14: what a checkpoint costs after a change inside a large variable, and memory while the user
    writes a large array during a checkpoint; then per-cell latency right after a fresh allocation."""
    r["adopt_wait_s"] = wait_adopted(k)
    r["trivial_ckpts"] = []
    for i in range(CHECKPOINT_REPEATS):
        k.run(f"x = {i + 2}")
        r["trivial_ckpts"].append(k.wait_checkpoint())
    r["arr_elem_ckpts"] = []
    for i in range(CHECKPOINT_REPEATS):
        k.run(f"arr[len(arr) // 2] = {i + 1}.0")  # a new value each time: each checkpoint has a chunk to store
        r["arr_elem_ckpts"].append(k.wait_checkpoint())
    k.run("df.iloc[len(df) // 2, 0] = 1.0")
    r["df_cell_ckpt"] = k.wait_checkpoint()
    wait_adopted(k)
    # A trivial cell's checkpoint, while the next cell writes the whole array.
    with MemPoller(k.pid, period=0.005, field="Pss") as during_trivial:
        k.run("small = 4")
        k.run("arr += 1.0")
        k.wait_checkpoint()
    # The checkpoint that reads the whole array again, while the next cell writes it once more.
    with MemPoller(k.pid, period=0.005, field="Pss") as during_full:
        k.run("arr += 1.0")
        k.run("arr += 1.0")
        r["arr_full_ckpt"] = k.wait_checkpoint()
    r["mem_mutate_kib"] = (
        during_trivial.extra_max,
        during_trivial.child_dirty_max,
        during_trivial.samples,
        during_trivial.anon_extra_max,
    )
    r["mem_mutate_full_kib"] = (
        during_full.extra_max,
        during_full.child_dirty_max,
        during_full.samples,
        during_full.anon_extra_max,
    )
    wait_adopted(k)
    k.run(fresh_code(r["gib"]))
    r["lat_fresh_ms"] = [t * 1e3 for t in time_cells(k, FRESH_CELLS, k.wait_checkpoint)]
    r["fresh_ckpt"] = k.wait_checkpoint()
    k.run("del fresh")
    k.wait_checkpoint()


def durable_phase(gib: float, args: argparse.Namespace, tmp: Path, cold_method: str) -> dict[str, Any]:
    from durable_kernel.checkpoints import disk_usage, folder_name

    r: dict[str, Any] = {"gib": gib}
    env = kernel_env(tmp, True)
    store_root = tmp / "store"
    nb_dir = store_root / folder_name(SESSION)
    k = BenchKernel("durable-python3", env, tmp / "durable.log")
    try:
        r["start_empty_s"] = k.start_to_first_result
        k.wait_checkpoint()
        rss0 = rss_kib(k.pid)["VmRSS"]

        # 3. throughput: the first checkpoint holding the numpy/pandas data
        k.run(data_code(gib))
        first = k.wait_checkpoint()
        r["first_ckpt"] = first
        r["dd_s"] = dd_seconds(store_root, max(1, round(first["bytes_written"] / MIB)))
        print(
            f"    first checkpoint: {first['bytes_written'] / MIB:.0f} MiB in {first['wall_seconds']:.2f} s "
            f"(commit {first['seconds']:.2f} s); dd: {r['dd_s']:.2f} s",
            flush=True,
        )

        k.run(rest_code(args.dicts))
        r["rows_ckpt"] = k.wait_checkpoint()
        k.run("import gc; gc.collect()")
        k.wait_checkpoint()
        r["namespace_rss_bytes"] = (rss_kib(k.pid)["VmRSS"] - rss0) * 1024

        # 1. per-cell latency: paced (checkpoint idle before each cell) and back to back
        time_cells(k, 5, k.wait_checkpoint)
        r["lat_paced_ms"] = [t * 1e3 for t in time_cells(k, args.cells, k.wait_checkpoint)]
        r["steady_ckpt"] = k.wait_checkpoint()
        r["lat_b2b_ms"] = [t * 1e3 for t in time_cells(k, args.cells, None)]
        k.wait_checkpoint()
        # the same, with quick cells sharing checkpoints (opt-in: c.DurableKernel.coalesce_seconds)
        k.run("get_ipython().kernel.coalesce_seconds = 0.25")
        r["lat_b2b_coalesced_ms"] = [t * 1e3 for t in time_cells(k, args.cells, None)]
        k.run("get_ipython().kernel.coalesce_seconds = 0.0")
        k.wait_checkpoint()
        changes_in_place(k, r)

        # 2. write amplification: one small variable changes
        before = disk_usage(nb_dir)
        k.run("small = 1")
        r["small_ckpt"] = k.wait_checkpoint()
        r["small_store_delta"] = disk_usage(nb_dir) - before
        k.run("rows[0]['score'] = -1.0")  # informational: one dict inside the big list changes
        r["rowchange_ckpt"] = k.wait_checkpoint()

        # 5. memory of a checkpoint as the kernel takes it (forked child + parent copy-on-write)
        with MemPoller(k.pid) as steady_mem:
            k.run("small = 2")
            r["mem_steady_ckpt"] = k.wait_checkpoint()
        # a full checkpoint again: same kernel, new (empty) notebook folder in the store
        k.evaluate(switch="get_ipython().kernel._use_identity('bench-memory')")
        with MemPoller(k.pid) as full_mem:
            k.run("small = 3")
            r["mem_full_ckpt"] = k.wait_checkpoint()
        k.evaluate(switch=f"get_ipython().kernel._use_identity({SESSION!r})")
        r["mem_steady_kib"] = (
            steady_mem.extra_max,
            steady_mem.child_dirty_max,
            steady_mem.samples,
            steady_mem.anon_extra_max,
        )
        r["mem_full_kib"] = (full_mem.extra_max, full_mem.child_dirty_max, full_mem.samples, full_mem.anon_extra_max)
        r["kernel_rss_kib"] = rss_kib(k.pid)
    finally:
        k.shutdown()

    # 4. restore: kernel start to first result vs reading the checkpoint's bytes
    files, nbytes = checkpoint_files(store_root, tmp / "jupyter-data")
    r["ckpt_bytes"] = nbytes
    read_files(files)
    r["read_warm_s"] = min(read_files(files) for _ in range(2))
    # the first cell uses every restored variable, so a lazy restore cannot hide its cost
    k = BenchKernel("durable-python3", env, tmp / "restore-warm.log", first_cell=RESTORE_CELL)
    r["restore_warm_s"] = k.start_to_first_result
    check = k.first.stdout.strip()
    restored_ok = "restored" in k.k.banner and check.startswith(str(args.dicts))
    k.shutdown()
    if not restored_ok:
        raise RuntimeError(f"restore did not bring the workload back: {check!r} / {k.k.banner[-300:]!r}")
    if cold_method:
        make_cold(cold_method, files)
        r["read_cold_s"] = read_files(files)
        make_cold(cold_method, files)
        k = BenchKernel("durable-python3", env, tmp / "restore-cold.log", first_cell=RESTORE_CELL)
        r["restore_cold_s"] = k.start_to_first_result
        k.shutdown()
    return r


# --- changes inside large variables (issue 14) ----------------------------------------

#: (what changes, the variable's setup, the change, the variable, target bytes written): each in a kernel of its
#: own, the variable alone in it (beside ``small``); then all four in one kernel, for the manifest's share.
CHANGES = [
    (
        "one element of a 1 GiB array",
        "big = np.random.default_rng(0).random(1 << 27)",
        "big[len(big) // 2] = -1.0",
        "big",
        MIB,
    ),
    (
        "one field of one dict among 2M dicts",
        "dicts = [{'id': i, 'name': f'user{i}', 'score': i * 0.5} for i in range(2_000_000)]",
        "dicts[1_000_000]['score'] = -1.0",
        "dicts",
        256 * 1024,
    ),
    (
        "one string appended to 1M strings",
        "strings = [f'line {i} of a long text' for i in range(1_000_000)]",
        "strings.append('one more line')",
        "strings",
        256 * 1024,
    ),
    (
        "one cell of a 1 GiB DataFrame",
        "frame = pd.DataFrame({c: np.random.default_rng(1).random(1 << 25) for c in 'abcd'})",
        "frame.iloc[len(frame) // 2, 0] = -1.0",
        "frame",
        MIB,
    ),
]
TOGETHER = ("a new small variable, all four beside it", "small = 1", "small")


def changes_phase(tmp: Path) -> dict[str, Any]:
    """Bytes written after one small change inside each kind of large variable, against its stored size."""
    from durable_kernel.checkpoints.location import open_store

    out: dict[str, Any] = {"rows": []}
    kernels = [([setup], [(what, cell, name, target)]) for what, setup, cell, name, target in CHANGES]
    kernels.append(([setup for _, setup, _, _, _ in CHANGES], [(*TOGETHER, None)]))
    for n, (setups, cells) in enumerate(kernels):
        env = kernel_env(tmp / f"k{n}", True)
        k = BenchKernel("durable-python3", env, tmp / f"changes-{n}.log")
        try:
            k.run("import numpy as np\nimport pandas as pd\nsmall = 0\n" + "\n".join(setups))
            k.wait_checkpoint()
            wait_adopted(k)
            nb = open_store(environ=env).notebook(SESSION)
            for what, cell, name, target in cells:
                k.run(cell)
                done = k.wait_checkpoint()
                man = nb.read_manifest(nb.checkpoint_ids()[0])
                size = next((v.get("size", 0) for v in man.variables if v["name"] == name), 0)
                raw = nb.manifest_path(nb.checkpoint_ids()[0]).stat().st_size
                out["rows"].append(
                    {
                        "what": what,
                        "cell": cell,
                        "written": done["bytes_written"],
                        "manifest": raw,
                        "hashed": done.get("bytes_hashed", 0),
                        "wall": done["wall_seconds"],
                        "variable": size,
                        "target": target,
                    }
                )
                print(f"    {what}: {fmt_bytes(done['bytes_written'])} written (manifest {fmt_bytes(raw)})", flush=True)
        finally:
            k.shutdown()
            shutil.rmtree(tmp / f"k{n}", ignore_errors=True)
    return out


def changes_table(c: dict[str, Any]) -> str:
    lines = [
        "| cell (each variable alone in its kernel; the last row: all four together) | bytes written "
        "| of which the manifest | buffers hashed | fork → committed | the variable, stored | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in c["rows"]:
        verdict = (
            "-"
            if row["target"] is None
            else (f"≤ {fmt_bytes(row['target'])}: **{'met' if row['written'] <= row['target'] else 'NOT met'}**")
        )
        lines.append(
            f"| `{row['cell']}` ({row['what']}) | **{fmt_bytes(row['written'])}** | {fmt_bytes(row['manifest'])} "
            f"| {fmt_bytes(row['hashed'])} | {row['wall']:.2f} s | {fmt_bytes(row['variable'])} | {verdict} |"
        )
    return "\n".join(lines)


# --- object storage (issue 13) -------------------------------------------------------


def object_storage_phase(gib: float, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """A bucket store on a real S3 server (SeaweedFS on this machine), against the same library's plain
    put and get of the same bytes, and per-cell latency of a kernel with a bucket store vs a folder."""
    import numpy as np
    import obstore
    from durable_kernel.checkpoints import Store, serialize, sync
    from durable_kernel.checkpoints.bucket import Bucket

    sys.path.insert(0, str(REPO / "tests"))
    from s3_support import SeaweedS3

    r: dict[str, Any] = {"gib": gib}
    server = SeaweedS3(tmp / "seaweedfs")
    server.start()
    try:
        os.environ.update(server.env())
        url = server.create_bucket("bench") + "/state"
        bucket = Bucket(url)
        plain = obstore.store.from_url(
            "s3://bench/plain", config={"endpoint": server.endpoint}, client_options={"allow_http": "true"}
        )
        key = b"0" * 64
        machine_a = Store(tmp / "cache-a", key).notebook(SESSION)
        ns = {"arr": np.random.default_rng(0).random(int(gib * GIB / 8)), "small": 1}
        machine_a.commit(serialize.snapshot(ns), execution_count=1)
        blob_files = [machine_a.blob_path(d) for d in machine_a.read_manifest(1).blob_digests()]
        r["bytes"] = sum(f.stat().st_size for f in blob_files)

        # 1. the first upload vs a plain put of the same bytes (each blob file), same library
        started = time.perf_counter()
        for i, f in enumerate(blob_files):
            with open(f, "rb") as fh:
                obstore.put(plain, f"blob{i}", fh)
        r["plain_put_s"] = time.perf_counter() - started
        started = time.perf_counter()
        first = sync.upload_newest(machine_a, bucket)
        r["upload_s"] = time.perf_counter() - started
        assert first is not None and first.blobs == len(blob_files)

        # 2. bytes uploaded after a small change
        ns["small"] = 2
        machine_a.commit(serialize.snapshot(ns), execution_count=2)
        small = sync.upload_newest(machine_a, bucket)
        r["small_upload_bytes"] = small.bytes if small else 0

        # 3. restore on a fresh machine (download, verify, unpickle) vs plain GETs of the same bytes
        # Interleaved, best of two each: the server's own files may or may not be in the page cache.
        plain_s, restore_s = [], []
        for attempt in range(2):
            started = time.perf_counter()
            for i in range(len(blob_files)):
                obstore.get(plain, f"blob{i}").bytes()
            plain_s.append(time.perf_counter() - started)
            machine_b = Store(tmp / f"cache-b{attempt}", key).notebook(SESSION)
            started = time.perf_counter()
            got = sync.download_newest(machine_b, bucket)
            restored = machine_b.load_latest()
            restore_s.append(time.perf_counter() - started)
            assert got.generation is not None and restored is not None
            assert float(restored.values["arr"][-1]) == float(ns["arr"][-1]) and restored.values["small"] == 2
            del restored
            shutil.rmtree(tmp / f"cache-b{attempt}")
        r["plain_get_s"], r["restore_s"] = min(plain_s), min(restore_s)
        del ns

        # 4. per-cell latency: stock ipykernel, a folder store, a bucket store (same workload, paced)
        cells = max(10, args.cells // 2)
        for label, name, env in (
            ("stock", "python3", kernel_env(tmp / "k-stock", False)),
            ("folder", "durable-python3", kernel_env(tmp / "k-folder", True)),
            (
                "bucket",
                "durable-python3",
                {**kernel_env(tmp / "k-bucket", True), **server.env(), "DURABLE_KERNEL_DIR": url + "-kernel"},
            ),
        ):
            k = BenchKernel(name, env, tmp / f"os-{label}.log")
            try:
                pace = k.quiesce if label == "stock" else k.wait_checkpoint
                k.run(f"import numpy as np\narr = np.random.default_rng(0).random({int(gib * GIB / 8)})")
                pace()
                if label == "bucket":  # steady state: the first upload (of the array) is done
                    k.evaluate(ok="get_ipython().kernel.wait_for_upload(1800)")
                time_cells(k, 3, pace)
                r[f"lat_{label}_ms"] = [t * 1e3 for t in time_cells(k, cells, pace)]
                if label == "bucket":
                    ok = k.evaluate(ok="get_ipython().kernel.wait_for_upload(600)")["ok"]
                    r["bucket_kernel_uploaded"] = ok
            finally:
                k.shutdown()
    finally:
        server.close()
    return r


def object_storage_table(r: dict[str, Any]) -> str:
    """The object-storage rows: measured, baseline, ratio, target."""
    med = {label: median(r[f"lat_{label}_ms"]) for label in ("stock", "folder", "bucket")}
    rows = [
        "| object storage (SeaweedFS, this machine) | measured | baseline (same run) | ratio | target |",
        "|---|---|---|---|---|",
        f"| first checkpoint upload, {fmt_bytes(r['bytes'])} | {r['upload_s']:.2f} s | obstore put of the same bytes: {r['plain_put_s']:.2f} s | {r['upload_s'] / r['plain_put_s']:.2f}x | <= 1.2x |",
        f"| restore on a fresh machine (download, verify, load; best of 2) | {r['restore_s']:.2f} s | obstore get of the same bytes (best of 2, interleaved): {r['plain_get_s']:.2f} s | {r['restore_s'] / r['plain_get_s']:.2f}x | <= 1.5x |",
        f"| bytes uploaded after a small change | {fmt_bytes(r['small_upload_bytes'])} | - | - | < 1 MiB |",
        f"| per-cell added latency, bucket store, {r['gib']:g} GiB (paced, median) | +{med['bucket'] - med['stock']:.1f} ms | folder store: +{med['folder'] - med['stock']:.1f} ms (stock {med['stock']:.1f} ms) | - | <= 5 ms |",
    ]
    return "\n".join(rows)


def build_module(gib: float, n_dicts: int) -> types.ModuleType:
    """The workload in a module object, as a kernel's ``__main__`` would hold it."""
    mod = types.ModuleType("bench_namespace")
    sys.modules[mod.__name__] = mod  # so dill refers to its globals instead of copying them
    exec(data_code(gib), mod.__dict__)
    exec(rest_code(n_dicts), mod.__dict__)
    return mod


def user_names(mod: types.ModuleType) -> list[str]:
    return [n for n in vars(mod) if not (n.startswith("__") and n.endswith("__"))]


def clear_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def inprocess_phase(gib: float, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import dill
    from durable_kernel.checkpoints import Store, snapshot
    from durable_kernel.checkpoints.blobs import digest

    r: dict[str, Any] = {}
    gc.collect()
    rss0 = rss_kib()["VmRSS"]
    mod = build_module(gib, args.dicts)
    gc.collect()
    r["namespace_rss_bytes"] = (rss_kib()["VmRSS"] - rss0) * 1024
    names = user_names(mod)

    # 7. the naive design: dill.dump_module of the whole namespace
    path = tmp / "dump_module.pkl"
    started = time.perf_counter()
    dill.dump_module(str(path), module=mod, refimported=True)
    r["dump_module_s"] = time.perf_counter() - started
    r["dump_module_bytes"] = path.stat().st_size
    path.unlink()
    gc.collect()

    # our save path, in the foreground: snapshot + commit, with peak RSS growth
    nb = Store(tmp / "inproc-store", os.urandom(32)).notebook(SESSION)
    ns = vars(mod)
    r["peak_reset"] = clear_peak()
    base = rss_kib()["VmRSS"]
    started = time.perf_counter()
    snap = snapshot(ns, names)
    r["snapshot_s"] = time.perf_counter() - started
    done = nb.commit(snap, execution_count=1)
    r["full_ckpt_s"] = time.perf_counter() - started
    r["full_commit_s"] = done.seconds
    r["full_ckpt_bytes"] = done.bytes_written
    r["snapshot_peak_extra_bytes"] = (rss_kib()["VmHWM"] - base) * 1024
    buffers = [b for v in snap.variables for b in v.buffers]
    started = time.perf_counter()
    for b in buffers:
        digest(b)
    r["digest_s"] = time.perf_counter() - started
    r["digest_bytes"] = sum(b.nbytes for b in buffers)
    r["var_sizes"] = {v.name: v.size for v in snap.variables}
    del snap, buffers
    # an unchanged namespace again (what every trivial cell costs the child)
    started = time.perf_counter()
    snap = snapshot(ns, names)
    r["steady_snapshot_s"] = time.perf_counter() - started
    done = nb.commit(snap, execution_count=2)
    r["steady_ckpt_s"] = time.perf_counter() - started
    r["steady_bytes"] = done.bytes_written
    del snap
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        snap = snapshot(ns, names)
        nb.commit(snap, execution_count=3)
        prof.disable()
        del snap
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"profile-steady-{gib:g}GiB.txt").write_text(text.getvalue())
    shutil.rmtree(tmp / "inproc-store", ignore_errors=True)

    # 6. small objects, measured once (they are the same at every size)
    if args.small_done is None:
        rows = mod.rows
        reps = args.reps
        ours, ours_commit, dills, cpickle = [], [], [], []
        import pickle

        for i in range(reps):
            started = time.perf_counter()
            snapshot({"rows": rows})
            ours.append(time.perf_counter() - started)
            nbs = Store(tmp / f"small-store-{i}", os.urandom(32)).notebook(SESSION)
            started = time.perf_counter()
            nbs.commit(snapshot({"rows": rows}), execution_count=1)
            ours_commit.append(time.perf_counter() - started)
            started = time.perf_counter()
            pickle.dumps(rows, protocol=5)
            cpickle.append(time.perf_counter() - started)
            started = time.perf_counter()
            dill.dumps(rows)
            dills.append(time.perf_counter() - started)
            shutil.rmtree(tmp / f"small-store-{i}", ignore_errors=True)
        shared = build_shared()
        shared_names = user_names(shared)
        shared_ns = vars(shared)
        snap_shared, dump_shared = [], []
        for i in range(reps):
            started = time.perf_counter()
            snap = snapshot(shared_ns, shared_names)
            snap_shared.append(time.perf_counter() - started)
            path = tmp / f"shared-{i}.pkl"
            started = time.perf_counter()
            dill.dump_module(str(path), module=shared, refimported=True)
            dump_shared.append(time.perf_counter() - started)
            path.unlink()
        groups = [v.members for v in snap.variables if v.members]
        del snap, sys.modules[shared.__name__]
        args.small_done = {
            "snapshot_s": median(ours),
            "checkpoint_s": median(ours_commit),
            "pickle_s": median(cpickle),
            "dill_s": median(dills),
            "shared_snapshot_s": median(snap_shared),
            "shared_dump_module_s": median(dump_shared),
            "shared_groups": groups,
        }
    r["small"] = args.small_done
    del sys.modules[mod.__name__]
    del mod, ns
    gc.collect()
    return r


# --- report -----------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def summarize(size_results: dict[float, dict[str, Any]]) -> dict[float, dict[str, Any]]:
    """Derived figures per size."""
    out = {}
    for gib, res in size_results.items():
        s, d, p = res["stock"], res["durable"], res["inproc"]
        m: dict[str, Any] = {}
        # The stock kernel's growth: with map_arrays the durable kernel's arrays are page cache, not resident.
        m["ns_bytes"] = max(d["namespace_rss_bytes"], s["namespace_rss_bytes"])
        m["stock_paced"] = median(s["lat_paced_ms"])
        m["stock_b2b"] = median(s["lat_b2b_ms"])
        m["dur_paced"] = median(d["lat_paced_ms"])
        m["dur_b2b"] = median(d["lat_b2b_ms"])
        m["added_paced"] = m["dur_paced"] - m["stock_paced"]
        m["added_b2b"] = m["dur_b2b"] - m["stock_b2b"]
        coalesced = d.get("lat_b2b_coalesced_ms")
        m["added_b2b_coalesced"] = median(coalesced) - m["stock_b2b"] if coalesced else None
        m["added"] = max(m["added_paced"], m["added_b2b"])
        m["p90_paced"] = sorted(d["lat_paced_ms"])[int(0.9 * (len(d["lat_paced_ms"]) - 1))]
        m["steady_wall"] = d["steady_ckpt"].get("wall_seconds", float("nan"))
        m["small_written"] = d["small_ckpt"]["bytes_written"]
        m["small_delta"] = d["small_store_delta"]
        m["row_written"] = d["rowchange_ckpt"]["bytes_written"]
        first = d["first_ckpt"]
        m["first_bytes"] = first["bytes_written"]
        m["first_wall"] = first["wall_seconds"]
        m["first_commit"] = first["seconds"]
        m["dd"] = d["dd_s"]
        m["thr_ratio"] = m["first_wall"] / m["dd"]
        m["ckpt_bytes"] = d["ckpt_bytes"]
        m["read_warm"], m["restore_warm"] = d["read_warm_s"], d["restore_warm_s"]
        m["restore_warm_ratio"] = m["restore_warm"] / m["read_warm"]
        m["read_cold"], m["restore_cold"] = d.get("read_cold_s"), d.get("restore_cold_s")
        m["restore_cold_ratio"] = m["restore_cold"] / m["read_cold"] if m["read_cold"] else None
        m["start_stock"], m["start_durable"] = s["start_empty_s"], d["start_empty_s"]
        full_extra, full_child, full_n, full_anon = d["mem_full_kib"]
        steady_extra, steady_child, steady_n, steady_anon = d["mem_steady_kib"]
        # Judged on what was allocated (AnonPages): the Pss sum over-counts partly unmapped huge pages.
        m["mem_full"] = full_anon * 1024
        m["mem_steady"] = steady_anon * 1024
        m["mem_full_parts"] = (full_anon * 1024, full_extra * 1024, full_child * 1024, full_n)
        m["mem_steady_parts"] = (steady_anon * 1024, steady_extra * 1024, steady_child * 1024, steady_n)
        m["mem_ratio"] = max(m["mem_full"], m["mem_steady"]) / m["ns_bytes"]
        m["inproc_peak"] = p["snapshot_peak_extra_bytes"] if p["peak_reset"] else None
        m["inproc_ratio"] = m["inproc_peak"] / p["namespace_rss_bytes"] if m["inproc_peak"] is not None else None
        sm = p["small"]
        m["small_snap"], m["small_ckpt"], m["small_pickle"], m["small_dill"] = (
            sm["snapshot_s"],
            sm["checkpoint_s"],
            sm["pickle_s"],
            sm["dill_s"],
        )
        m["small_ratio"] = sm["dill_s"] / sm["snapshot_s"]
        m["shared_snap"], m["shared_dump"] = sm["shared_snapshot_s"], sm["shared_dump_module_s"]
        m["shared_groups"] = sm["shared_groups"]
        m["small_ckpt_ratio"] = sm["dill_s"] / sm["checkpoint_s"]
        m["dump_module"] = p["dump_module_s"]
        m["dump_module_bytes"] = p["dump_module_bytes"]
        m["inproc_full"] = p["full_ckpt_s"]
        m["inproc_snapshot"] = p["snapshot_s"]
        m["inproc_digest"] = p["digest_s"]
        m["inproc_digest_bytes"] = p["digest_bytes"]
        m["inproc_steady"] = p["steady_ckpt_s"]
        m["inproc_steady_snapshot"] = p["steady_snapshot_s"]
        m["load"] = (res["load_before"], res["load_after"])
        # issue 14
        m["adopt_wait"] = d["adopt_wait_s"]
        for key, ckpt in (("trivial", "trivial_ckpts"), ("elem", "arr_elem_ckpts"), ("dfcell", "df_cell_ckpt")):
            taken = d[ckpt] if isinstance(d[ckpt], list) else [d[ckpt]]
            m[f"{key}_wall"] = median([c["wall_seconds"] for c in taken])
            m[f"{key}_wall_range"] = (min(c["wall_seconds"] for c in taken), max(c["wall_seconds"] for c in taken))
            m[f"{key}_commit"] = median([c["seconds"] for c in taken])
            m[f"{key}_written"] = median([c["bytes_written"] for c in taken])
            m[f"{key}_hashed"] = median([c.get("bytes_hashed", 0) for c in taken])
        m["full_rewrite_wall"] = d["arr_full_ckpt"]["wall_seconds"]
        m["mem_mut_pss"] = d["mem_mutate_kib"][0] * 1024
        m["mem_mut_full_pss"] = d["mem_mutate_full_kib"][0] * 1024
        # Judged on what was allocated (AnonPages): the Pss sum over-counts partly unmapped huge pages.
        m["mem_mut"] = d["mem_mutate_kib"][3] * 1024
        m["mem_mut_full"] = d["mem_mutate_full_kib"][3] * 1024
        m["mem_mut_ratio"] = max(m["mem_mut"], m["mem_mut_full"]) / m["ns_bytes"]
        m["fresh_stock"] = median(s["lat_fresh_ms"])
        m["fresh_durable"] = median(d["lat_fresh_ms"])
        m["fresh_added"] = m["fresh_durable"] - m["fresh_stock"]
        out[gib] = m
    return out


def table(summary: dict[float, dict[str, Any]], cells: int) -> str:
    sizes = list(summary)
    rows: list[tuple[str, Any]] = [
        ("namespace (kernel RSS growth, the larger of stock and durable)", lambda m: fmt_bytes(m["ns_bytes"])),
        (
            "1-min load average before / after this size (2 cores: > 0.5 means other work)",
            lambda m: "{:.2f} / {:.2f}".format(*m["load"]),
        ),
        (
            f"**1** stock ipykernel, `x = 1`, median of {cells}, paced / back-to-back",
            lambda m: f"{m['stock_paced']:.2f} / {m['stock_b2b']:.2f} ms",
        ),
        (
            f"**1** durable, `x = 1`, median of {cells}, paced / back-to-back",
            lambda m: f"{m['dur_paced']:.2f} / {m['dur_b2b']:.2f} ms",
        ),
        (
            "**1** added latency, paced / back-to-back (target ≤ 5 ms)",
            lambda m: f"**{m['added_paced']:+.2f} / {m['added_b2b']:+.2f} ms**",
        ),
        (
            "  added back-to-back with `coalesce_seconds = 0.25` (opt-in: quick cells share a checkpoint)",
            lambda m: "-" if m["added_b2b_coalesced"] is None else f"{m['added_b2b_coalesced']:+.2f} ms",
        ),
        ("  durable paced p90", lambda m: f"{m['p90_paced']:.2f} ms"),
        ("  checkpoint after a trivial cell (fork → committed)", lambda m: f"{m['steady_wall']:.2f} s"),
        ("**2** `small = 1`: bytes written (target < 1 MiB)", lambda m: f"**{fmt_bytes(m['small_written'])}**"),
        ("  `small = 1`: store size change", lambda m: fmt_bytes(m["small_delta"])),
        ("  (info) `rows[0]['score'] = -1.0`: bytes written", lambda m: fmt_bytes(m["row_written"])),
        ("**3** first checkpoint of numpy/pandas data: bytes", lambda m: fmt_bytes(m["first_bytes"])),
        (
            "**3** first checkpoint: fork → committed (commit alone)",
            lambda m: f"{m['first_wall']:.2f} s ({m['first_commit']:.2f} s)",
        ),
        (
            "**3** `dd bs=1M conv=fdatasync`, same bytes, same fs",
            lambda m: f"{m['dd']:.2f} s ({m['first_bytes'] / m['dd'] / 1e6:.0f} MB/s)",
        ),
        ("**3** ratio checkpoint / dd (target ≤ 1.3×)", lambda m: f"**{m['thr_ratio']:.2f}×**"),
        ("**4** checkpoint bytes on disk (manifest + blobs)", lambda m: fmt_bytes(m["ckpt_bytes"])),
        (
            "**4** warm: kernel start → first result / read bytes",
            lambda m: f"{m['restore_warm']:.2f} s / {m['read_warm']:.2f} s",
        ),
        ("**4** warm ratio (target ≤ 1.5×)", lambda m: f"**{m['restore_warm_ratio']:.2f}×**"),
        (
            "**4** cold: kernel start → first result / read bytes",
            lambda m: "n/a" if m["read_cold"] is None else f"{m['restore_cold']:.2f} s / {m['read_cold']:.2f} s",
        ),
        (
            "**4** cold ratio (target ≤ 1.5×)",
            lambda m: "n/a" if m["restore_cold_ratio"] is None else f"**{m['restore_cold_ratio']:.2f}×**",
        ),
        (
            "  empty kernel start → first result, stock / durable",
            lambda m: f"{m['start_stock']:.2f} / {m['start_durable']:.2f} s",
        ),
        (
            "**5** full checkpoint in kernel: extra memory allocated (Pss sum; child Private_Dirty)",
            lambda m: "{} ({}; {}; {} samples)".format(
                *map(fmt_bytes, m["mem_full_parts"][:3]), m["mem_full_parts"][3]
            ),
        ),
        (
            "**5** trivial-cell checkpoint: extra memory allocated (Pss sum; child Private_Dirty)",
            lambda m: "{} ({}; {}; {} samples)".format(
                *map(fmt_bytes, m["mem_steady_parts"][:3]), m["mem_steady_parts"][3]
            ),
        ),
        ("**5** extra peak / namespace (target ≤ 10%)", lambda m: f"**{100 * m['mem_ratio']:.1f}%**"),
        (
            "  in-process snapshot+commit: peak RSS growth / namespace",
            lambda m: (
                "n/a" if m["inproc_peak"] is None else f"{fmt_bytes(m['inproc_peak'])} ({100 * m['inproc_ratio']:.1f}%)"
            ),
        ),
        (
            "**6** 200k dicts: snapshot / snapshot+commit / C pickle",
            lambda m: f"{m['small_snap'] * 1e3:.0f} / {m['small_ckpt'] * 1e3:.0f} / {m['small_pickle'] * 1e3:.0f} ms",
        ),
        ("**6** 200k dicts: `dill.dumps`", lambda m: f"{m['small_dill'] * 1e3:.0f} ms"),
        (
            "**6** dill / snapshot (target ≥ 20×); dill / snapshot+commit",
            lambda m: f"**{m['small_ratio']:.1f}×**; {m['small_ckpt_ratio']:.1f}×",
        ),
        (
            "**11** shared objects: snapshot vs `dill.dump_module` (groups formed)",
            lambda m: (
                f"{m['shared_snap'] * 1e3:.0f} vs {m['shared_dump'] * 1e3:.0f} ms "
                f"({m['shared_dump'] / m['shared_snap']:.1f}×; "
                + ", ".join("+".join(g) for g in m["shared_groups"])
                + ")"
            ),
        ),
        (
            "**7** `dill.dump_module` of the namespace (file size)",
            lambda m: f"{m['dump_module']:.2f} s ({fmt_bytes(m['dump_module_bytes'])})",
        ),
        (
            "**7** in-process full snapshot+commit (snapshot; BLAKE3 of buffers)",
            lambda m: f"{m['inproc_full']:.2f} s ({m['inproc_snapshot']:.2f} s; {m['inproc_digest']:.2f} s)",
        ),
        (
            "**7** in-process unchanged snapshot+commit (snapshot)",
            lambda m: f"{m['inproc_steady']:.2f} s ({m['inproc_steady_snapshot']:.2f} s)",
        ),
        (
            "**7** dump_module / full checkpoint; per-cell wait naive vs durable",
            lambda m: (
                f"{m['dump_module'] / m['inproc_full']:.1f}×; {m['dump_module'] * 1e3:.0f} ms vs {m['added']:+.1f} ms"
            ),
        ),
    ]
    head = "| | " + " | ".join(f"{s:g} GiB" for s in sizes) + " |"
    sep = "|---|" + "---|" * len(sizes)
    lines = [head, sep]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(summary[s]) for s in sizes) + " |")
    return "\n".join(lines)


def changes_by_size_table(summary: dict[float, dict[str, Any]]) -> str:
    """Issue 14, per workload size: work and memory in proportion to the change."""
    sizes = list(summary)
    rows: list[tuple[str, Any]] = [
        ("arrays backed by their chunk files after the first checkpoint (between cells)", "adopt_wait", "{:.1f} s"),
        (
            f"trivial cell: fork → committed (commit alone), median of {CHECKPOINT_REPEATS} [range]",
            None,
            lambda m: f"{m['trivial_wall']:.3f} s ({m['trivial_commit']:.3f} s) [{range_s(m['trivial_wall_range'])}]",
        ),
        (
            "trivial cell: buffers hashed / bytes written",
            None,
            lambda m: f"{fmt_bytes(m['trivial_hashed'])} / {fmt_bytes(m['trivial_written'])}",
        ),
        (
            f"`arr[len(arr) // 2] = 1.0`: fork → committed (commit alone), median of {CHECKPOINT_REPEATS} [range]",
            None,
            lambda m: f"{m['elem_wall']:.3f} s ({m['elem_commit']:.3f} s) [{range_s(m['elem_wall_range'])}]",
        ),
        (
            "`arr[len(arr) // 2] = 1.0`: buffers hashed / bytes written",
            None,
            lambda m: f"{fmt_bytes(m['elem_hashed'])} / {fmt_bytes(m['elem_written'])}",
        ),
        ("`df.iloc[len(df) // 2, 0] = 1.0`: bytes written", None, lambda m: fmt_bytes(m["dfcell_written"])),
        (
            "extra memory, trivial checkpoint while `arr += 1.0` runs: allocated (Pss sum)",
            None,
            lambda m: f"{fmt_bytes(m['mem_mut'])} ({fmt_bytes(m['mem_mut_pss'])})",
        ),
        (
            "extra memory, checkpoint of the whole array while `arr += 1.0` runs again: allocated (Pss sum)",
            None,
            lambda m: f"{fmt_bytes(m['mem_mut_full'])} ({fmt_bytes(m['mem_mut_full_pss'])})",
        ),
        ("  that checkpoint: fork → committed", "full_rewrite_wall", "{:.2f} s"),
        ("extra peak / namespace (target ≤ 25%)", None, lambda m: f"**{100 * m['mem_mut_ratio']:.1f}%**"),
        (
            f"right after a fresh allocation: `x = 1`, median of {FRESH_CELLS} paced, stock / durable (added)",
            None,
            lambda m: f"{m['fresh_stock']:.2f} / {m['fresh_durable']:.2f} ms (**{m['fresh_added']:+.2f} ms**)",
        ),
    ]
    lines = ["| | " + " | ".join(f"{s:g} GiB" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label, key, fmt in rows:
        cells = [fmt.format(summary[s][key]) if key else fmt(summary[s]) for s in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def range_s(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:.3f}-{bounds[1]:.3f} s"


def changes_verdicts(summary: dict[float, dict[str, Any]], sizes: list[float], c: dict[str, Any]) -> list[str]:
    """Issue 14's targets, each with the figure it is judged on."""
    top = max(sizes)
    m = summary[top]
    at = f"at {top:g} GiB" + ("" if top >= 4 else " (set at 4 GiB: run with --sizes ...,4)")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = []
    if c:
        ok = all(row["written"] <= row["target"] for row in c["rows"] if row["target"] is not None)
        out.append(f"- Issue 14 target 1 (bytes written ∝ change, table above): **{verdict(ok)}**")
    out.append(
        f"- Issue 14 target 2 (trivial cell's checkpoint ≤ 0.3 s {at}): {m['trivial_wall']:.3f} s fork → committed, "
        f"median of {CHECKPOINT_REPEATS} → **{verdict(m['trivial_wall'] <= 0.3)}**"
    )
    out.append(
        f"- Issue 14 target 2 (checkpoint after `arr[i] = 1.0` ≤ 0.5 s {at}): {m['elem_wall']:.3f} s, "
        f"median of {CHECKPOINT_REPEATS} → **{verdict(m['elem_wall'] <= 0.5)}**"
    )
    # Judged at 1 GiB and up, as the "done when" says: in a smaller namespace the child's own memory
    # (pickling 200k small dicts touches their pages, about 90 MiB) is most of the share.
    judged = [s for s in sizes if s >= 1] or sizes
    worst = max(summary[s]["mem_mut_ratio"] for s in judged)
    each = ", ".join(f"{s:g}: {100 * summary[s]['mem_mut_ratio']:.1f}%" for s in sizes)
    out.append(
        f"- Issue 14 target 3 (extra memory ≤ 25% of the namespace while a large array is written during the "
        f"checkpoint, at 1 and 4 GiB): worst {100 * worst:.1f}% → **{verdict(worst <= 0.25)}** [{each}]"
    )
    fresh = max(summary[s]["fresh_added"] for s in sizes)
    out.append(
        f"- Issue 14 target 4 (≤ 5 ms added right after a fresh allocation, every size): worst {fresh:+.2f} ms "
        f"→ **{verdict(fresh <= 5)}**"
    )
    return out


def verdicts(summary: dict[float, dict[str, Any]], sizes: list[float]) -> list[str]:
    top = max(sizes)
    at = f"at {top:g} GiB" + ("" if top >= 4 else " (targets are set at 4 GiB: run with --sizes ...,4)")

    def per_size(key: str, fmt: str) -> str:
        return ", ".join(f"{s:g}: {fmt.format(summary[s][key])}" for s in sizes if summary[s][key] is not None)

    def line(n: int, what: str, value: str, ok: bool, key: str, fmt: str) -> str:
        return f"- Target {n} ({what}) {at}: {value} → **{'met' if ok else 'NOT met'}** [{per_size(key, fmt)}]"

    m = summary[top]
    out = [
        line(
            1,
            "added latency ≤ 5 ms, worse of paced/back-to-back",
            f"{m['added']:+.2f} ms",
            m["added"] <= 5,
            "added",
            "{:+.1f} ms",
        ),
        line(
            2,
            "small change writes < 1 MiB",
            fmt_bytes(m["small_written"]),
            m["small_written"] < MIB,
            "small_written",
            "{:.0f} B",
        ),
        line(3, "first checkpoint ≤ 1.3× dd", f"{m['thr_ratio']:.2f}×", m["thr_ratio"] <= 1.3, "thr_ratio", "{:.2f}×"),
        line(
            4,
            "restore ≤ 1.5× read, warm cache",
            f"{m['restore_warm_ratio']:.2f}×",
            m["restore_warm_ratio"] <= 1.5,
            "restore_warm_ratio",
            "{:.2f}×",
        ),
    ]
    if m["restore_cold_ratio"] is not None:
        out.append(
            line(
                4,
                "restore ≤ 1.5× read, cold cache",
                f"{m['restore_cold_ratio']:.2f}×",
                m["restore_cold_ratio"] <= 1.5,
                "restore_cold_ratio",
                "{:.2f}×",
            )
        )
    out += [
        line(
            5,
            "extra peak memory ≤ 10% of namespace",
            f"{100 * m['mem_ratio']:.1f}%",
            m["mem_ratio"] <= 0.10,
            "mem_ratio",
            "{:.1%}",
        ),
        line(
            6,
            "200k dicts ≥ 20× faster than dill.dumps",
            f"{m['small_ratio']:.1f}× (with commit {m['small_ckpt_ratio']:.1f}×)",
            m["small_ratio"] >= 20 and m["small_ckpt_ratio"] >= 20,
            "small_ratio",
            "{:.1f}×",
        ),
    ]
    want = {0.1, 1.0, 4.0}
    out.append(f"- Target 7 (table shows 0.1, 1 and 4 GiB): **{'met' if want <= set(sizes) else 'NOT met'}**")
    return out


def machine_info(cold_method: str, tmp_root: Path) -> str:
    import blake3
    import dill
    import durable_kernel
    import ipykernel
    import numpy
    import pandas

    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "kernel", "checkpoints"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit, dirty = "?", ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, {platform.node()}: {os.cpu_count()} cores, "
        f"{mem:.0f} GiB RAM, Python {platform.python_version()}, ipykernel {ipykernel.__version__}, "
        f"numpy {numpy.__version__}, pandas {pandas.__version__}, dill {dill.__version__}, blake3 {blake3.__version__}; "
        f"durable_kernel {durable_kernel.__version__} installed from {Path(durable_kernel.__file__).parent}, "
        f"repo at {commit}{' + uncommitted changes in kernel/ or checkpoints/' if dirty else ''}; "
        f"store and dd in {tmp_root}; cold cache via {cold_method or 'unavailable'}"
    )


def installed_is_stale() -> list[str]:
    import filecmp

    import durable_kernel

    installed = Path(durable_kernel.__file__).parent
    stale = []
    for src_dir, dest in ((REPO / "kernel", installed), (REPO / "checkpoints", installed / "checkpoints")):
        for src in src_dir.glob("*.py"):
            if not (dest / src.name).exists() or not filecmp.cmp(src, dest / src.name, shallow=False):
                stale.append(str(src.relative_to(REPO)))
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.1,1,4", help="GiB of state per workload, comma-separated (default 0.1,1,4)")
    ap.add_argument("--cells", type=int, default=50, help="trivial cells timed per kernel and mode (default 50)")
    ap.add_argument("--dicts", type=int, default=200_000, help="small dicts in the workload (default 200000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the small-object timings (default 3)")
    ap.add_argument("--tmpdir", default=None, help="where stores and dd files go (default: the system temp dir)")
    ap.add_argument("--profile", action="store_true", help="cProfile an unchanged in-process checkpoint per size")
    ap.add_argument(
        "--out", default=str(RESULTS / "latest.md"), help="markdown report (default benchmarks/results/latest.md)"
    )
    ap.add_argument(
        "--object-storage",
        type=float,
        default=1.0,
        metavar="GIB",
        help="GiB of state for the object-storage section (SeaweedFS on this machine; 0 skips it; default 1)",
    )
    ap.add_argument("--only-object-storage", action="store_true", help="run the object-storage section alone")
    ap.add_argument(
        "--only-changes", action="store_true", help="run the section on changes inside 1 GiB-scale variables alone"
    )
    ap.add_argument(
        "--map-arrays",
        action="store_true",
        help="run the durable kernels with c.DurableKernel.map_arrays = True (arrays backed by their chunk files)",
    )
    ap.add_argument(
        "--no-peers",
        action="store_true",
        help="skip benchmarks/peers.py (Kishu and ElasticKernel at 1 GiB, from their own virtualenvs)",
    )
    ap.add_argument(
        "--no-changes",
        action="store_true",
        help="skip the section that changes one element, field or string inside 1 GiB-scale variables",
    )
    args = ap.parse_args(argv)
    args.small_done = None
    if args.map_arrays:
        DURABLE_ARGUMENTS.append("--DurableKernel.map_arrays=True")
    sizes = sorted(float(s) for s in args.sizes.split(",") if s.strip())

    stale = installed_is_stale()
    if stale:
        print(
            f"warning: the installed durable_kernel differs from the source ({', '.join(stale[:4])}); "
            "the kernels run the installed copy. Reinstall: pip install --no-deps --no-build-isolation .",
            file=sys.stderr,
        )

    tmp_root = Path(tempfile.mkdtemp(prefix="durable-bench-", dir=args.tmpdir))
    if args.only_object_storage:
        return object_storage_only(args, tmp_root)
    if args.only_changes:
        try:
            report = "### Checkpoints that cost what changed (issue 14)\n\n" + changes_table(changes_phase(tmp_root))
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
        print("\n" + report)
        (RESULTS / "changes.md").write_text(
            "Command: `python benchmarks/bench_checkpoints.py --only-changes`\n\n" + report + "\n"
        )
        return 0
    cold_method = drop_caches_method(tmp_root)
    results: dict[float, dict[str, Any]] = {}
    bucket: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    try:
        if not args.no_changes:
            print("== changes inside 1 GiB-scale variables", flush=True)
            (tmp_root / "changes").mkdir()
            changes = changes_phase(tmp_root / "changes")
            shutil.rmtree(tmp_root / "changes", ignore_errors=True)
        if args.object_storage > 0:
            print(f"== object storage, {args.object_storage:g} GiB (SeaweedFS on this machine)", flush=True)
            (tmp_root / "object-storage").mkdir()
            bucket = object_storage_phase(args.object_storage, args, tmp_root / "object-storage")
            shutil.rmtree(tmp_root / "object-storage", ignore_errors=True)
        for gib in sizes:
            tmp = tmp_root / f"{gib:g}GiB"
            tmp.mkdir()
            res: dict[str, Any] = {"load_before": os.getloadavg()[0]}
            t0 = time.perf_counter()
            print(f"== {gib:g} GiB: stock ipykernel", flush=True)
            res["stock"] = stock_phase(gib, args, tmp)
            print(f"== {gib:g} GiB: durable kernel", flush=True)
            res["durable"] = durable_phase(gib, args, tmp, cold_method)
            print(f"== {gib:g} GiB: in-process (dill.dump_module, snapshot+commit, small objects)", flush=True)
            res["inproc"] = inprocess_phase(gib, args, tmp)
            res["load_after"] = os.getloadavg()[0]
            results[gib] = res
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)

    peers = "" if args.no_peers else peers_section(args)
    summary = summarize(results)
    report = "\n".join(
        [
            "## Checkpoint benchmark",
            "",
            machine_info(cold_method, tmp_root),
            "",
            f"Command: `python benchmarks/bench_checkpoints.py {' '.join(sys.argv[1:])}`",
            "",
            table(summary, args.cells),
            "",
            *verdicts(summary, sizes),
            "",
            "### Checkpoints that cost what changed (issue 14)",
            "",
            *([changes_table(changes), ""] if changes else []),
            changes_by_size_table(summary),
            "",
            *changes_verdicts(summary, sizes, changes),
            "",
            *([object_storage_table(bucket), ""] if bucket else []),
            *([peers, ""] if peers else []),
            "Paced: the previous checkpoint is committed before each timed cell (each cell pays a fork). "
            "Back-to-back: cells sent as fast as replies come (checkpoints coalesce and run beside the cells). "
            "Memory allocated: peak growth of the system's anonymous pages (AnonPages, /proc/meminfo) over samples "
            "every 5-10 ms from the cell's request to the checkpoint's commit: pages copied on write plus the child's "
            "allocations (this machine runs nothing else). Pss sum: peak of Pss_Anon(kernel) + Pss_Anon(child) - "
            "Pss_Anon(kernel before the cell), from /proc/<pid>/smaps_rollup, which over-counts huge pages the child "
            "unmapped in part; child Private_Dirty: its copies and allocations. "
            "In-process figures: this benchmark process, clear_refs + VmHWM.",
        ]
    )
    print()
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    raw: dict[str, Any] = {str(k): v for k, v in results.items()}
    if bucket:
        raw["object_storage"] = bucket
    if changes:
        raw["changes"] = changes
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    return 0


def peers_section(args: argparse.Namespace) -> str:
    """Kishu and ElasticKernel beside durable-kernel at 1 GiB, in this run (``benchmarks/peers.py``)."""
    print("== peers at 1 GiB (benchmarks/peers.py)", flush=True)
    cells = str(min(args.cells, 30))
    command = [sys.executable, str(HERE / "peers.py"), "--cells", cells, "--output", str(RESULTS / "peers.md")]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| system")), None)
    if done.returncode or start is None:
        return f"Peers: benchmarks/peers.py failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}"
    body = "\n".join(lines[start:]).split("\nwritten to ")[0]
    return f"### Peers at 1 GiB (same run: `python benchmarks/peers.py --cells {cells}`)\n\n{body}"


def object_storage_only(args: argparse.Namespace, tmp_root: Path) -> int:
    """``--only-object-storage``: that section alone, its table printed and written beside the report."""
    try:
        bucket = object_storage_phase(args.object_storage or 1.0, args, tmp_root)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    report = "\n".join(
        [
            "## Object storage benchmark",
            "",
            f"Command: `python benchmarks/bench_checkpoints.py --only-object-storage --object-storage "
            f"{args.object_storage:g} --cells {args.cells}`",
            "",
            object_storage_table(bucket),
        ]
    )
    print()
    print(report)
    out = Path(args.out).with_name("object-storage.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    out.with_suffix(".json").write_text(json.dumps(bucket, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
