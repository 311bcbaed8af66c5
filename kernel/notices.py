"""What the user is told: one line per fact, once, on stderr of their next cell.

Checkpoints finish in the background, between cells, so most news waits for
the next cell; the restore notice waits for the first one (and is in the
banner).  Facts that would repeat (a full disk, low memory, another kernel
saving) are keyed, so the user hears them once until they stop being true.
"""

from __future__ import annotations

import sys
import threading

PREFIX = "durable-kernel: "


class Notices:
    """Lines waiting to be shown, and which keyed facts were already told."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._told: set[str] = set()

    def add(self, *lines: str) -> None:
        """Queue lines (each gets the ``durable-kernel:`` prefix unless it has it)."""
        with self._lock:
            self._lines += [line if line.startswith(PREFIX) else PREFIX + line for line in lines]

    def once(self, key: str, line: str) -> None:
        """Queue ``line`` unless the fact ``key`` was told and not :meth:`forget`-ten since."""
        with self._lock:
            if key in self._told:
                return
            self._told.add(key)
        self.add(line)

    def told(self, key: str) -> bool:
        """Was the fact ``key`` told (and is it still true)?"""
        with self._lock:
            return key in self._told

    def forget(self, key: str) -> bool:
        """The fact ``key`` is no longer true; returns whether it had been told."""
        with self._lock:
            was = key in self._told
            self._told.discard(key)
            return was

    def discard(self, *lines: str) -> None:
        """Drop these lines if they still wait (a frontend shows them its own way)."""
        with self._lock:
            self._lines = [line for line in self._lines if line not in lines]

    def take(self) -> list[str]:
        """Every queued line, oldest first; the queue is empty afterwards."""
        with self._lock:
            lines, self._lines = self._lines, []
            return lines

    def show(self) -> None:
        """Print the queued lines on stderr (of the cell running now)."""
        lines = self.take()
        if lines:
            print("\n".join(lines), file=sys.stderr, flush=True)
