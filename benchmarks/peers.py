#!/usr/bin/env python
"""durable-kernel side by side with two peer systems, Kishu and ElasticKernel, at a 1 GiB workload.

    python benchmarks/peers.py [--cells 30] [--kishu-venv /work/peers/kishu]
                               [--elastic-venv /work/peers/elastic] [--systems durable,kishu,elastic]

Each peer lives in a virtualenv of its own (never in the interpreter that holds
durable-kernel and its test dependencies), made once by hand, for example::

    python -m venv /work/peers/kishu   && /work/peers/kishu/bin/pip install kishu numpy pandas ipykernel
    python -m venv /work/peers/elastic && /work/peers/elastic/bin/pip install elastic-kernel numpy pandas ipykernel

durable-kernel itself runs from this interpreter (the *installed* package).  A
peer whose venv is missing, or that fails while it is measured, gets the line
"could not run: <reason>" instead of numbers.

Every kernel is a real kernel process driven through jupyter_client.  For each
system, one after the other so that at most one kernel holds the workload:

1. stock ipykernel (``python -m ipykernel_launcher``) of the same interpreter:
   the workload, then ``--cells`` trivial cells (``x = 1``), each timed from the
   execute request to its reply and idle;
2. the system, with a fresh store: the same workload and cells.  Added per cell
   is the difference of the two medians.  Cells are paced: before each one the
   system finishes whatever it does in the background (durable-kernel's
   checkpoint child), so each cell pays for its own work only;
3. ``small = 1``: growth of the system's storage folder (apparent file sizes),
   and the bytes the kernel process wrote (``write_bytes`` of /proc/PID/io,
   which also counts reaped children, so durable-kernel's checkpoint child);
4. a clean restart (shutdown request, then a new kernel on the same store):
   restore is the time from launching the new kernel to the first result that
   uses the restored variables (the probe cell's output: one value of each),
   including whatever the system needs the user to do to get them back (Kishu:
   attach, then check out the newest commit).  When the kernel stays busy well
   after that output (Kishu commits the cell before it replies), the table says
   until when;
5. ``small = 2``, then ``kill -9`` of the kernel, a new kernel, the same restore:
   it survives when the state comes back with ``small == 2``.

How the peers are driven (read from their sources, kishu 0.3.4 and elastic-kernel 0.2.3):

* Kishu is a library attached to a stock ipykernel: ``init_kishu(notebook)``
  registers IPython ``pre/post_run_cell`` hooks that commit every cell to a
  SQLite database next to the notebook (``<name>.kishudb``).  Restoring is a
  manual checkout: ``init_kishu`` in a new kernel, then ``_kishu.checkout(id)``
  of the newest commit.  Without a Jupyter server Kishu cannot find its
  notebook or kernel id, and without a browser its notebook saves wait for a
  frontend that never answers; it reads two switches meant for its tests,
  ``TEST_NOTEBOOK_PATH`` (the notebook, no server asked) and
  ``ENV_KISHU_TEST_MODE`` (no frontend saves, counter commit ids), and this
  script sets both.
* ElasticKernel is a kernel (``python -m elastic_kernel.kernel``): it records
  each cell's dependencies (ElasticNotebook), writes ``checkpoint.pickle`` in
  ``.elastic_kernel/<notebook inode hash>/`` beside the notebook at shutdown
  and loads it when a kernel starts.  Per variable it either stores the value
  or re-runs the cells that made it on restore (its notes say which).
  ``JPY_SESSION_NAME`` names the notebook (otherwise it asks a Jupyter server
  on 127.0.0.1:8888 for it).

Prints a markdown table and notes, and writes them, with the command and the
date, to ``--output`` (default ``benchmarks/results/peers.md``; ``--output ''``
writes nothing).  Not part of the test suite; needs nothing beyond the
project's own dependencies in this interpreter.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results" / "peers.md"
#: seconds a single cell (the workload, a 1 GiB checkpoint or restore) may take
CELL_TIMEOUT = 1800.0

# --- the workload and the cells that check it ---------------------------------------


def workload_code(scale: float) -> str:
    """The cell building the ~1 GiB state (``scale`` shrinks it, for a quick trial of the script)."""
    n_arr = int(67_108_864 * scale)  # 512 MiB of float64
    n_col = int(13_421_772 * scale)  # 5 columns of float64: 512 MiB
    n_rows = int(200_000 * scale)
    return (
        "import numpy as np, pandas as pd\n"
        "rng = np.random.default_rng(0)\n"
        f"arr = rng.random({n_arr})\n"
        f'df = pd.DataFrame({{c: rng.random({n_col}) for c in "abcde"}})\n'
        f'rows = [{{"id": i, "name": f"user{{i}}", "score": i * 0.5}} for i in range({n_rows})]\n'
        "small = 0\n"
    )


#: The first result after a restore: one value of each variable (cheap for a system that maps data lazily).
PROBE_CELL = (
    "print(repr((arr.shape, float(arr[-1]), df.shape, float(df['e'].iloc[-1]), len(rows), rows[-1]['name'], small)))"
)
#: Then every byte of the data, so that a restore that only looked right is caught (timed, reported in the notes).
CHECKSUM_CELL = "print(repr((float(arr.sum()), float(df.to_numpy().sum()), sum(r['score'] for r in rows), small)))"
TRIVIAL_CELL = "x = 1"


# --- a kernel through jupyter_client ---------------------------------------------------


@dataclass
class Reply:
    """What one execute request produced."""

    seconds: float
    #: seconds from the request to its first output (a system may still work after it, before the reply)
    first_output: float | None = None
    stdout: str = ""
    stderr: str = ""
    error: str = ""
    status: str = ""


#: every kernel manager started here, so that none outlives the script
_LIVE: list[Any] = []


def _kill_leftovers() -> None:
    for km in list(_LIVE):
        with contextlib.suppress(Exception):
            km.shutdown_kernel(now=True)


atexit.register(_kill_leftovers)


class Kernel:
    """One kernel process: ``argv`` run through a kernelspec written to ``spec_dir``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, spec_dir: Path, log: Path):
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager

        # A private kernelspec: the interpreter of a peer's venv, never a kernel installed for the user.
        folder = spec_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "kernel.json").write_text(
            json.dumps({"argv": [*argv, "-f", "{connection_file}"], "display_name": name, "language": "python"})
        )
        self.started = time.perf_counter()
        self.km = KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]))
        # A clean shutdown is where ElasticKernel writes its checkpoint: jupyter_client's default
        # 5 s wait before SIGKILL would cut a 1 GiB save short.
        self.km.shutdown_wait_time = CELL_TIMEOUT
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.km.start_kernel(env=env, cwd=str(cwd), stdout=self._log, stderr=self._log)
        _LIVE.append(self.km)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=CELL_TIMEOUT)

    @property
    def pid(self) -> int:
        return self.km.provisioner.pid  # type: ignore[union-attr]

    def run(self, code: str, silent: bool = False, user_expressions: dict[str, str] | None = None) -> Reply:
        """Execute ``code``; timed from the request to the reply, once the kernel is idle again."""
        started = time.perf_counter()
        msg_id = self.kc.execute(code, silent=silent, store_history=not silent, user_expressions=user_expressions or {})
        out = Reply(0.0)
        idle = False
        while not idle:
            try:
                msg = self.kc.get_iopub_msg(timeout=CELL_TIMEOUT)
            except queue.Empty:
                raise TimeoutError(f"no answer in {CELL_TIMEOUT:.0f} s to {code[:60]!r}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind in ("stream", "execute_result", "error") and out.first_output is None:
                out.first_output = time.perf_counter() - started
            if kind == "stream":
                if content["name"] == "stdout":
                    out.stdout += content["text"]
                else:
                    out.stderr += content["text"]
            elif kind == "error":
                out.error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        while True:
            reply = self.kc.get_shell_msg(timeout=CELL_TIMEOUT)
            if reply["parent_header"].get("msg_id") == msg_id:
                out.status = reply["content"]["status"]
                self.last_reply = reply["content"]
                break
        out.seconds = time.perf_counter() - started
        return out

    def check(self, code: str) -> Reply:
        """``run`` that raises when the cell fails."""
        out = self.run(code)
        if out.error or out.status != "ok":
            raise RuntimeError(f"cell {code.splitlines()[0][:60]!r} failed: {out.error or out.status}")
        return out

    def evaluate(self, expression: str) -> str:
        """The repr of ``expression``, evaluated silently (no history, no hooks, no checkpoint)."""
        self.run("", silent=True, user_expressions={"v": expression})
        value = self.last_reply["user_expressions"]["v"]
        if value.get("status") != "ok":
            raise RuntimeError(f"{expression!r}: {value.get('ename')}: {value.get('evalue')}")
        return value["data"]["text/plain"]

    def written_bytes(self) -> int:
        """Bytes the kernel process (and its reaped children) caused to be written to storage."""
        with open(f"/proc/{self.pid}/io") as fh:
            fields = dict(line.split(": ") for line in fh.read().splitlines())
        return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])

    def shutdown(self) -> float:
        """A clean shutdown, as a client's restart or close sends it; seconds until the process is gone."""
        started = time.perf_counter()
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
        self._close()
        return time.perf_counter() - started

    def kill9(self) -> None:
        """SIGKILL: no shutdown request, no last save."""
        os.kill(self.pid, signal.SIGKILL)
        self.km.provisioner.process.wait(timeout=60)  # type: ignore[union-attr]
        self.close()

    def close(self) -> None:
        """End the kernel at once (no shutdown request), whatever its state."""
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=True)
        self._close()

    def _close(self) -> None:
        if self.km in _LIVE:
            _LIVE.remove(self.km)
        self._log.close()


# --- the systems -----------------------------------------------------------------------


class System:
    """How one system is started, settled, restored, and where it stores its state."""

    key = ""
    label = ""
    package = ""  # distribution whose version is reported
    module = ""  # what its interpreter must be able to import

    def __init__(self, python: Path, workdir: Path):
        self.python = python  # the interpreter its kernels run
        self.workdir = workdir  # its own folder: the notebook, the store, the logs

    def unavailable(self) -> str:
        """Why this system cannot run here ('' when it can)."""
        if not self.python.exists():
            return f"no interpreter at {self.python} (make its venv first, see this script's docstring)"
        probe = subprocess.run(
            [str(self.python), "-c", f"import ipykernel, numpy, pandas; import {self.module}"],
            capture_output=True,
            text=True,
        )
        if probe.returncode:
            return f"{self.python} cannot import it: {probe.stderr.strip().splitlines()[-1:]}"
        return ""

    def version(self) -> str:
        done = subprocess.run(
            [str(self.python), "-c", f"import importlib.metadata as m; print(m.version({self.package!r}))"],
            capture_output=True,
            text=True,
        )
        return done.stdout.strip() or "?"

    def env(self) -> dict[str, str]:
        """The kernels' environment: this one, with the venv's bin first and its own Jupyter folders."""
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        venv = self.python.parent.parent
        if (venv / "pyvenv.cfg").exists():
            env["VIRTUAL_ENV"] = str(venv)
            env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["JUPYTER_DATA_DIR"] = str(self.workdir / "jupyter-data")
        env["PYTHONWARNINGS"] = "ignore"
        return env

    def argv(self) -> list[str]:
        """The system's kernel command (without ``-f connection_file``)."""
        return [str(self.python), "-m", "ipykernel_launcher"]

    def storage(self) -> Path:
        """The folder whose growth counts as the system's writes."""
        raise NotImplementedError

    def attach(self, k: Kernel) -> None:
        """What a user does in a new notebook before the first cell (Kishu: ``init_kishu``)."""

    def settle(self, k: Kernel) -> None:
        """Wait until work the system does after a cell's reply is finished."""
        k.run("", silent=True)

    def restore(self, k: Kernel) -> str:
        """What a user does in a new kernel to get the state back; a note for the report."""
        return ""

    def report(self) -> list[str]:
        """Notes read from the system's own records after the run."""
        return []


class Durable(System):
    key, label, package, module = "durable", "durable-kernel", "durable-kernel", "durable_kernel"

    def argv(self) -> list[str]:
        return [str(self.python), "-m", "durable_kernel"]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["DURABLE_KERNEL_DIR"] = str(self.storage())
        env["DURABLE_KERNEL_SESSION"] = "peers-benchmark"
        return env

    def storage(self) -> Path:
        return self.workdir / "store"

    def settle(self, k: Kernel) -> None:
        # Checkpoints are written by a forked child after the reply: wait for it.
        if k.evaluate(f"get_ipython().kernel.wait_for_checkpoint({CELL_TIMEOUT})") != "True":
            raise RuntimeError("checkpoint still running after the timeout")

    def restore(self, k: Kernel) -> str:
        return "automatic when the kernel starts"


class Kishu(System):
    key, label, package, module = "kishu", "Kishu", "kishu", "kishu"

    @property
    def notebook(self) -> Path:
        return self.workdir / "bench.ipynb"

    def env(self) -> dict[str, str]:
        env = super().env()
        # Kishu's own test switches: the notebook path without asking a Jupyter server, and no
        # notebook saves through a frontend (there is none: each save would wait ~5 s for nothing).
        env["TEST_NOTEBOOK_PATH"] = str(self.notebook)
        env["ENV_KISHU_TEST_MODE"] = "1"
        env["KISHU_PATH_ROOT"] = str(self.workdir / "kishu-home")  # its config.ini, instead of ~/.kishu
        return env

    def storage(self) -> Path:
        return self.workdir  # bench.kishudb beside the notebook

    def attach(self, k: Kernel) -> None:
        write_empty_notebook(self.notebook)
        out = k.run(f"from kishu import init_kishu\ninit_kishu({str(self.notebook)!r})")
        # The hooks are installed during this cell, so its post_run_cell hook runs without its
        # pre_run_cell and Kishu reports PostWithoutPreError for it: harmless, anything else is not.
        if out.status != "ok" or (out.error and "PostWithoutPre" not in out.error):
            raise RuntimeError(f"init_kishu failed: {out.error or out.status}")

    def restore(self, k: Kernel) -> str:
        self.attach(k)
        # A new kernel starts with an empty namespace: the user checks out the newest commit.
        k.check(
            "from pathlib import Path as _P\n"
            "from kishu.commands import KishuCommand as _KC\n"
            f"_newest = max(_KC.log_all(_P({str(self.notebook)!r})).commit_graph, key=lambda c: c.timestamp)\n"
            "print(_kishu.checkout(_newest.commit_id))"
        )
        return "init_kishu, then _kishu.checkout(newest commit)"


class Elastic(System):
    key, label, package, module = "elastic", "ElasticKernel", "elastic-kernel", "elastic_kernel"

    @property
    def notebook(self) -> Path:
        return self.workdir / "bench.ipynb"

    def argv(self) -> list[str]:
        return [str(self.python), "-m", "elastic_kernel.kernel"]

    def env(self) -> dict[str, str]:
        env = super().env()
        # Its checkpoint folder is named after the notebook's inode: the notebook must exist.
        write_empty_notebook(self.notebook)
        env["JPY_SESSION_NAME"] = str(self.notebook)
        return env

    def storage(self) -> Path:
        return self.workdir / ".elastic_kernel"

    def restore(self, k: Kernel) -> str:
        return "automatic when the kernel starts (from the checkpoint of the last clean shutdown)"

    def report(self) -> list[str]:
        # ElasticNotebook chooses, per variable, between storing it and re-running the cells that
        # made it; its log names both sets (in Japanese: "マイグレーション対象" migrated, "再計算対象" recomputed).
        plans = [
            line.split("INFO] ", 1)[-1].strip()
            for log in self.storage().glob("*/ElasticNotebook.log")
            for line in log.read_text(errors="replace").splitlines()
            if "再計算対象" in line
        ]
        if not plans:
            return []
        plan = (
            plans[-1]
            .replace("マイグレーション対象", "stored")
            .replace("再計算対象", "re-run on restore")
            .replace("，", ", ")
        )
        return [f"its last checkpoint plan: {plan}"]


def write_empty_notebook(path: Path) -> None:
    """The notebook file a peer is attached to, as a new notebook saved by Jupyter (once)."""
    if not path.exists():
        path.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


SYSTEMS = {cls.key: cls for cls in (Durable, Kishu, Elastic)}


# --- measuring -------------------------------------------------------------------------


def folder_files(folder: Path) -> dict[str, int]:
    """Apparent size of every file under ``folder``, by relative path."""
    sizes = {}
    if folder.exists():
        for path in folder.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    sizes[str(path.relative_to(folder))] = path.stat().st_size
    return sizes


def growth(before: dict[str, int], after: dict[str, int]) -> tuple[int, list[str]]:
    """Net growth of a folder, and the files that changed (largest first) for the notes."""
    changed = []
    for name in sorted(set(before) | set(after)):
        delta = after.get(name, 0) - before.get(name, 0)
        if delta:
            changed.append((abs(delta), f"{name} {'+' if delta > 0 else '-'}{human_bytes(abs(delta))}"))
    changed.sort(reverse=True)
    return sum(after.values()) - sum(before.values()), [text for _, text in changed[:6]]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def time_cells(k: Kernel, system: System | None, cells: int) -> list[float]:
    """Seconds of ``cells`` trivial cells, each after the system settled (stock: a silent round trip)."""
    times = []
    for _ in range(cells):
        if system is None:
            k.run("", silent=True)
        else:
            system.settle(k)
        times.append(k.check(TRIVIAL_CELL).seconds)
    return times


@dataclass
class Result:
    """What was measured for one system; None where a phase did not get that far."""

    label: str
    version: str = ""
    stock_ms: float | None = None
    system_ms: float | None = None
    growth_bytes: int | None = None
    written_bytes: int | None = None
    restore_s: float | None = None  # launch to the probe's output
    restore_idle_s: float | None = None  # launch to the probe's reply
    survives: str | None = None
    unavailable: str = ""
    failed: str = ""  # phase: error, when a phase raised
    notes: list[str] = field(default_factory=list)


def measure_stock(system: System, args: argparse.Namespace, tmp: Path) -> list[float]:
    """Trivial cells on stock ipykernel of the system's interpreter, with the workload loaded."""
    k = Kernel(
        f"{system.key}-stock",
        [str(system.python), "-m", "ipykernel_launcher"],
        system.env(),
        system.workdir,
        tmp / "kernels",
        system.workdir / "stock.log",
    )
    try:
        load = k.check(workload_code(args.scale)).seconds
        time_cells(k, None, 3)  # warm-up
        times = time_cells(k, None, args.cells)
        print(
            f"  stock ipykernel: workload cell {load:.1f} s, median cell {statistics.median(times) * 1e3:.1f} ms",
            flush=True,
        )
        return times
    finally:
        k.close()


def start(system: System, tmp: Path, log_name: str) -> Kernel:
    return Kernel(system.key, system.argv(), system.env(), system.workdir, tmp / "kernels", system.workdir / log_name)


@dataclass
class Restored:
    """A kernel after the system's restore and the probe cell."""

    kernel: Kernel
    probe: str  # what the probe cell printed (or its error)
    to_output: float  # seconds from launching the kernel to the probe's output: the first result
    to_idle: float  # ... to the probe's reply (Kishu commits the cell before it replies)


def restore_and_probe(system: System, tmp: Path, log_name: str) -> Restored:
    """A new kernel on the same store, the system's restore, then the probe cell."""
    launched = time.perf_counter()
    k = start(system, tmp, log_name)
    try:
        system.restore(k)
        probe_sent = time.perf_counter()
        probe = k.run(PROBE_CELL)
    except BaseException:
        k.close()
        raise
    to_idle = time.perf_counter() - launched
    to_output = probe_sent - launched + (probe.first_output if probe.first_output is not None else probe.seconds)
    return Restored(k, probe.stdout.strip() if not probe.error else f"error: {probe.error}", to_output, to_idle)


def measure(system: System, args: argparse.Namespace, tmp: Path, result: Result) -> None:
    """All the phases for one system, filling ``result`` as they go (see the module docstring)."""
    phase = "stock ipykernel"
    k: Kernel | None = None
    try:
        stock = measure_stock(system, args, tmp)
        result.stock_ms = statistics.median(stock) * 1e3

        phase = "first session"
        k = start(system, tmp, "session1.log")
        system.attach(k)
        load = k.check(workload_code(args.scale)).seconds
        t0 = time.perf_counter()
        system.settle(k)
        result.notes.append(
            f"workload cell {load:.1f} s (then {time.perf_counter() - t0:.1f} s until settled); "
            f"storage after it {human_bytes(sum(folder_files(system.storage()).values()))}"
        )
        print(f"  {system.label}: workload cell {load:.1f} s", flush=True)

        phase = "trivial cells"
        time_cells(k, system, 3)  # warm-up
        times = time_cells(k, system, args.cells)
        result.system_ms = statistics.median(times) * 1e3
        print(f"  {system.label}: median cell {result.system_ms:.1f} ms", flush=True)

        phase = "small change"
        system.settle(k)
        before, written0 = folder_files(system.storage()), k.written_bytes()
        k.check("small = 1")
        system.settle(k)
        result.growth_bytes, changed = growth(before, folder_files(system.storage()))
        result.written_bytes = k.written_bytes() - written0
        result.notes.append(f"files changed by `small = 1`: {', '.join(changed) or 'none'}")
        expected = k.check(PROBE_CELL).stdout.strip()
        checksum = k.check(CHECKSUM_CELL).stdout.strip()

        phase = "clean restart"
        down = k.shutdown()
        k = None
        stored = folder_files(system.storage())
        result.notes.append(f"clean shutdown {down:.1f} s; storage then {human_bytes(sum(stored.values()))}")
        back = restore_and_probe(system, tmp, "session2.log")
        k = back.kernel
        result.notes.append(f"after the restart {human_bytes(sum(folder_files(system.storage()).values()))} stored")
        if back.probe != expected:
            raise RuntimeError(f"state after the restart is {back.probe!r}, expected {expected!r}")
        result.restore_s, result.restore_idle_s = back.to_output, back.to_idle
        print(
            f"  {system.label}: restore after restart {back.to_output:.1f} s (idle at {back.to_idle:.1f} s)", flush=True
        )
        full = k.run(CHECKSUM_CELL)
        if full.stdout.strip() != checksum:
            result.notes.append(
                f"restored data differ: checksums {full.stdout.strip() or full.error!r}, expected {checksum!r}"
            )
        else:
            summed = full.first_output if full.first_output is not None else full.seconds
            result.notes.append(
                f"restored data checked (sums of every value: {summed:.1f} s, idle at {full.seconds:.1f} s)"
            )

        phase = "kill -9"
        k.check("small = 2")
        system.settle(k)
        k.kill9()
        k = None
        back = restore_and_probe(system, tmp, "session3.log")
        k = back.kernel
        if back.probe == expected.replace(", 1)", ", 2)"):
            result.survives = "yes"
        elif back.probe == expected:
            result.survives = "no: came back as of the last clean shutdown (small = 1)"
        else:
            result.survives = f"no: {back.probe[:80]}"
        result.notes.append(
            f"after kill -9: {result.survives} (first result {back.to_output:.1f} s after the launch, idle at {back.to_idle:.1f} s)"
        )
        print(f"  {system.label}: after kill -9: {result.survives}", flush=True)
    except Exception as exc:
        result.failed = f"{phase}: {type(exc).__name__}: {str(exc).strip()[:300]}"
        print(f"  {system.label} failed at {phase}:\n{traceback.format_exc()}", flush=True)
    finally:
        if k is not None:
            k.close()
    result.notes.append(f"storage at the end: {human_bytes(sum(folder_files(system.storage()).values()))}")
    with contextlib.suppress(Exception):
        result.notes += system.report()


# --- the report ------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    head = (
        "| system | added per cell (median `x = 1`, vs stock ipykernel) | storage growth after `small = 1` "
        "| written by the kernel for `small = 1` | restore (kernel start → first result) | survives kill -9 |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in results:
        name = f"{r.label} {r.version}".strip()
        if r.unavailable:
            lines.append(f"| {name} | could not run: {r.unavailable} | | | | |")
            continue
        if r.failed and r.system_ms is None:
            lines.append(f"| {name} | could not run: {r.failed} | | | | |")
            continue

        def fmt(value: Any, render) -> str:
            return "—" if value is None else render(value)

        added = None if r.system_ms is None or r.stock_ms is None else r.system_ms - r.stock_ms
        lines.append(
            f"| {name} | {fmt(added, lambda v: f'{v:+.1f} ms')} ({fmt(r.system_ms, lambda v: f'{v:.1f}')} vs {fmt(r.stock_ms, lambda v: f'{v:.1f}')} ms) "
            f"| {fmt(r.growth_bytes, human_bytes)} | {fmt(r.written_bytes, human_bytes)} "
            f"| {fmt(r.restore_s, lambda v: f'{v:.2f} s')}{idle_after(r)} | {r.survives or '—'} |"
        )
    return "\n".join(lines)


def idle_after(r: Result) -> str:
    """When the kernel stayed busy well after the first result (Kishu's commit of that cell), say so."""
    if r.restore_s is None or r.restore_idle_s is None or r.restore_idle_s - r.restore_s < 0.5:
        return ""
    return f" (kernel busy until {r.restore_idle_s:.2f} s)"


def notes(results: list[Result]) -> str:
    lines = []
    for r in results:
        if r.unavailable:
            continue
        lines.append(f"- **{r.label}**: " + "; ".join(r.notes + ([f"stopped at {r.failed}"] if r.failed else [])))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=30, help="trivial cells timed per kernel (default 30)")
    parser.add_argument("--kishu-venv", type=Path, default=Path("/work/peers/kishu"))
    parser.add_argument("--elastic-venv", type=Path, default=Path("/work/peers/elastic"))
    parser.add_argument("--systems", default="durable,kishu,elastic", help="comma-separated subset, in this order")
    parser.add_argument("--scale", type=float, default=1.0, help="workload size factor (1 = about 1 GiB)")
    parser.add_argument("--workdir", type=Path, help="folder for stores and logs (default: a temporary one, removed)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="markdown file to write ('' for none)")
    args = parser.parse_args()

    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="peers-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    pythons = {
        "durable": Path(sys.executable),
        "kishu": args.kishu_venv / "bin" / "python",
        "elastic": args.elastic_venv / "bin" / "python",
    }
    systems: dict[str, System] = {}
    results: list[Result] = []
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    try:
        for key in [s.strip() for s in args.systems.split(",") if s.strip()]:
            folder = tmp / key
            shutil.rmtree(folder, ignore_errors=True)  # a fresh store every run
            folder.mkdir(parents=True)
            system = SYSTEMS[key](pythons[key], folder)
            systems[key] = system
            result = Result(system.label)
            results.append(result)
            result.unavailable = system.unavailable()
            if result.unavailable:
                print(f"{system.label}: could not run: {result.unavailable}", flush=True)
                continue
            result.version = system.version()
            print(f"{system.label} {result.version} ({system.python}):", flush=True)
            measure(system, args, tmp, result)
    finally:
        _kill_leftovers()
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)

    gib = (67_108_864 + 5 * 13_421_772) * 8 * args.scale / (1 << 30)
    report = (
        f"{table(results)}\n\n"
        f"Workload: {gib:.2f} GiB of numpy/pandas data + {int(200_000 * args.scale)} small dicts; "
        f"{args.cells} paced trivial cells per kernel; medians.\n\n{notes(results)}\n"
    )
    print("\n" + report)
    if args.output:
        command = "python benchmarks/peers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        header = (
            "# durable-kernel and its peers at a 1 GiB workload\n\n"
            f"`{command.strip()}` on {datetime.date.today().isoformat()}, "
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{(time.perf_counter() - started) / 60:.0f} min; load average {load_before:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (other processes on the machine share its cores).\n\n"
        )
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(header + report)
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
