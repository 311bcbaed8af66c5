"""How much memory this process (and a child it forks) can still use before the OOM killer comes.

In a container the host's ``MemAvailable`` is the wrong figure: a JupyterHub pod
on Kubernetes or a ``docker run --memory`` container is bounded by its memory
cgroup, and the kernel's OOM killer acts when the cgroup's usage reaches its
limit, however much the host has free.  :func:`available_memory` takes the
smallest room over the host and every memory-limited cgroup on this process's
path up to the root of the mounted hierarchy:

* cgroup v2 (``0::/path``): ``memory.max`` (and ``memory.high`` where lower:
  past it the kernel throttles hard and reclaims) minus ``memory.current``;
* cgroup v1 (``N:memory:/path``): ``memory.limit_in_bytes`` minus
  ``memory.usage_in_bytes``; an ancestor counts only while the hierarchy is on
  (``memory.use_hierarchy``);

in both, usage counts the page cache of files the cgroup read or wrote, so the
inactive part (``inactive_file`` in ``memory.stat``, which the kernel drops
before it kills anyone) is subtracted, as Kubernetes does for its "working
set".  Hybrid hosts (a v1 memory controller next to a v2 mount without it) use
the v1 hierarchy.  Mount points come from ``/proc/self/mountinfo``.

A child forked by this process stays in its cgroup, and every copy-on-write
page either of them copies is charged there, so the same figure bounds both.

Nothing here raises: a file that cannot be read or parsed means "no limit known"
at that level.  The cgroup path discovery is cached (keyed on the contents of
``/proc/self/cgroup``, so a process moved to another cgroup is followed); the
figures are read afresh on every call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .humanize import size

__all__ = ["Memory", "available_memory", "oom_kills"]

# Where /proc is; the tests point it at a made-up tree to exercise cgroup v2
# parsing on a machine whose memory controller is on v1.
_PROC = "/proc"

# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712
# with 4 KiB pages); v2 writes "max".  Anything this large is no limit.
_UNLIMITED = 1 << 60


@dataclass
class Memory:
    """Room before the OOM killer, and which bound gives it.

    ``available``: bytes this process and a child it forks can still use
    together (``limit - used`` of the tightest bound, never negative);
    ``limit`` and ``used``: that bound's size and current use (for the host,
    ``MemTotal`` and ``MemTotal - MemAvailable``); ``source``: the bound in
    words, ``"host"`` or ``"container limit 1.1 GiB (cgroup v1 /kubepods/x)"``.
    All three figures are None when nothing could be read (``source``
    ``"unknown"``).
    """

    available: int | None
    limit: int | None
    used: int | None
    source: str

    def describe(self) -> str:
        """``"120.0 MiB free of the container limit 1.1 GiB (...)"``, for messages."""
        if self.available is None:
            return "free memory unknown"
        return (
            f"{size(self.available)} free, {self.source}"
            if self.source != "host"
            else (f"{size(self.available)} free on this machine")
        )


@dataclass(frozen=True)
class _Level:
    """One cgroup on this process's path: its directory and its name for messages."""

    version: int
    directory: str
    name: str


# (proc root, contents of /proc/self/cgroup) -> cgroups innermost first
_cache: tuple[tuple[str, bytes], tuple[_Level, ...]] | None = None


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)


def _number(path: str) -> int | None:
    """A file holding one number; ``max`` (v2) and v1's huge value are None."""
    data = _read(path)
    if data is None:
        return None
    try:
        value = int(data)
    except ValueError:
        return None  # "max", or garbage
    return value if 0 <= value < _UNLIMITED else None


def _field(text: bytes | None, key: bytes) -> int | None:
    """The number after ``key`` at the start of a line of ``text`` (memory.stat, /proc/meminfo...)."""
    if text is None:
        return None
    if text.startswith(key):
        start = len(key)
    else:
        at = text.find(b"\n" + key)
        if at < 0:
            return None
        start = at + 1 + len(key)
    end = text.find(b"\n", start)
    value = text[start : end if end >= 0 else None].split()
    try:
        return int(value[0]) if value else None
    except ValueError:
        return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts(proc: str) -> list[tuple[str, str, str, str]]:
    """``(fstype, root, mount point, super options)`` of every cgroup mount."""
    data = _read(f"{proc}/self/mountinfo")
    if data is None:
        return []
    found = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        found.append((tail[0], _unescape(fields[3]), _unescape(fields[4]), tail[2]))
    return found


def _path_levels(version: int, path: str, mounts: list[tuple[str, str, str, str]]) -> list[_Level]:
    """The cgroup ``path`` and its ancestors, as directories under a mount of its hierarchy."""
    if version == 1:
        candidates = [m for m in mounts if m[0] == "cgroup" and "memory" in m[3].split(",")]
    else:
        candidates = [m for m in mounts if m[0] == "cgroup2"]
    path = path.removesuffix(" (deleted)")
    for _, root, mount_point, _ in candidates:
        if root == "/":
            relative = path
        elif path == root or path.startswith(root + "/"):
            relative = path[len(root) :]
        else:
            continue
        if not relative.startswith("/") and relative:
            continue  # "/../x": outside this cgroup namespace's view
        parts = [p for p in relative.split("/") if p]
        if ".." in parts:
            continue
        levels = []
        for depth in range(len(parts), -1, -1):
            sub = "/".join(parts[:depth])
            name = (root.rstrip("/") + "/" + sub) if sub else root
            levels.append(_Level(version, mount_point.rstrip("/") + ("/" + sub if sub else ""), name or "/"))
        return levels
    return []


def _discover(proc: str) -> tuple[_Level, ...]:
    """This process's memory cgroups, innermost first (cached while /proc/self/cgroup is unchanged)."""
    global _cache
    data = _read(f"{proc}/self/cgroup")
    if data is None:
        return ()
    key = (proc, data)
    cached = _cache
    if cached is not None and cached[0] == key:
        return cached[1]
    v1_path = v2_path = None
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    mounts = _mounts(proc)
    levels: list[_Level] = []
    if v1_path is not None:
        levels = _path_levels(1, v1_path, mounts)
        # An ancestor with use_hierarchy 0 does not count its children's use.
        for i, level in enumerate(levels[1:], start=1):
            if _read(f"{level.directory}/memory.use_hierarchy") == b"0\n":
                del levels[i:]
                break
    if not levels and v2_path is not None:
        levels = _path_levels(2, v2_path, mounts)
    result = tuple(levels)
    _cache = (key, result)
    return result


def _cgroup_bound(level: _Level) -> Memory | None:
    """The room left under one cgroup's limit, or None if it has no (readable) limit."""
    d = level.directory
    if level.version == 1:
        limit = _number(f"{d}/memory.limit_in_bytes")
        if limit is None:
            return None
        kind = "container limit"
        usage = _number(f"{d}/memory.usage_in_bytes")
        inactive = _field(_read(f"{d}/memory.stat"), b"total_inactive_file ")
    else:
        hard = _number(f"{d}/memory.max")
        high = _number(f"{d}/memory.high")
        if hard is None and high is None:
            return None
        if high is not None and (hard is None or high < hard):
            limit, kind = high, "container memory.high"
        else:
            limit, kind = hard, "container limit"
        usage = _number(f"{d}/memory.current")
        inactive = _field(_read(f"{d}/memory.stat"), b"inactive_file ")
    if usage is None:
        return None
    used = max(0, usage - (inactive or 0))
    assert limit is not None
    return Memory(
        available=max(0, limit - used),
        limit=limit,
        used=used,
        source=f"{kind} {size(limit)} (cgroup v{level.version} {level.name})",
    )


def _host_bound(proc: str) -> Memory | None:
    meminfo = _read(f"{proc}/meminfo")
    available = _field(meminfo, b"MemAvailable:")
    total = _field(meminfo, b"MemTotal:")
    if available is None:
        return None
    available *= 1024
    total = total * 1024 if total is not None else None
    used = max(0, total - available) if total is not None else None
    return Memory(available=available, limit=total, used=used, source="host")


def _available_memory() -> Memory:
    proc = _PROC
    best = _host_bound(proc)
    for level in _discover(proc):
        bound = _cgroup_bound(level)
        if bound is not None and (best is None or bound.available < best.available):  # type: ignore[operator]
            best = bound
    return best if best is not None else Memory(None, None, None, "unknown")


def available_memory() -> Memory:
    """The room this process and a child it forks have before the OOM killer acts.

    The tightest of the host (``MemAvailable``) and every memory-limited cgroup
    this process is in; see the module docstring.  Never raises.
    """
    try:
        return _available_memory()
    except Exception:  # noqa: BLE001 - a bug here must not cost the user a checkpoint
        return Memory(None, None, None, "unknown")


def oom_kills() -> int | None:
    """How many processes the OOM killer has killed in this process's innermost memory cgroup.

    cgroup v2: ``oom_kill`` in ``memory.events`` (which also counts the
    cgroup's descendants); v1: ``oom_kill`` in ``memory.oom_control`` (that
    cgroup only).  At the root of the hierarchy, or with no memory cgroup at
    all, the host-wide ``oom_kill`` of ``/proc/vmstat``.  None if unknown.
    Compare the count before and after a child dies of SIGKILL to tell that
    the OOM killer killed it.  Never raises.
    """
    try:
        proc = _PROC
        levels = _discover(proc)
        if levels:
            level = levels[0]
            name = "memory.oom_control" if level.version == 1 else "memory.events"
            count = _field(_read(f"{level.directory}/{name}"), b"oom_kill ")
            if count is not None:
                return count
            if len(levels) > 1:
                return None  # a non-root cgroup without the counter (too old a kernel)
        return _field(_read(f"{proc}/vmstat"), b"oom_kill ")
    except Exception:  # noqa: BLE001
        return None
