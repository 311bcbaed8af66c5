"""Checkpoints in a forked child, as Redis does BGSAVE.

``fork()`` gives the child a copy-on-write image of the namespace as it stood
when the cell ended; the child pickles and writes it while the kernel goes
straight back to the user.  One child at a time: a checkpoint asked for while
one runs is remembered (not queued) and taken, of the newest state, as soon as
the running one ends and no cell is executing.

The child never touches zmq, IOPub or the kernel's output streams (its
stdout/stderr go to the kernel log's file descriptor), runs with gc disabled,
dies with the kernel (``PR_SET_PDEATHSIG``) and leaves through ``os._exit``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import mmap
import os
import select
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MAX_RESULT_BYTES = 1 << 20
_PROGRESS_BYTES = 4096


def _meminfo_bytes(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_for_fork(margin: int) -> tuple[bool, int, int]:
    """``(room, available, rss)``: is there room for a child's copy-on-write growth?

    The child touches every Python object it pickles (reference counts), and
    the kernel copies every page it writes while the child runs; half the
    kernel's resident size plus ``margin`` bytes is a safe bound in practice.
    Where /proc is absent, assume room.
    """
    available = _meminfo_bytes("/proc/meminfo", "MemAvailable")
    rss = _meminfo_bytes("/proc/self/status", "VmRSS")
    if available is None or rss is None:
        return True, available or 0, rss or 0
    return available >= rss // 2 + margin, available, rss


def fork_supported() -> bool:
    """True where a background checkpoint can be forked."""
    return hasattr(os, "fork") and sys.platform != "darwin"


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # parent died before prctl took effect
        os._exit(1)


def _quiet_child_io() -> None:
    """Point the child's fds 1 and 2 at the kernel log, away from IOPub."""
    original = getattr(sys.stderr, "_original_stdstream_copy", None)
    target = original if original is not None else os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            os.dup2(target, fd)
        except OSError:
            pass
    stream = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115 - lives until _exit
    sys.stdout = sys.stderr = stream


class BackgroundSaver:
    """Runs checkpoint jobs in forked children, one at a time, coalescing.

    ``job(progress)`` is called in the child and returns a JSON-able dict; it
    calls ``progress(name)`` as it starts on each variable.  ``on_result`` is
    called in the kernel (from a watcher thread) with that dict, or with
    ``{"ok": False, "error": ...}`` if the child failed, was killed, or ran
    longer than ``timeout`` seconds (then ``"stuck_on"`` names the variable it
    was working on).
    """

    def __init__(self, on_result: Callable[[dict[str, Any]], None], timeout: float | None = None):
        self._on_result = on_result
        self.timeout = timeout
        # Shared with every child: where it writes the name of the variable it
        # is pickling, without a system call per variable.
        self._progress = mmap.mmap(-1, _PROGRESS_BYTES)
        self._lock = threading.Condition()
        self._pid: int | None = None
        self._read_fd: int | None = None
        self._started = 0.0
        self._pending: Callable[[Callable[[str], None]], dict[str, Any]] | None = None
        self._executing = False
        self._watcher: threading.Thread | None = None

    @property
    def running(self) -> bool:
        with self._lock:
            return self._pid is not None

    def cell_started(self) -> None:
        """A cell began: the namespace is no longer at a consistent point."""
        with self._lock:
            self._executing = True

    def request(self, job: Callable[[Callable[[str], None]], dict[str, Any]], cell_ended: bool = True) -> str:
        """Checkpoint now if no child runs, else remember to (newest state wins).

        Call at a consistent point: a cell just ended (``cell_ended``), or a
        cell asks for a checkpoint of itself mid-way.  Returns ``"started"`` or
        ``"coalesced"``.
        """
        with self._lock:
            if cell_ended:
                self._executing = False
            if self._pid is not None:
                self._pending = job
                return "coalesced"
            self._pending = None
            self._fork_locked(job)
            return "started"

    def wait(self, timeout: float | None) -> bool:
        """Wait until no child runs and nothing is pending. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pid is not None or self._pending is not None:
                if self._pid is None and self._pending is not None:
                    job, self._pending = self._pending, None
                    self._fork_locked(job)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    # --- internals --------------------------------------------------------

    def _fork_locked(self, job: Callable[[Callable[[str], None]], dict[str, Any]]) -> None:
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        self._progress[:4] = b"\0\0\0\0"
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a threaded process; the child
            # only pickles, writes files and _exits, touching no other thread's locks.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # child: never returns
            self._child(job, write_fd, parent, self._progress)
        os.close(write_fd)
        self._pid, self._read_fd, self._started = pid, read_fd, time.monotonic()
        self._lock.notify_all()
        if self._watcher is None:
            # One long-lived watcher: PR_SET_PDEATHSIG fires when the *thread*
            # that forked exits, so the thread that forks again must not end.
            self._watcher = threading.Thread(target=self._watch, name="durable-checkpoint-watcher", daemon=True)
            self._watcher.start()

    @staticmethod
    def _child(
        job: Callable[[Callable[[str], None]], dict[str, Any]], write_fd: int, parent: int, progress: mmap.mmap
    ) -> None:
        status = 1

        def report(name: str) -> None:
            data = name.encode("utf-8", "replace")[: _PROGRESS_BYTES - 4]
            progress[4 : 4 + len(data)] = data
            progress[:4] = len(data).to_bytes(4, "little")

        try:
            gc.disable()
            _die_with_parent(parent)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the user's cell
            _quiet_child_io()
            try:
                result = job(report)
                status = 0
            except BaseException as exc:  # report everything; the kernel decides what to show
                log.exception("background checkpoint failed")
                result = {"ok": False, "error": str(exc) or type(exc).__name__}
            data = json.dumps(result, default=str).encode()[:_MAX_RESULT_BYTES]
            while data:
                data = data[os.write(write_fd, data):]
        finally:
            os._exit(status)

    def _watch(self) -> None:
        while True:
            with self._lock:
                while self._pid is None:
                    self._lock.wait()
                pid, read_fd, started = self._pid, self._read_fd, self._started
            chunks = []
            deadline = None if not self.timeout else started + self.timeout
            timed_out = False
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([read_fd], [], [], wait)
                if not ready:
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    break
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            os.close(read_fd)
            _, status = os.waitpid(pid, 0)
            if timed_out:
                size = int.from_bytes(self._progress[:4], "little")
                stuck = self._progress[4 : 4 + size].decode("utf-8", "replace")
                result = {
                    "ok": False,
                    "error": f"the checkpoint took longer than {self.timeout:g} s"
                    + (f" while saving {stuck!r}" if stuck else ""),
                    "stuck_on": stuck,
                }
            else:
                result = _parse_result(b"".join(chunks), status)
            result.setdefault("wall_seconds", time.monotonic() - started)
            try:
                self._on_result(result)
            except Exception:
                log.exception("checkpoint result handler failed")
            with self._lock:
                self._pid = self._read_fd = None
                if self._pending is not None and not self._executing:
                    job, self._pending = self._pending, None
                    self._fork_locked(job)
                self._lock.notify_all()


def _parse_result(raw: bytes, status: int) -> dict[str, Any]:
    try:
        result = json.loads(raw) if raw else None
    except ValueError:
        result = None
    if isinstance(result, dict):
        return result
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return {"ok": False, "error": f"the checkpoint process was killed ({name})"}
    return {"ok": False, "error": f"the checkpoint process exited with status {os.waitstatus_to_exitcode(status)}"}
