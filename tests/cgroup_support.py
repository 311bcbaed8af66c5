"""Real memory cgroups for tests: ``with memory_cgroup(300 << 20) as cg: cg.add(pid)``.

Not a test module.  Creates a child of this process's own memory cgroup (cgroup
v1 memory controller, or cgroup v2 with ``memory.max``), found through
``/proc/self/cgroup`` and ``/proc/self/mountinfo``; this file reads cgroupfs by
itself so the tests do not check ``durable_kernel.memory`` against itself.
Skips the test (``pytest.skip``) with the reason when no cgroup can be made:
not root, read-only cgroupfs, no memory controller, or (v2) a parent that
cannot delegate the memory controller to a child.

Moving a process into the cgroup does not move the memory it already uses
(``memory.move_charge_at_immigrate`` is gone from current kernels): only what
it allocates afterwards is charged to the new cgroup.  Put a process in before
it allocates, or start it inside (``preexec_fn=cg.join``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """``(fstype, root, mount point, super options)`` of the cgroup mounts."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                mounts.append((tail[0], _unescape(fields[3]), _unescape(fields[4]), tail[2]))
    return mounts


def own_memory_cgroup() -> tuple[int, Path]:
    """``(version, directory)`` of this process's memory cgroup; skips the test if there is none."""
    v1 = v2 = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0" and controllers == "":
                v2 = path
            elif "memory" in controllers.split(","):
                v1 = path
    for fstype, root, mount_point, options in _mountinfo():
        if fstype == "cgroup" and v1 is not None and "memory" in options.split(","):
            version, path = 1, v1
        elif fstype == "cgroup2" and v1 is None and v2 is not None:
            version, path = 2, v2
        else:
            continue
        if root != "/" and not (path == root or path.startswith(root + "/")):
            continue
        relative = path if root == "/" else path[len(root) :]
        directory = Path(mount_point) / relative.lstrip("/")
        if version == 2 and "memory" not in (directory / "cgroup.controllers").read_text().split():
            pytest.skip(f"cgroup v2 at {directory} has no memory controller")
        return version, directory
    pytest.skip("no mounted memory cgroup hierarchy holds this process (see /proc/self/cgroup, mountinfo)")


def limit_of(version: int, directory: Path) -> int | None:
    """The memory limit set on one cgroup directory, None if none or unreadable."""
    name = "memory.limit_in_bytes" if version == 1 else "memory.max"
    try:
        value = (directory / name).read_text().strip()
    except OSError:
        return None
    return None if value == "max" or int(value) >= 1 << 60 else int(value)


def enclosing_limit() -> int | None:
    """The lowest memory limit on this process's cgroup and its ancestors (None: unlimited)."""
    version, directory = own_memory_cgroup()
    limits = []
    while True:
        limit = limit_of(version, directory)
        if limit is not None:
            limits.append(limit)
        if directory.parent == directory or not (directory.parent / "cgroup.procs").exists():
            break
        directory = directory.parent
    return min(limits, default=None)


class MemoryCgroup:
    """A child memory cgroup made by :func:`memory_cgroup`."""

    def __init__(self, version: int, path: Path, parent: Path):
        self.version = version
        self.path = path
        self.parent = parent

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def join(self) -> None:
        """Move the calling process in: a ``preexec_fn`` for ``subprocess.Popen`` or jupyter_client's
        ``KernelManager.start_kernel``, so a process starts inside and all its memory is counted."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def oom_kills(self) -> int:
        """The cgroup's own count of OOM kills (read here, not through durable_kernel.memory)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise AssertionError(f"no oom_kill line in {self.path / name}")

    def usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / name).read_text())


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _make(version: int, parent: Path, limit_bytes: int | None) -> Path:
    path = parent / f"durable-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if version == 2:
        controllers = (parent / "cgroup.subtree_control").read_text().split()
        if "memory" not in controllers:
            try:
                _write(parent / "cgroup.subtree_control", "+memory")
            except OSError as exc:  # EBUSY: the parent holds processes ("no internal processes")
                pytest.skip(f"cannot enable the memory controller for children of {parent}: {exc}")
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup under {parent}: {exc}")
    try:
        if limit_bytes is None:
            pass
        elif version == 1:
            _write(path / "memory.limit_in_bytes", str(limit_bytes))
            with contextlib.suppress(OSError):  # no swap for this cgroup: over the limit means OOM
                _write(path / "memory.swappiness", "0")
        else:
            _write(path / "memory.max", str(limit_bytes))
            with contextlib.suppress(OSError):
                _write(path / "memory.swap.max", "0")
    except OSError as exc:
        path.rmdir()
        pytest.skip(f"cannot set a memory limit on {path}: {exc}")
    return path


def _remove(cg: MemoryCgroup) -> None:
    """Move what is left back to the parent, then remove the folder (it may take a moment to empty)."""
    for _ in range(200):
        for pid in cg.pids():
            with contextlib.suppress(ProcessLookupError, OSError):
                _write(cg.parent / "cgroup.procs", str(pid))
        try:
            cg.path.rmdir()
            return
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
        time.sleep(0.05)
    raise AssertionError(f"could not remove {cg.path}: still holds {cg.pids()}")


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int | None, inside: MemoryCgroup | None = None) -> Iterator[MemoryCgroup]:
    """A real memory cgroup limited to ``limit_bytes`` (None: no limit of its own), a child of
    this process's own cgroup or of ``inside``; on exit its processes go back to the parent
    and the folder is removed."""
    if os.geteuid() != 0:
        pytest.skip("creating memory cgroups needs root")
    version, parent = (inside.version, inside.path) if inside is not None else own_memory_cgroup()
    cg = MemoryCgroup(version, _make(version, parent, limit_bytes), parent)
    try:
        yield cg
    finally:
        _remove(cg)
