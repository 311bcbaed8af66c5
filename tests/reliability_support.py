"""Shared by the reliability tests (tests/test_reliability_*.py, tests/test_fuzz_loader.py)
and benchmarks/kill_storm.py: figure reporting, process helpers, planted
malicious pickles, and the kill storm itself.

Not a test module (pytest collects only ``test_*.py``); import it as
``reliability_support`` with ``tests/`` on ``sys.path`` (pytest's rootdir
insertion does that for the tests; the benchmark adds it itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --- figures --------------------------------------------------------------------


def report(case: str, capsys: Any = None, **figures: Any) -> str:
    """Print one ``RELIABILITY <case>: k=v, ...`` line past pytest's capture.

    With ``DURABLE_RELIABILITY_LOG`` set, also append it as a JSON line to that
    file (how RELIABILITY.md's table is filled from a run).
    """
    line = f"RELIABILITY {case}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    if capsys is not None:
        with capsys.disabled():
            print("\n" + line, flush=True)
    else:
        print(line, flush=True)
    log = os.environ.get("DURABLE_RELIABILITY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"case": case, "time": time.time(), **figures}, default=str) + "\n")
    return line


# --- processes ------------------------------------------------------------------


def children(pid: int) -> set[int]:
    """Direct children of ``pid`` (the kernel's checkpoint child is one)."""
    kids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(int(x) for x in f.read().split())
        except OSError:
            pass
    if not kids:  # kernels without /proc/*/children: scan every process's parent
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.add(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def processes_with_arg(arg: str) -> list[int]:
    """Processes whose command line contains ``arg`` (a kernel's connection file names it
    and its forked checkpoint child alike)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if arg.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def wait_gone(arg: str, limit: float = 60.0) -> bool:
    """Wait until no process mentions ``arg`` (a killed kernel and its child are gone)."""
    deadline = time.monotonic() + limit
    while processes_with_arg(arg):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def kernel_processes_gone(kernel: Any, limit: float = 60.0) -> bool:
    return wait_gone(kernel.km.connection_file, limit)


# --- planted malicious pickles ----------------------------------------------------------


class Evil:
    """Pickles to a call that creates ``path``: if the file appears, untrusted code ran."""

    def __init__(self, path: str):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def evil_pickle(sentinel: Path | str) -> bytes:
    import pickle

    return pickle.dumps(Evil(str(sentinel)), protocol=5)


# --- files in a store ------------------------------------------------------------------


def temp_leftovers(root: Path) -> list[Path]:
    """``.tmp-*`` files anywhere under ``root``."""
    return sorted(p for p in Path(root).rglob(".tmp-*"))


def damaged_blobs(root: Path) -> list[Path]:
    """Blob files whose content does not hash to their name (a partial file under a final name)."""
    from durable_kernel.checkpoints.blobs import digest

    bad = []
    for path in Path(root).rglob("*"):
        if path.parent.parent.name == "blobs" and path.is_file() and not path.name.startswith(".tmp-"):
            if digest(path.read_bytes()) != path.name:
                bad.append(path)
    return bad


# --- the kill storm ------------------------------------------------------------------

#: Sizes of the storm's state: about 16 MB of arrays, a 20k-row list and a 20 kB string,
#: so a checkpoint takes long enough (tens of ms) for kills to land inside it.
STORM_BIG = 1_000_000
STORM_SLOW = 1_000_000
STORM_ROWS = 60_000  # a pickle over 1 MiB: stored as content-defined chunks
STORM_NAMES = sorted(["np", "tag", "big", "slow", "rows", "alias", "meta", "kept"])

#: Checks a namespace against the state cell ``tag`` produces; shared verbatim by the
#: test process and the kernel (exec'd there without touching the user's names).
STATE_CHECK_SRC = f'''
import numpy as _np

def state_problems(ns, t):
    """What differs between namespace ``ns`` and the state cell ``t`` produced ([] if equal)."""
    if type(t) is not int:
        return ["tag is missing or not an int: %r" % (t,)]
    problems = []
    big = ns.get("big")
    if not (isinstance(big, _np.ndarray) and big.dtype == _np.int64 and big.shape == ({STORM_BIG},)
            and _np.array_equal(big, _np.arange({STORM_BIG}, dtype=_np.int64) * 3 + t)):
        problems.append("big is not from cell %d" % t)
    slow = ns.get("slow")
    if not (isinstance(slow, _np.ndarray) and slow.dtype == _np.float64 and slow.shape == ({STORM_SLOW},)
            and bool((slow == t // 3).all())):
        problems.append("slow is not from cell %d" % t)
    rows = ns.get("rows")
    if rows != [(t, i, "r%d" % i) for i in range({STORM_ROWS})]:
        problems.append("rows is not from cell %d" % t)
    if ns.get("alias") is not rows:
        problems.append("alias is not rows (sharing lost)")
    if ns.get("meta") != {{"tag": t, "text": "%d;" % t * 5000}}:
        problems.append("meta is not from cell %d" % t)
    kept = ns.get("kept")
    if not (isinstance(kept, _np.ndarray) and kept.shape == ({STORM_BIG},)
            and _np.flatnonzero(kept).tolist() == ([(t % 16) * 50_000 + t] if t else []) and kept.max() == t):
        problems.append("kept is not from cell %d" % t)
    if getattr(ns.get("np"), "__name__", None) != "numpy":
        problems.append("np is not numpy")
    return problems
'''

_KERNEL_CHECK = (
    STATE_CHECK_SRC
    + """
import json as _json
_ip = get_ipython()
_ns = _ip.user_ns
print(_json.dumps({
    "names": sorted(_ip.kernel.names_to_save()),
    "tag": _ns.get("tag"),
    "problems": state_problems(_ns, _ns.get("tag")),
    "banner": _ip.kernel._banner_notice,
}))
"""
)


def state_problems(ns: dict[str, Any], tag: Any) -> list[str]:
    scope: dict[str, Any] = {}
    exec(STATE_CHECK_SRC, scope)
    return scope["state_problems"](ns, tag)


def storm_cell(tag: int) -> str:
    """A cell that replaces the whole state with the one identified by ``tag``."""
    return (
        f"tag = {tag}\n"
        f"big = np.arange({STORM_BIG}, dtype=np.int64) * 3 + tag\n"
        f"slow = np.full({STORM_SLOW}, tag // 3, dtype=np.float64)\n"  # same blob for 3 cells: dedup
        f"rows = [(tag, i, 'r%d' % i) for i in range({STORM_ROWS})]\n"
        "alias = rows\n"
        "meta = {'tag': tag, 'text': '%d;' % tag * 5000}\n"
        # Changed in place, a few pages at a time: what dirty-page tracking must see.
        f"kept = np.zeros({STORM_BIG}) if 'kept' not in globals() else kept\n"
        "kept[kept != 0] = 0\n"
        "kept[(tag % 16) * 50_000 + tag] = tag\n"
    )


def check_kernel_state(kernel: Any) -> dict[str, Any]:
    """Verify the kernel's namespace from inside it, without binding or saving any name."""
    code = f"exec({_KERNEL_CHECK!r}, {{'get_ipython': get_ipython}})"
    out = kernel.execute(code, silent=True)
    if out.error:
        return {"tag": None, "problems": [f"check failed: {out.error}"], "names": [], "banner": ""}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _first_child(pid: int, limit: float) -> int | None:
    """The first checkpoint child of ``pid`` to appear within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        kids = children(pid)
        if kids:
            return min(kids)
        time.sleep(0.001)
    return None


@dataclass
class StormResult:
    rounds: int = 0
    restored_ok: int = 0
    fell_back: int = 0
    lost: int = 0
    kernel_kills: int = 0
    child_kills: int = 0
    #: kills that hit while a checkpoint child was running
    kills_during_checkpoint: int = 0
    #: rounds after which ``.tmp-*`` files were left (swept by the next commit)
    rounds_leaving_temp_files: int = 0
    #: cells sent whose state the restore could have come back as, summed
    cells_sent: int = 0
    #: restored states newer than the last one the test had seen committed
    restored_newer_than_confirmed: int = 0
    seed: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"rounds, restored-ok, fell-back, lost = {self.rounds}, {self.restored_ok}, {self.fell_back}, {self.lost}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_storm(
    rounds: int,
    workdir: Path,
    seed: int | None = None,
    env: dict[str, str] | None = None,
    say: Callable[[str], None] | None = None,
) -> StormResult:
    """Kill a kernel (even rounds) or its checkpoint child (odd rounds) at random instants.

    Each round: start the kernel (restoring), check its namespace is exactly one
    state some cell produced, no older than the last one seen committed, and the
    same one the store's own loader picks; commit a new state and confirm it; send
    1-4 more cells without waiting; then SIGKILL the kernel after a random delay,
    or SIGKILL the checkpoint child at a random instant of its life and then the
    kernel once it is idle.
    """
    from durable_kernel.checkpoints.location import open_store
    from durable_kernel.testing import KernelProcess

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    session = "kill-storm.ipynb"
    full_env = {
        "JUPYTER_DATA_DIR": str(workdir / "jupyter-data"),
        "DURABLE_KERNEL_DIR": str(workdir / "store"),
        **(env or {}),
        "DURABLE_KERNEL_SESSION": session,
    }
    result = StormResult(seed=seed)
    started = time.monotonic()
    say = say or (lambda _line: None)

    def store_newest() -> tuple[Any, list[str]]:
        nb = open_store(environ=full_env).notebook(session)
        return nb.load_latest_with_reasons()

    confirmed = 0  # newest tag the test saw committed
    sent = 0  # newest tag sent to a kernel
    for rnd in range(rounds):
        kernel = KernelProcess("durable-python3", env=full_env, log_file=str(workdir / "kernel.log"))
        try:
            state = check_kernel_state(kernel)
            problems: list[str] = []
            if rnd == 0:
                if state["names"]:
                    problems.append(f"fresh store restored {state['names']}")
            else:
                restored, reasons = store_newest()
                tag = state["tag"]
                if state["problems"]:
                    problems += state["problems"]
                if state["names"] != STORM_NAMES:
                    problems.append(f"names {state['names']} != {STORM_NAMES}")
                if not (isinstance(tag, int) and confirmed <= tag <= sent):
                    problems.append(f"restored cell {tag}, expected one of {confirmed}..{sent}")
                store_tag = restored.values.get("tag") if restored is not None else None
                if store_tag != tag:
                    problems.append(f"kernel restored cell {tag} but the store's newest loadable is {store_tag}")
                if restored is not None and state_problems(restored.values, store_tag):
                    problems.append("the store's newest checkpoint is a mix")
                if problems:
                    result.lost += 1
                    result.problems.append(f"round {rnd}: " + "; ".join(problems))
                elif reasons or "could not be used" in state["banner"]:
                    result.fell_back += 1
                else:
                    result.restored_ok += 1
                if isinstance(tag, int) and tag > confirmed:
                    result.restored_newer_than_confirmed += 1
                result.rounds += 1
            # commit a new state and see it committed
            sent += 1
            prelude = "import numpy as np\n" if rnd == 0 else ""
            out = kernel.execute(prelude + storm_cell(sent))
            if out.error:
                result.problems.append(f"round {rnd}: cell failed: {out.error}")
            done = kernel.execute(
                "get_ipython().kernel.wait_for_checkpoint(120); "
                "print(__import__('json').dumps(__import__('dataclasses').asdict(get_ipython().kernel.last_outcome) if get_ipython().kernel.last_outcome else {}, default=str))",
                silent=True,
            )
            last = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
            if not last.get("ok"):
                result.problems.append(f"round {rnd}: confirming commit failed: {last or done.error}")
            else:
                confirmed = sent
            leftovers = temp_leftovers(workdir / "store")
            if leftovers:
                result.problems.append(f"round {rnd}: temp files not swept by the commit: {leftovers[:3]}")
            # more cells, not waited for, then a kill at a random instant
            burst = rng.randint(1, 4)
            for _ in range(burst):
                sent += 1
                kernel.kc.execute(storm_cell(sent))
            result.cells_sent += burst
            if rnd % 2 == 0:
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0.0, 0.5))  # anywhere: mid-cell, mid-checkpoint, idle
                else:  # aim at a checkpoint in progress
                    _first_child(kernel.pid, 5.0)
                    time.sleep(rng.uniform(0.0, 0.06))
                if children(kernel.pid):
                    result.kills_during_checkpoint += 1
                result.kernel_kills += 1
                os.kill(kernel.pid, signal.SIGKILL)
            else:
                delay = rng.uniform(0.0, 0.06)
                child = _first_child(kernel.pid, 5.0)
                if child is not None:
                    time.sleep(delay)
                    try:
                        os.kill(child, signal.SIGKILL)
                        result.child_kills += 1
                        result.kills_during_checkpoint += 1
                    except ProcessLookupError:
                        pass
                # the kernel carries on: let it settle (it may save the newest state again), then kill it
                kernel.execute("get_ipython().kernel.wait_for_checkpoint(120)", silent=True)
                os.kill(kernel.pid, signal.SIGKILL)
            kernel.km.provisioner.process.wait(timeout=30)  # type: ignore[union-attr]
        finally:
            if kernel.km.is_alive():
                os.kill(kernel.pid, signal.SIGKILL)
                kernel.km.provisioner.process.wait(timeout=30)  # type: ignore[union-attr]
            conn = kernel.km.connection_file
            kernel.close()
        if not wait_gone(conn):  # children finish their checkpoint after the kernel dies, then exit
            result.problems.append(f"round {rnd}: a checkpoint child was still running 60 s after its kernel died")
        if temp_leftovers(workdir / "store"):
            result.rounds_leaving_temp_files += 1
        say(f"round {rnd + 1}/{rounds}: {result.line()}")
    # last restart: check the final kill too
    kernel = KernelProcess("durable-python3", env=full_env, log_file=str(workdir / "kernel.log"))
    try:
        state = check_kernel_state(kernel)
        restored, reasons = store_newest()
        tag = state["tag"]
        store_tag = restored.values.get("tag") if restored is not None else None
        ok = (
            not state["problems"]
            and state["names"] == STORM_NAMES
            and isinstance(tag, int)
            and confirmed <= tag <= sent
            and tag == store_tag
        )
        result.rounds += 1
        if not ok:
            result.lost += 1
            result.problems.append(f"final restart: cell {tag}, problems {state['problems']}")
        elif reasons:
            result.fell_back += 1
        else:
            result.restored_ok += 1
    finally:
        kernel.close()
    result.seconds = round(time.monotonic() - started, 1)
    return result


# --- small real disks -------------------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` (``"200m"``) at ``path``, unmounted afterwards; skips the test where
    mounting is refused (not root, no mount namespace)."""
    import pytest

    path.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
