"""After a checkpoint, back the user's large arrays by the chunk files it wrote (``checkpoints.mapping.Adopter``).

Why: a buffer backed by its chunk files tells the next checkpoint which chunks
the user wrote (the others are not even read, so a trivial cell's checkpoint
of a 4 GiB array takes milliseconds instead of hashing 4 GiB), and its clean
pages are page cache the system can reclaim rather than anonymous memory.

When: a checkpoint child reports the chunks it wrote (from any thread); the
kernel adopts them on its main thread, between cells, a few milliseconds at a
time so that a cell sent meanwhile waits at most that long.  Never while a
thread the kernel did not start is alive (a user's thread, a subshell): it
could write the memory between the byte-for-byte comparison and the mapping.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from durable_kernel.checkpoints.mapping import Adopter

from .threads import KernelThreads

log = logging.getLogger(__name__)

#: Seconds of one step on the main thread (a cell sent meanwhile waits this long at most).
STEP_SECONDS = 0.005
#: Seconds between tries while a user's thread is alive.
RETRY_SECONDS = 5.0


class Adoption:
    """Pending chunks to adopt, and the steps that adopt them on the kernel's main loop."""

    def __init__(self, schedule: Callable[[Callable[[], None], float], None]):
        #: ``schedule(fn, delay)``: run ``fn`` on the main thread's loop after ``delay`` seconds (thread-safe)
        self._schedule = schedule
        self._threads = KernelThreads()
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self._blob_path: Callable[[str], Path] | None = None
        self._scheduled = False
        self.adopted = 0
        #: counts the shell messages handled: the memory map read by an Adopter is only reused while it is
        #: unchanged (nothing but adoption ran since)
        self._activity = 0
        self._adopter: tuple[int, Adopter] | None = None

    def note_activity(self) -> None:
        """A shell message is being handled (it may run code that maps or frees memory): main thread."""
        self._activity += 1

    @property
    def busy(self) -> bool:
        """True while chunks wait to be adopted."""
        return self._scheduled

    def offer(self, buffers: list[Any], blob_path: Callable[[str], Path]) -> None:
        """Chunks a checkpoint just wrote (any thread): they replace what an older one offered."""
        if not buffers:
            return
        with self._lock:
            self._pending = buffers
            self._blob_path = blob_path
            if self._scheduled:
                return
            self._scheduled = True
        self._schedule(self.step, 0.0)

    def step(self) -> None:
        """Adopt for a few milliseconds (main thread, between cells), then schedule the rest."""
        with self._lock:
            pending, blob_path = self._pending, self._blob_path
            self._pending = []
        if not pending or blob_path is None:
            with self._lock:
                self._scheduled = False
            return
        foreign = self._threads.foreign()
        if foreign:
            log.debug("not backing arrays by their checkpoint files while threads %s run", foreign)
            self._again(pending, RETRY_SECONDS)
            return
        try:
            if self._adopter is None or self._adopter[0] != self._activity:
                self._adopter = (self._activity, Adopter(blob_path))
            done, left = self._adopter[1].adopt(pending, STEP_SECONDS)
        except Exception:  # an aid to later checkpoints: never a reason to disturb the user
            log.exception("backing arrays by their checkpoint files failed")
            done, left = 0, []
        self.adopted += done
        self._again(left, 0.0)

    def _again(self, left: list[Any], delay: float) -> None:
        with self._lock:
            if not self._pending:  # a newer offer replaces what is left
                self._pending = left
            if not self._pending:
                self._scheduled = False
                return
        self._schedule(self.step, delay)
