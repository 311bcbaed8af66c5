"""Saving a checkpoint: in a forked child (``background.py``) or here, and what came of it.

The save path: the kernel builds a :class:`SaveRequest` (the namespace and the
label of the cell that made it), :meth:`Saver.save` runs it in a child or in
the foreground, :meth:`SaveRequest.run` pickles and commits it through
``durable_kernel.checkpoints``, and one typed :class:`CheckpointOutcome`
comes back to the kernel (across the fork as JSON).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from durable_kernel.checkpoints import CheckpointError, CommitResult, NotebookStore, Snapshot, snapshot
from durable_kernel.checkpoints.errors import ReleasedTooEarly
from durable_kernel.checkpoints.serialize import Skipped
from durable_kernel.checkpoints.tracking import Unwritten, WrittenPages

from . import humanize
from .background import BackgroundWriter, fork_supported, memory_for_fork
from .memory import available_memory
from .notices import Notices
from .outcome import CheckpointOutcome

log = logging.getLogger(__name__)

#: Free memory a foreground save leaves untouched, so the kernel itself survives it.
_FOREGROUND_RESERVE = 64 << 20


@dataclass
class SaveRequest:
    """One checkpoint to take: the namespace as it is now, labelled with the cell that made it.

    Everything is bound when it is asked for: a background child runs it on
    the copy of the namespace made by fork at that instant.
    """

    notebook: NotebookStore
    namespace: Mapping[str, Any]
    names: list[str]
    execution_count: int
    cell: str
    #: this kernel, and which of its checkpoints this is (a newer state always wins)
    writer: dict[str, Any]
    keep: int
    max_variable_bytes: int | None
    #: names not even to try, with the reason to report
    skip: dict[str, str]
    #: the cells run so far, as recorded (kernel/recompute.py)
    cells: list[dict[str, Any]] | None = None
    #: (name, type, reason) of variables a restored checkpoint could not save, still missing:
    #: still "not saved", so a later restart still offers to make them again
    missing: list[tuple[str, str, str]] | None = None
    #: list the chunks the kernel may back by their files (``c.DurableKernel.map_arrays``)
    adopt: bool = False
    #: the kernel's written-page tracker, the number of the scan it takes right after the fork, and the
    #: read and write ends of the pipe it sends that scan through (``c.DurableKernel.track_writes``;
    #: used by a forked child only)
    tracking: tuple[WrittenPages, int, int, int] | None = None
    #: with ``tracking``: save the large buffers first and let go of their memory before pickling
    #: (``checkpoints/buffers_first.py``)
    buffers_first: bool = False

    def run_in_child(
        self, progress: Callable[[str], None], tell: Callable[[CheckpointOutcome], None]
    ) -> CheckpointOutcome:
        """:meth:`run` in a forked child, which exits after it: the kernel's pages it holds are let go
        as early as can be (``NotebookStore.commit``), and ``tell`` gets the outcome at the commit
        point, before the child prunes old checkpoints."""
        return self.run(progress, forked_child=True, tell=tell)

    def run(
        self,
        progress: Callable[[str], None] | None = None,
        memory_left: Callable[[], int | None] | None = None,
        stop_on: tuple[type[BaseException], ...] = (),
        forked_child: bool = False,
        tell: Callable[[CheckpointOutcome], None] | None = None,
    ) -> CheckpointOutcome:
        """Pickle and commit; a :class:`CheckpointError` becomes a failed outcome.  ``tell`` (if given)
        gets the outcome as soon as it is committed."""
        taken: list[Snapshot] = []

        def take() -> Snapshot:
            snap = snapshot(
                self.namespace,
                self.names,
                self.max_variable_bytes,
                skip=self.skip,
                progress=progress,
                stop_on=stop_on,
                memory_left=memory_left,
            )
            snap.skipped += [Skipped(name, tname, reason) for name, tname, reason in self.missing or []]
            taken.append(snap)
            return snap

        unwritten = None
        if forked_child and self.tracking is not None:
            tracker, scan, received, sent_from = self.tracking
            os.close(sent_from)  # the kernel's end: the pipe ends when the kernel closes its copy
            unwritten = Unwritten(tracker, scan, received)
            if self.buffers_first:
                # A read of memory given up early ends this child with SIGSEGV by design, and the kernel
                # takes the checkpoint again (checkpoints/buffers_first.py): no crash dump in the log.
                faulthandler.disable()
        told: list[CheckpointOutcome] = []

        def committed(done: CommitResult) -> None:
            told.append(self._outcome(done, taken, unwritten))
            if tell is not None:
                tell(told[0])

        try:
            done = self.notebook.commit(
                take if unwritten is not None and self.buffers_first else take(),
                execution_count=self.execution_count,
                cell=self.cell,
                keep=self.keep,
                writer=self.writer,
                cells=self.cells,
                release_buffers=forked_child,
                report_adoptable=self.adopt,
                unwritten=unwritten,
                committed=committed if tell is not None else None,
            )
        except ReleasedTooEarly as exc:
            return CheckpointOutcome.failed(str(exc), released_too_early=True)
        except CheckpointError as exc:
            return CheckpointOutcome.failed(str(exc))
        return told[0] if told else self._outcome(done, taken, unwritten)

    def _outcome(self, done: CommitResult, taken: list[Snapshot], unwritten: Unwritten | None) -> CheckpointOutcome:
        """What a commit came to; a child leaves its index of chunks for the next one first."""
        snap = taken[-1] if taken else Snapshot([], [])  # none taken: a newer state was already committed
        tracked_scan = 0
        if unwritten is not None and self.tracking is not None and not done.superseded:
            unwritten.save()
            tracked_scan = self.tracking[1]
        return CheckpointOutcome(
            ok=True,
            superseded=done.superseded,
            checkpoint_id=done.manifest.generation,
            variables=len(snap.variables),
            size=snap.size,
            bytes_written=done.bytes_written,
            seconds=done.seconds,
            skipped=[(s.name, s.type, s.reason) for s in snap.skipped],
            repaired=done.repaired,
            other_writer=done.other_writer,
            seq=self.writer.get("seq", 0),
            adoptable=done.adoptable,
            bytes_hashed=done.bytes_hashed,
            backing_changed=done.backing_changed,
            tracked_scan=tracked_scan,
            tracked_buffers=unwritten.largest_buffers() if tracked_scan and unwritten is not None else [],
        )


class _TookTooLong(BaseException):
    """Raised in the main thread when a foreground save runs past its time limit."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise :class:`_TookTooLong` in this (main) thread after ``seconds``."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _TookTooLong()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _memory_left() -> int | None:
    available = available_memory().available
    return None if available is None else available - _FOREGROUND_RESERVE


class Saver:
    """Runs save requests in a forked child when memory allows, else in the foreground.

    ``on_outcome`` gets every outcome (from a watcher thread for children).
    ``timeout`` bounds each checkpoint (None: no limit); ``fork_margin`` is the
    memory kept free beyond a child's copy-on-write growth.
    """

    def __init__(
        self,
        on_outcome: Callable[[CheckpointOutcome], None],
        notices: Notices,
        *,
        background: bool,
        timeout: float | None,
        fork_margin: int,
    ):
        self._on_outcome = on_outcome
        self._notices = notices
        self.timeout = timeout
        self.fork_margin = fork_margin
        self._children = BackgroundWriter(on_outcome, timeout) if background and fork_supported() else None
        self._oom_seen = False

    @property
    def forks(self) -> bool:
        """True if checkpoints are written in forked children (when memory allows)."""
        return self._children is not None

    @property
    def running(self) -> bool:
        """True while a background checkpoint is being written."""
        return self._children is not None and self._children.running

    def wait(self, timeout: float | None) -> bool:
        """Wait until every checkpoint in flight is committed. False on timeout."""
        return True if self._children is None else self._children.wait(timeout)

    def save(self, request: SaveRequest, keep_fds: list[int] | None = None) -> None:
        """Start the checkpoint (a child) or take it now (the foreground). Never raises for a bad variable."""
        if self._children is not None and self._room_to_fork():
            try:
                self._children.request(request.run_in_child, keep_fds=keep_fds)
                return
            except OSError as exc:  # no process or memory to fork with: the foreground still saves
                log.warning("cannot fork a checkpoint process", exc_info=True)
                self._notices.once(
                    "fork",
                    f"a background checkpoint process could not be started ({exc.strerror or exc}): "
                    "saving in the foreground, so cells wait for checkpoints.",
                )
        for fd in keep_fds or []:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._on_outcome(self._in_foreground(request))

    def note_outcome(self, outcome: CheckpointOutcome) -> None:
        """Learn from an outcome: a child killed for lack of memory makes the next forks more careful."""
        if outcome.out_of_memory:
            self._oom_seen = True

    def _room_to_fork(self) -> bool:
        # Once a child was killed for lack of memory, ask for twice the margin.
        room, available, rss = memory_for_fork(self.fork_margin * (2 if self._oom_seen else 1))
        if room:
            self._notices.forget("memory")
            return True
        self._notices.once(
            "memory",
            f"memory is low ({available_memory().describe()}; the kernel uses {humanize.size(rss)}): saving in "
            "the foreground instead of a background process, so cells wait for checkpoints, and variables that "
            "do not fit in the memory left are not saved.",
        )
        return False

    def _in_foreground(self, request: SaveRequest) -> CheckpointOutcome:
        """Run a request here: bounded in time and in the memory its pickles may take."""
        self.wait(self.timeout)  # a child may still be writing: let it finish first
        current = [""]

        def progress(name: str) -> None:
            current[0] = name

        def where() -> str:
            return f" while saving {current[0]!r}" if current[0] else ""

        try:
            with _time_limit(self.timeout):
                return request.run(progress, memory_left=_memory_left, stop_on=(_TookTooLong,))
        except _TookTooLong:
            return CheckpointOutcome.failed(
                f"the checkpoint took longer than {self.timeout:g} s{where()}",
                stuck_on=current[0],
                stuck_reason=f"saving it took longer than {self.timeout:g} s",
            )
        except KeyboardInterrupt:
            return CheckpointOutcome.failed(
                f"the checkpoint was interrupted{where()}",
                stuck_on=current[0],
                stuck_reason="saving it was interrupted",
            )
