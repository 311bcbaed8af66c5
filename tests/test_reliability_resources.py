"""Resource exhaustion and odd namespaces, through real kernels.

Disk full runs twice: on a real 20 MiB tmpfs (skipped where ``mount`` is refused) and
with ``ENOSPC`` injected into the kernel's ``os.write`` by a ``sitecustomize`` on its
``PYTHONPATH`` (a real partial write, then the error, as a filling disk does).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import wait_saved
from durable_kernel.checkpoints import Store
from durable_kernel.checkpoints.location import open_store
from reliability_support import damaged_blobs, report, temp_leftovers

WARNING = "checkpoint not saved ("
RESUMED = "checkpoints are being saved again"


def last_result(kernel) -> dict:
    wait_saved(kernel)
    out = kernel.execute(
        "print(__import__('json').dumps(__import__('dataclasses').asdict(get_ipython().kernel.last_outcome) if get_ipython().kernel.last_outcome else {}, default=str))",
        silent=True,
    )
    assert not out.error, out.error
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(kernel, code: str):
    out = kernel.execute(code)
    assert not out.error, out.error
    return out


def the_store(jupyter_dirs, root: str | Path | None = None) -> Store:
    return open_store(root, environ=jupyter_dirs)


# --- disk full ------------------------------------------------------------------------

_INJECTOR = '''
"""Test-only: a store on a "full disk" while {flag} exists (imported by site at start-up)."""
import errno as _errno
import os as _os

_FLAG = {flag!r}
_STORE = {store!r}
_real_write = _os.write
_partial = set()


def _write(fd, data):
    if _os.path.exists(_FLAG):
        try:
            target = _os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            target = ""
        if target.startswith(_STORE):
            if fd in _partial or len(data) <= 4096:
                _partial.discard(fd)
                raise OSError(_errno.ENOSPC, _os.strerror(_errno.ENOSPC))
            _partial.add(fd)  # the disk takes the first 4 KiB, then is full
            return _real_write(fd, memoryview(data).cast("B")[:4096])
    _partial.discard(fd)
    return _real_write(fd, data)


_os.write = _write
'''


class Disk:
    """A store folder that can be made full and given space again."""

    def __init__(self, kind: str, tmp_path: Path):
        self.kind = kind
        self.mount = tmp_path / "disk"
        self.mount.mkdir()
        self.store = self.mount / "store"
        self.env: dict[str, str] = {"DURABLE_KERNEL_DIR": str(self.store)}
        self.filler = self.mount / "filler"
        if kind == "tmpfs":
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", str(self.mount)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected variant covers it")
        else:
            self.flag = tmp_path / "disk-is-full"
            inject = tmp_path / "inject"
            inject.mkdir()
            (inject / "sitecustomize.py").write_text(_INJECTOR.format(flag=str(self.flag), store=str(self.store)))
            self.env["PYTHONPATH"] = os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    def fill(self, leave: int = 4 << 20) -> None:
        if self.kind == "tmpfs":
            st = os.statvfs(self.mount)
            free = st.f_bavail * st.f_frsize
            with open(self.filler, "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(free - leave, 0))
        else:
            self.flag.write_text("full")

    def free(self) -> None:
        if self.kind == "tmpfs":
            self.filler.unlink()
        else:
            self.flag.unlink()

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path):
    d = Disk(request.param, tmp_path)
    yield d
    d.close()


def test_disk_full_warns_once_keeps_the_previous_checkpoint_and_resumes(disk, start_kernel, jupyter_dirs, capsys):
    # ``disk`` is set up before ``start_kernel``, so it is torn down (unmounted) after the kernels die.
    kernel = start_kernel(session="full.ipynb", env=disk.env)
    run(kernel, "import numpy as np\nx = 1")
    assert last_result(kernel)["ok"]
    disk.fill()
    stderr = [run(kernel, "big = np.arange(2_000_000)  # 16 MB: more than the disk has left").stderr]
    failed = last_result(kernel)
    for _ in range(4):
        stderr.append(run(kernel, "x += 1").stderr)
        assert not last_result(kernel)["ok"]
    shown = run(kernel, "print(x, big[-1])")
    stderr.append(shown.stderr)
    assert shown.stdout.split() == ["5", "1999999"]  # cells keep working
    assert not last_result(kernel)["ok"]  # (and that cell's own checkpoint is over before looking at files)
    warnings = sum(text.count(WARNING) for text in stderr)
    assert "No space left on device" in failed["error"]
    assert warnings == 1, stderr
    leftovers, damaged = temp_leftovers(disk.store), damaged_blobs(disk.store)
    assert leftovers == [] and damaged == []
    previous = the_store(jupyter_dirs, disk.store).notebook("full.ipynb").load_latest()
    assert previous is not None and previous.values["x"] == 1 and "big" not in previous.values

    disk.free()
    run(kernel, "x += 1")
    resumed = last_result(kernel)
    assert resumed["ok"], resumed
    after = run(kernel, "pass").stderr
    assert RESUMED in after
    kernel.kill()
    kernel = start_kernel(session="full.ipynb", env=disk.env)
    assert kernel.value("(x, int(big[-1]), len(big))") == "(6, 1999999, 2000000)"
    report(
        f"disk full ({disk.kind})",
        capsys,
        failed_checkpoints=6,
        warnings_shown=warnings,
        cells_failed=0,
        temp_files_left=len(leftovers),
        partial_blobs=len(damaged),
        previous_loadable=True,
        resumed=True,
    )


# --- memory -------------------------------------------------------------------------


def test_low_memory_saves_in_the_foreground_and_says_so_once(start_kernel, capsys):
    huge_margin = ["--DurableKernel.fork_memory_margin=1000000000000000"]  # 1 PB: never room to fork
    kernel = start_kernel(session="memory.ipynb", extra_arguments=huge_margin)
    stderr = [run(kernel, f"x{i} = {i}").stderr for i in range(4)]
    told = sum(text.count("memory is low") for text in stderr)
    assert told == 1, stderr
    assert "saving in the foreground" in "".join(stderr)
    result = last_result(kernel)
    assert result["ok"] and result["wall_seconds"] == 0  # written by the kernel itself, not a forked child
    kernel.kill()
    kernel = start_kernel(session="memory.ipynb")
    assert kernel.value("(x0, x3)") == "(0, 3)"
    report("low memory", capsys, cells=4, told=told, saved_in_foreground=True, restored=True)


# --- huge and odd namespaces ---------------------------------------------------------------


def test_100k_variables_are_saved_and_restored(start_kernel, capsys):
    kernel = start_kernel(session="many.ipynb")
    run(kernel, "g = globals()\nfor n in range(100_000):\n    g[f'v{n}'] = n * 7\ndel g, n")
    result = last_result(kernel)
    assert result["ok"] and result["variables"] == 100_000 and not result["skipped"]
    kernel.kill()
    kernel = start_kernel(session="many.ipynb")
    count = "sum(1 for k in globals() if k[:1] == 'v' and k[1:].isdigit())"
    assert kernel.value(f"({count}, v0, v99999)") == f"(100000, 0, {99_999 * 7})"
    report(
        "100k variables",
        capsys,
        variables=100_000,
        saved=result["variables"],
        restored=100_000,
        save_seconds=round(result["seconds"], 2),
    )


ODD_NAMESPACE = """
class Refuses:
    def __reduce__(self):
        raise RuntimeError("refuses to be pickled")

bad = Refuses()
deep = []
cur = deep
for _ in range(100_000):
    cur.append([])
    cur = cur[0]
del cur, _
good = {"answer": 42}
"""


def test_deep_nesting_and_raising_reduce_are_skipped_with_reasons_the_rest_saved(start_kernel, capsys):
    kernel = start_kernel(session="odd.ipynb")
    made = run(kernel, ODD_NAMESPACE)
    result = last_result(kernel)
    skipped = {name: reason for name, _, reason in result["skipped"]}
    assert set(skipped) == {"bad", "deep"}
    assert "refuses to be pickled" in skipped["bad"] and "recursion limit" in skipped["deep"]
    told = run(kernel, "pass").stderr + kernel.stderr_of(made)
    assert "not saved:" in told and "bad (" in told and "deep (" in told
    kernel.kill()
    kernel = start_kernel(session="odd.ipynb")
    assert kernel.value("(good, 'bad' in globals(), 'deep' in globals(), Refuses.__name__)") == (
        "({'answer': 42}, False, False, 'Refuses')"
    )
    report("odd namespace", capsys, skipped=sorted(skipped), rest_saved=True, message_shown=True)


HANGS = """
import time

class Hangs:
    def __getstate__(self):
        time.sleep(3600)
        return {}

h = Hangs()
ok = 1
"""


def test_hanging_getstate_is_stopped_by_the_timeout_reported_and_skipped_until_reassigned(start_kernel, capsys):
    kernel = start_kernel(session="hang.ipynb", extra_arguments=["--DurableKernel.checkpoint_timeout=3"])
    made = run(kernel, HANGS)
    timed_out = last_result(kernel)
    assert not timed_out["ok"] and timed_out["stuck_on"] == "h"
    told = run(kernel, "x = 2").stderr
    assert "took longer than 3 s while saving 'h'" in told and "skipped until it is reassigned" in told
    saved = last_result(kernel)
    assert saved["ok"] and [s[0] for s in saved["skipped"]] == ["h"]
    told_next = run(kernel, "pass").stderr
    assert RESUMED in told_next and "h (" in kernel.stderr_of(made)
    kernel.kill()
    kernel = start_kernel(session="hang.ipynb", extra_arguments=["--DurableKernel.checkpoint_timeout=3"])
    assert kernel.value("(ok, x, 'h' in globals())") == "(1, 2, False)"
    assert "not restored: h (" in kernel.banner and "longer than 3 s" in kernel.banner
    run(kernel, "h = 5")  # reassigned: saved again
    again = last_result(kernel)
    assert again["ok"] and again["skipped"] == []
    report("hanging __getstate__", capsys, timeout_s=3, stuck_on="h", rest_saved=True, skipped_until_reassigned=True)


def test_10_gib_variable_over_max_variable_bytes_is_skipped_without_being_read(start_kernel, tmp_path, capsys):
    sparse = tmp_path / "ten-gib.bin"
    with open(sparse, "wb") as f:
        f.truncate(10 << 30)  # a sparse file: 10 GiB to numpy, no disk or RAM used
    limit = 1 << 20
    kernel = start_kernel(session="huge.ipynb", extra_arguments=[f"--DurableKernel.max_variable_bytes={limit}"])
    made = run(
        kernel,
        "import numpy as np\n"
        # a plain 10 GiB ndarray over the sparse file (np.asarray drops the memmap subclass)
        f"huge = np.asarray(np.memmap({str(sparse)!r}, dtype=np.uint8, mode='r', shape=({10 << 30},)))\n"
        "rows = [f'row {i}' for i in range(1_000_000)]  # ~14 MB pickled: in-band, over the limit\n"
        "small = np.arange(1000)",
    )
    result = last_result(kernel)
    skipped = {name: reason for name, _, reason in result["skipped"]}
    assert set(skipped) == {"huge", "rows"}
    assert all(f"max_variable_bytes ({limit} bytes)" in r for r in skipped.values())
    told = run(kernel, "pass").stderr + kernel.stderr_of(made)  # told as output of the cell that made it
    assert "huge (numpy.ndarray" in told and "max_variable_bytes" in told
    assert result["size"] < limit
    from durable_kernel.checkpoints import disk_usage

    stored = disk_usage(Path(os.environ["DURABLE_KERNEL_DIR"]))
    assert stored < limit
    assert os.stat(sparse).st_blocks == 0  # still sparse: nothing was copied into it or read out of it to disk
    kernel.kill()
    kernel = start_kernel(session="huge.ipynb")
    assert kernel.value("(int(small.sum()), 'huge' in globals(), 'rows' in globals())") == "(499500, False, False)"
    report(
        "10 GiB variable",
        capsys,
        declared_bytes=10 << 30,
        max_variable_bytes=limit,
        store_bytes=stored,
        skipped=sorted(skipped),
        rest_saved=True,
    )


PEAK = """
import json, resource, sys
import numpy as np
from durable_kernel.checkpoints import snapshot

size = 256 << 20
mm = np.memmap(sys.argv[1], dtype=np.uint8, mode="r", shape=(size,))
cases = {
    "memmap": mm,  # an ndarray subclass
    "broadcast": np.broadcast_to(np.zeros(1, np.uint8), (size,)),  # not contiguous
}
value = cases[sys.argv[2]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
snap = snapshot({"v": value}, max_variable_bytes=1 << 20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
print(json.dumps({"growth": after - before, "skipped": [s.reason for s in snap.skipped]}))
"""


@pytest.mark.parametrize("kind", ["memmap", "broadcast"])
def test_max_variable_bytes_stops_before_copying_any_large_array(kind, tmp_path):
    """A 256 MiB array over a 1 MiB limit must be refused without materialising 256 MiB (10 GiB in real life)."""
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(256 << 20)
    done = subprocess.run(
        [__import__("sys").executable, "-c", PEAK, str(sparse), kind], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    assert result["skipped"] and "max_variable_bytes" in result["skipped"][0]
    assert result["growth"] < 64 << 20, f"peak memory grew by {result['growth'] >> 20} MiB pickling a skipped variable"
