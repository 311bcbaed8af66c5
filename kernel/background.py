"""Checkpoints in forked children, as Redis does BGSAVE.

``fork()`` gives the child a copy-on-write image of the namespace as it stood
when the cell ended; the child pickles and writes it while the kernel goes
straight back to the user.  The kernel asks for a child as each cell ends
(unless ``coalesce_seconds`` in kernel.py lets quick cells share one), so the
state is captured at that instant, but children write one at a time: a new
child first waits until every earlier one has exited.  A child still waiting when
yet another cell ends is superseded (killed before it did anything), so at
most two exist: one writing, one waiting with the newest state.

Children outlive their kernel on purpose: a restart or shutdown never loses
the checkpoint of a cell whose reply was sent.  Each child runs in a session
of its own (a client's signal to the kernel's process group does not reach
it), closes its copies of the kernel's sockets (so a restarted kernel can bind
its ports again), holds the notebook's ``saving`` lock until it exits (the
next kernel waits on it before restoring) and stops itself after
``timeout`` seconds of work even when no kernel is left to stop it.

The child never touches zmq, IOPub or the kernel's output streams (its
stdout/stderr go to the kernel log's file descriptor), runs with gc disabled
and leaves through ``os._exit``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import resource
import select
import signal
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from .memory import available_memory, oom_kills
from .outcome import CheckpointOutcome

log = logging.getLogger(__name__)

_PROGRESS_BYTES = 4096
# The progress page: [0:8] the OOM-kill count the child saw as it started, plus one (0: unknown);
# [8] 1 once the child has its turn to write; [12:16] length and [16:] name of the variable it is on.
_OOM_AT = slice(0, 8)
_TURN_AT = 8
_NAME_AT = 16

#: What a child runs: ``job(progress, tell)`` pickles and commits, calling ``progress(name)`` per variable
#: and ``tell(outcome)`` once committed (before it tidies up); what it returns is sent if it told nothing.
Job = Callable[[Callable[[str], None], Callable[[CheckpointOutcome], None]], CheckpointOutcome]


def memory_for_fork(margin: int) -> tuple[bool, int, int]:
    """``(room, available, rss)``: is there room for a child's copy-on-write growth?

    The child touches every Python object it pickles (reference counts), and
    the kernel copies every page it writes while the child runs; half the
    kernel's anonymous memory plus ``margin`` bytes is a safe bound in
    practice.  Arrays backed by their checkpoint's chunk files
    (``kernel/adoption.py``) are page cache, not anonymous memory: a page the
    kernel writes becomes one anonymous page, whether a child runs or not, and
    the clean file page it leaves can be reclaimed, so they are not counted.
    ``available`` is the least of the machine's free memory and what the
    container's memory limits (cgroup v1 or v2) leave.  Where nothing is
    known, assume room.
    """
    mem = available_memory()
    rss = _rss()
    if mem.available is None or rss is None:
        return True, mem.available or 0, rss or 0
    return mem.available >= rss // 2 + margin, mem.available, rss


def _rss() -> int | None:
    """This process's anonymous resident memory (all of its resident memory where that is not told)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def fork_supported() -> bool:
    """True where a background checkpoint can be forked."""
    return hasattr(os, "fork") and sys.platform != "darwin"


def _close_inherited_sockets(keep: set[int]) -> None:
    """Close the child's copies of the kernel's sockets.

    A child that outlives its kernel would otherwise keep the kernel's
    listening ports bound, and the restarted kernel, given the same ports by
    its client, could not bind them.  Closing a copy does not affect the
    kernel's own sockets, nor a user's connection.
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd in keep or fd <= 2:
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)


def _quiet_child_io() -> None:
    """Point the child's fds 1 and 2 at the kernel log, away from IOPub."""
    original = getattr(sys.stderr, "_original_stdstream_copy", None)
    target = original if original is not None else os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(target, fd)
    stream = open(2, "w", closefd=False, buffering=1)  # lives until _exit
    sys.stdout = sys.stderr = stream


@dataclass
class _Child:
    pid: int
    result_fd: int
    #: read end of a pipe only this child holds open for writing: EOF once it exits
    baton_fd: int
    #: where the child writes the name of the variable it is pickling
    progress: mmap.mmap
    started: float
    superseded: bool = False
    chunks: list[bytes] = field(default_factory=list)


class BackgroundWriter:
    """Runs checkpoint jobs in forked children, one writing at a time, newest state winning.

    ``job(progress)`` is called in the child and returns a :class:`CheckpointOutcome`;
    it calls ``progress(name)`` as it starts on each variable.  ``on_outcome``
    is called in the kernel (from a watcher thread) with that outcome, or with
    a failed one if the child failed, crashed, was killed, or ran longer than
    ``timeout`` seconds (then ``stuck_on`` names the variable it was working on).
    """

    def __init__(self, on_outcome: Callable[[CheckpointOutcome], None], timeout: float | None = None):
        self._on_outcome = on_outcome
        self.timeout = timeout
        self._lock = threading.Condition()
        self._children: list[_Child] = []
        self._watcher: threading.Thread | None = None
        # Wakes the watcher when a child is added.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    @property
    def running(self) -> bool:
        """True while any checkpoint child is alive (writing or waiting to)."""
        with self._lock:
            return bool(self._children)

    def request(self, job: Job, keep_fds: list[int] | None = None) -> str:
        """Fork a child that saves the state as it is now, after every earlier child.

        Call at a consistent point (a cell just ended, or a cell asks for a
        checkpoint of itself).  A child that is still waiting for its turn is
        superseded.  ``keep_fds`` are handed to the child and closed here.
        Returns ``"started"``, or ``"queued"`` if an earlier child still runs.
        """
        with self._lock:
            for child in self._children[1:]:
                # Only a child still waiting for its turn: one that has started writing is let finish
                # (its commit is a newer state than any on disk; killing it would waste its work).
                if not child.superseded and not child.progress[_TURN_AT]:
                    child.superseded = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
            earlier = [c.baton_fd for c in self._children]
            # The child must not hold the read ends of its siblings' result pipes: a sibling
            # outliving the kernel could then block writing an outcome nobody reads.
            others = [c.result_fd for c in self._children] + [self._wake_r, self._wake_w]
            self._fork_locked(job, earlier, others, keep_fds or [])
            return "queued" if earlier else "started"

    def wait(self, timeout: float | None) -> bool:
        """Wait until no child is alive. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._children:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    # --- internals --------------------------------------------------------

    def _fork_locked(self, job: Job, earlier: list[int], others: list[int], keep_fds: list[int]) -> None:
        result_r, result_w = os.pipe()
        baton_r, baton_w = os.pipe()
        progress = mmap.mmap(-1, _PROGRESS_BYTES)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns about fork() in a threaded process; the child
                # only pickles, writes files and _exits, touching no other thread's locks.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:  # out of processes or memory: the caller saves in the foreground
            for fd in (result_r, result_w, baton_r, baton_w):
                os.close(fd)
            progress.close()
            raise
        if pid == 0:  # child: never returns
            for fd in (result_r, baton_r, *others):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._child(job, result_w, earlier, {result_w, baton_w, *keep_fds}, progress, self.timeout)
        os.close(result_w)
        os.close(baton_w)
        for fd in keep_fds:
            os.close(fd)
        self._children.append(_Child(pid, result_r, baton_r, progress, time.monotonic()))
        self._lock.notify_all()
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="durable-checkpoint-watcher", daemon=True)
            self._watcher.start()

    @staticmethod
    def _child(
        job: Job,
        write_fd: int,
        earlier: list[int],
        keep: set[int],
        progress: mmap.mmap,
        timeout: float | None,
    ) -> None:
        status = 1

        def report(name: str) -> None:
            data = name.encode("utf-8", "replace")[: _PROGRESS_BYTES - _NAME_AT]
            progress[_NAME_AT : _NAME_AT + len(data)] = data
            progress[_NAME_AT - 4 : _NAME_AT] = len(data).to_bytes(4, "little")

        try:
            gc.disable()
            # Read here, not in the kernel: it costs the user nothing, and the child
            # has allocated nothing yet, so a later kill is not counted before it.
            oom = oom_kills()
            progress[_OOM_AT] = (0 if oom is None else oom + 1).to_bytes(8, "little")
            os.setsid()  # a signal to the kernel's process group does not end a checkpoint
            # When memory runs out (a container's limit), the OOM killer must
            # take this child, never the kernel holding the user's state.
            with contextlib.suppress(OSError):
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("1000")
            # A checkpoint that let go of memory early dies of SIGSEGV if something reads it (the kernel
            # then takes it again, checkpoints/buffers_first.py): no core file of the kernel's memory.
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the user's cell
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            _quiet_child_io()
            _close_inherited_sockets(keep | set(earlier))
            for fd in earlier:  # one writer at a time, in the order the states were taken
                with contextlib.suppress(OSError):
                    while os.read(fd, 4096):
                        pass
            progress[_TURN_AT] = 1
            if timeout:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.setitimer(signal.ITIMER_REAL, timeout)
            told = []

            def tell(outcome: CheckpointOutcome) -> None:
                # The kernel learns of the commit now; the result pipe's end tells it nothing more comes.
                told.append(outcome)
                data = outcome.to_json()
                with contextlib.suppress(OSError):  # the kernel may be gone: the commit is what counts
                    while data:
                        data = data[os.write(write_fd, data) :]
                with contextlib.suppress(OSError):
                    os.close(write_fd)

            try:
                outcome = job(report, tell)
                status = 0
            except BaseException as exc:  # report everything; the kernel decides what to show
                log.exception("background checkpoint failed")
                outcome = CheckpointOutcome.failed(str(exc) or type(exc).__name__)
            if not told:
                tell(outcome)
        finally:
            os._exit(status)

    def _watch(self) -> None:
        # poll, not select: a kernel with many open files has fds above select's 1024 limit.
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        watched: dict[int, _Child] = {}
        while True:
            try:
                with self._lock:
                    children = {c.result_fd: c for c in self._children}
                for fd in children.keys() - watched.keys():
                    poller.register(fd, select.POLLIN)
                watched = children
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                        continue
                    child = children[fd]
                    chunk = os.read(fd, 65536)
                    if chunk:
                        child.chunks.append(chunk)
                        continue
                    poller.unregister(fd)
                    del watched[fd]
                    self._finish(child)
            except Exception:  # the watcher must outlive any one child's trouble
                log.exception("checkpoint watcher")
                time.sleep(0.1)

    def _finish(self, child: _Child) -> None:
        outcome = None
        if not child.superseded:
            # A child tells its outcome at the commit point, then tidies up (prunes) before it exits.
            outcome = CheckpointOutcome.from_json(b"".join(child.chunks))
            if outcome is not None:
                outcome.wall_seconds = time.monotonic() - child.started
        status = self._reap(child)
        if outcome is None and not child.superseded:
            outcome = self._explain_death(child, status)
            outcome.wall_seconds = time.monotonic() - child.started
        if outcome is not None:
            try:
                self._on_outcome(outcome)  # before the child leaves the list: wait() returns after it
            except Exception:
                log.exception("checkpoint outcome handler failed")
        with self._lock:
            # Off the list as its fds are closed: a fork under the lock lists the fds its child
            # must close, and a number closed while still listed may be reused by that fork's pipes.
            self._children.remove(child)
            os.close(child.result_fd)
            os.close(child.baton_fd)
            child.progress.close()
            self._lock.notify_all()

    @staticmethod
    def _reap(child: _Child) -> int:
        try:
            return os.waitpid(child.pid, 0)[1]
        except ChildProcessError:  # reaped elsewhere (a user's own os.wait): how it ended is unknown
            return 0

    def _explain_death(self, child: _Child, status: int) -> CheckpointOutcome:
        """The outcome of a child that wrote none: how it died, and what it was saving then."""
        if not os.WIFSIGNALED(status):
            return CheckpointOutcome.failed(
                f"the checkpoint process exited with status {os.waitstatus_to_exitcode(status)}"
            )
        size = int.from_bytes(child.progress[_NAME_AT - 4 : _NAME_AT], "little")
        on = child.progress[_NAME_AT : _NAME_AT + size].decode("utf-8", "replace")
        where = f" while saving {on!r}" if on else ""
        sig = os.WTERMSIG(status)
        if sig == signal.SIGALRM:
            return CheckpointOutcome.failed(
                f"the checkpoint took longer than {self.timeout:g} s{where}",
                stuck_on=on,
                stuck_reason=f"saving it took longer than {self.timeout:g} s",
            )
        if sig == signal.SIGKILL:
            after = oom_kills()
            before = int.from_bytes(child.progress[_OOM_AT], "little") - 1
            mem = available_memory()
            if (
                before >= 0
                and after is not None
                and after > before
                or (mem.limit is not None and mem.available is not None and mem.available < mem.limit // 10)
            ):
                return CheckpointOutcome.failed(
                    f"the checkpoint process was killed for lack of memory ({mem.describe()})", out_of_memory=True
                )
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE):
            return CheckpointOutcome.failed(
                f"the checkpoint process crashed ({name}){where}",
                stuck_on=on,
                stuck_reason=f"saving it crashed the checkpoint process ({name})",
                crashed=True,
            )
        return CheckpointOutcome.failed(f"the checkpoint process was killed ({name})")
