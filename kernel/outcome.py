"""What one checkpoint came to: the one value that crosses the fork, child to kernel."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: Enough to tell the user (who sees ten names) and to recognise a skip reported before.
_MAX_SKIPPED = 1000
_MAX_TEXT = 300


@dataclass
class CheckpointOutcome:
    """What one checkpoint came to; crosses the fork as JSON."""

    ok: bool
    error: str = ""
    #: this kernel had already committed a newer state: nothing was written
    superseded: bool = False
    checkpoint_id: int | None = None
    variables: int = 0
    size: int = 0
    bytes_written: int = 0
    #: seconds the commit took
    seconds: float = 0.0
    #: seconds from the request to the outcome
    wall_seconds: float = 0.0
    #: (name, type, reason) of each variable not saved
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    #: names whose stored copy was damaged on disk and has been written again
    repaired: list[str] = field(default_factory=list)
    #: the writer of the checkpoint before this one, if another kernel wrote it
    other_writer: dict[str, Any] | None = None
    #: the variable a checkpoint that hung, crashed or was interrupted was saving, and why to skip it
    stuck_on: str = ""
    stuck_reason: str = ""
    #: the checkpoint process was killed for lack of memory
    out_of_memory: bool = False
    #: the checkpoint process crashed (SIGSEGV, SIGBUS, ...)
    crashed: bool = False
    #: the checkpoint process had let go of memory it then had to read (``checkpoints/buffers_first.py``)
    released_too_early: bool = False
    #: which of the kernel's checkpoint requests this is (0: unknown)
    seq: int = 0
    #: chunks the kernel may back by the files just written (``checkpoints.mapping.Adopter``)
    adoptable: list[Any] = field(default_factory=list)
    #: bytes of large buffers read and hashed (chunks known unchanged are not)
    bytes_hashed: int = 0
    #: arrays backed by a checkpoint file that was changed in place (their memory changed with it)
    backing_changed: list[str] = field(default_factory=list)
    #: the written-page scan this checkpoint's index of chunks answers to (0: none left; ``tracking.py``)
    tracked_scan: int = 0
    #: page-aligned ``[start, end)`` of the large buffers saved, for the kernel to track from now on
    tracked_buffers: list[Any] = field(default_factory=list)

    def to_json(self) -> bytes:
        """JSON of bounded size: a namespace of 100,000 unsaveable objects must not make a huge message."""
        data = dataclasses.asdict(self)
        data["skipped"] = [
            (name[:_MAX_TEXT], tname[:_MAX_TEXT], reason[:_MAX_TEXT])
            for name, tname, reason in self.skipped[:_MAX_SKIPPED]
        ]
        data["error"] = self.error[: 4 * _MAX_TEXT]
        return json.dumps(data, default=str).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CheckpointOutcome | None:
        """The outcome a child wrote, or None if it wrote nothing usable."""
        try:
            data = json.loads(raw)
            data["skipped"] = [tuple(s) for s in data.get("skipped", [])]
            return cls(**data)
        except (ValueError, TypeError, AttributeError):
            return None

    @classmethod
    def failed(cls, error: str, **details: Any) -> CheckpointOutcome:
        return cls(ok=False, error=error, **details)
