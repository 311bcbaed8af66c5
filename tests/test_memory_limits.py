"""durable_kernel.memory sees container memory limits (issue 9 item 7).

Real processes in real memory cgroups (tests/cgroup_support.py; skipped with
the reason where cgroups cannot be made).  Each test drives a probe: a Python
process that imports durable_kernel.memory, waits to be moved into the cgroup,
then measures or allocates on command.  Only the last two tests use a made-up
/proc and cgroupfs: this machine's memory controller is on cgroup v1, so the v2
files (Kubernetes, current Docker) can be exercised no other way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cgroup_support import enclosing_limit, memory_cgroup
from durable_kernel import memory

MiB = 1 << 20

PROBE = r"""
import json, os, sys
from dataclasses import asdict
from durable_kernel.memory import available_memory, oom_kills

held = []

def touch(n):
    block = bytearray(n)  # zero pages until written: touch one byte a page
    for i in range(0, n, 4096):
        block[i] = 1
    return block

print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    command, *args = line.split()
    if command == "measure":
        reply = {"memory": asdict(available_memory()), "oom_kills": oom_kills()}
    elif command == "allocate":
        held.append(touch(int(args[0])))
        reply = {}
    elif command == "write_file":  # page cache, charged to the cgroup of the writer
        with open(args[0], "wb") as f:
            for _ in range(int(args[1]) // (1 << 20)):
                f.write(b"x" * (1 << 20))
        reply = {}
    elif command == "child_allocates":  # a child that allocates args[0] bytes, as a checkpoint child would
        pid = os.fork()
        if pid == 0:
            touch(int(args[0]))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        reply = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
    else:
        reply = {"error": command}
    print(json.dumps(reply), flush=True)
"""


class Probe:
    """A process running PROBE; ``ask("measure")`` returns its reply."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = json.loads(self.process.stdout.readline())["ready"]  # type: ignore[union-attr]

    def ask(self, *command: Any) -> dict[str, Any]:
        self.process.stdin.write(" ".join(map(str, command)) + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        assert line, f"probe died: {self.process.wait()}"
        return json.loads(line)

    def measure(self) -> memory.Memory:
        return memory.Memory(**self.ask("measure")["memory"])

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def probe():
    started = Probe()
    yield started
    started.close()


def meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


# --- real cgroups -------------------------------------------------------------


def test_process_in_limited_cgroup_sees_the_limit(probe: Probe) -> None:
    with memory_cgroup(300 * MiB) as cg:
        cg.add(probe.pid)
        probe.ask("allocate", 10 * MiB)
        seen = probe.measure()
    assert seen.limit == 300 * MiB
    assert seen.used is not None and seen.available == seen.limit - seen.used
    assert 0 < seen.available <= seen.limit - 10 * MiB
    assert seen.source.startswith("container limit 300.0 MiB (cgroup v")
    assert cg.path.name in seen.source


def test_process_moved_into_cgroup_after_measuring_sees_the_limit(probe: Probe) -> None:
    first = probe.measure()
    with memory_cgroup(300 * MiB) as cg:
        cg.add(probe.pid)
        second = probe.measure()
    assert first.limit != 300 * MiB
    assert second.limit == 300 * MiB


def test_allocating_in_cgroup_lowers_available_by_that_much(probe: Probe) -> None:
    with memory_cgroup(300 * MiB) as cg:
        cg.add(probe.pid)
        before = probe.measure()
        probe.ask("allocate", 200 * MiB)
        after = probe.measure()
    assert before.source == after.source and after.source.startswith("container limit")
    drop = before.available - after.available  # type: ignore[operator]
    assert 190 * MiB <= drop <= 215 * MiB, f"available fell by {drop / MiB:.1f} MiB"


def test_limit_on_an_ancestor_cgroup_bounds_a_process_in_its_child(probe: Probe) -> None:
    with memory_cgroup(300 * MiB) as outer, memory_cgroup(None, inside=outer) as inner:
        inner.add(probe.pid)
        probe.ask("allocate", 50 * MiB)
        seen = probe.measure()
    assert seen.limit == 300 * MiB
    assert 240 * MiB <= seen.available <= 250 * MiB  # type: ignore[operator]
    assert seen.source.endswith(f"/{outer.path.name})")


def test_page_cache_of_written_files_is_not_counted_as_used(probe: Probe, tmp_path: Path) -> None:
    fs = subprocess.run(["stat", "-f", "-c", "%T", tmp_path], capture_output=True, text=True).stdout.strip()
    if fs == "tmpfs":
        pytest.skip("tmp_path is on tmpfs: its files are shared memory, not reclaimable page cache")
    with memory_cgroup(300 * MiB) as cg:
        cg.add(probe.pid)
        before, usage_before = probe.measure(), cg.usage()
        probe.ask("write_file", tmp_path / "cached", 150 * MiB)
        after, usage_after = probe.measure(), cg.usage()
    # The cgroup's usage counts the file's pages (on this machine's kernel, at least) ...
    assert usage_after - usage_before >= 140 * MiB
    # ... but the kernel would drop them before an OOM kill.
    drop = before.available - after.available  # type: ignore[operator]
    assert drop <= 20 * MiB, f"available fell by {drop / MiB:.1f} MiB"


def test_process_outside_any_limit_gets_the_host_figure(probe: Probe) -> None:
    limit = enclosing_limit()
    if limit is not None and limit < meminfo("MemTotal"):
        pytest.skip(f"the tests themselves run under a memory limit of {limit} bytes")
    low = meminfo("MemAvailable")
    seen = probe.measure()
    high = meminfo("MemAvailable")
    assert seen.source == "host"
    assert seen.limit == meminfo("MemTotal")
    # Other processes on the machine move MemAvailable while we look.
    assert min(low, high) - 256 * MiB <= seen.available <= max(low, high) + 256 * MiB  # type: ignore[operator]


def test_cgroup_limit_above_host_memory_leaves_host_as_the_bound(probe: Probe) -> None:
    with memory_cgroup(2 * meminfo("MemTotal")) as cg:
        cg.add(probe.pid)
        seen = probe.measure()
    if enclosing_limit() is None:
        assert seen.source == "host"
    else:
        assert cg.path.name not in seen.source


def test_oom_kills_counts_a_child_killed_over_the_limit(probe: Probe) -> None:
    with memory_cgroup(300 * MiB) as cg:
        cg.add(probe.pid)
        before = probe.ask("measure")["oom_kills"]
        died = probe.ask("child_allocates", 400 * MiB)
        after = probe.ask("measure")["oom_kills"]
        counted = cg.oom_kills()
    assert died["signal"] == signal.SIGKILL
    assert before is not None and after == before + 1
    assert after == counted


# --- cgroup v2 files, made up: this machine's memory controller is on v1 ----------


def _fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> Path:
    """A /proc and a cgroup2 mount holding ``files``; this process is in /kubepods/pod1/c1."""
    proc, fs = tmp_path / "proc", tmp_path / "cgroup fs"  # a space: mountinfo escapes it as \040
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/kubepods/pod1/c1\n")
    mount_point = str(fs).replace(" ", "\\040")
    (proc / "self" / "mountinfo").write_text(
        "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n"
        f"31 22 0:26 / {mount_point} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    (proc / "meminfo").write_text("MemTotal:       25165824 kB\nMemFree:  1 kB\nMemAvailable:   23068672 kB\n")
    (proc / "vmstat").write_text("pgfault 1\noom_kill 7\n")
    for name, text in files.items():
        (fs / name).parent.mkdir(parents=True, exist_ok=True)
        (fs / name).write_text(text)
    monkeypatch.setattr(memory, "_PROC", str(proc))
    return fs


def test_cgroup_v2_files_give_the_tightest_limit_less_inactive_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_v2(
        tmp_path,
        monkeypatch,
        {
            "cgroup.controllers": "cpu memory\n",  # the root: no memory.max
            "kubepods/memory.max": "max\n",
            "kubepods/memory.current": str(5000 * MiB) + "\n",
            "kubepods/pod1/memory.max": str(1150 * MiB) + "\n",
            "kubepods/pod1/memory.high": "max\n",
            "kubepods/pod1/memory.current": str(900 * MiB) + "\n",
            "kubepods/pod1/memory.stat": f"anon {700 * MiB}\nfile {200 * MiB}\nactive_file 0\ninactive_file {137 * MiB}\n",
            "kubepods/pod1/c1/memory.max": "max\n",
            "kubepods/pod1/c1/memory.current": str(800 * MiB) + "\n",
            "kubepods/pod1/c1/memory.stat": f"inactive_file {10 * MiB}\n",
            "kubepods/pod1/c1/memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n",
        },
    )
    seen = memory.available_memory()
    assert seen == memory.Memory(
        available=(1150 - 763) * MiB,
        limit=1150 * MiB,
        used=763 * MiB,
        source="container limit 1.1 GiB (cgroup v2 /kubepods/pod1)",
    )
    assert memory.oom_kills() == 2


def test_cgroup_v2_memory_high_below_memory_max_is_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_v2(
        tmp_path,
        monkeypatch,
        {
            "kubepods/pod1/c1/memory.max": str(1150 * MiB) + "\n",
            "kubepods/pod1/c1/memory.high": str(1000 * MiB) + "\n",
            "kubepods/pod1/c1/memory.current": str(800 * MiB) + "\n",
            "kubepods/pod1/c1/memory.stat": "inactive_file 0\n",
        },
    )
    seen = memory.available_memory()
    assert (seen.available, seen.limit, seen.used) == (200 * MiB, 1000 * MiB, 800 * MiB)
    assert seen.source == "container memory.high 1000.0 MiB (cgroup v2 /kubepods/pod1/c1)"


def test_unreadable_cgroup_files_mean_no_limit_known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_v2(
        tmp_path,
        monkeypatch,
        {
            "kubepods/pod1/memory.max": "a lot\n",
            "kubepods/pod1/memory.current": "12\n",
            "kubepods/pod1/c1/memory.max": str(100 * MiB) + "\n",  # no memory.current: unknown
        },
    )
    seen = memory.available_memory()
    assert seen == memory.Memory(
        available=23068672 * 1024, limit=25165824 * 1024, used=(25165824 - 23068672) * 1024, source="host"
    )
    assert memory.oom_kills() is None
