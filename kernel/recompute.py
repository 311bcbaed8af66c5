"""Making again what could not be saved, by running again the cells that made it.

The kernel keeps a :class:`CellHistory` (the cells run, restored ones first)
and every checkpoint stores it.  After a restore, a variable the checkpoint
could not save (a database connection, a generator) is named with the cell
that made it; ``%checkpoint recompute NAME`` runs again the shortest chain of
recorded cells that makes it from what was restored (:func:`plan`), and with
``recompute = "auto"`` the kernel does so at start for cells that are safe to
run again unasked (they succeeded, were quick, and make nothing but what is
missing).  A cell run again never replaces a restored variable it also
assigns: that variable is put back as it was restored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .cells import CellRecord, chain_for, names_of, python_of

log = logging.getLogger(__name__)

#: What a checkpoint keeps of the history: enough to rebuild a session's handles, bounded in size.
MAX_CELLS = 200
MAX_SOURCE_BYTES = 256 << 10


class CellHistory:
    """The cells this notebook ran, oldest first: restored from its checkpoint, then this kernel's."""

    def __init__(self) -> None:
        self.records: list[CellRecord] = []
        # Each record's JSON, made once: every checkpoint stores the whole history.
        self._json: list[dict[str, Any]] = []
        #: execution count -> the request message of a cell run by this kernel (where its news goes)
        self.parents: dict[int, dict[str, Any]] = {}

    def add(self, record: CellRecord, parent: dict[str, Any] | None = None) -> None:
        """Record a cell that ran; the oldest are dropped past MAX_CELLS or MAX_SOURCE_BYTES."""
        self.records.append(record)
        self._json.append(record.to_json())
        if parent:
            self.parents[record.execution_count] = parent
        size = sum(len(r.source) for r in self.records)
        while len(self.records) > MAX_CELLS or (size > MAX_SOURCE_BYTES and len(self.records) > 1):
            dropped = self.records.pop(0)
            self._json.pop(0)
            size -= len(dropped.source)
            self.parents.pop(dropped.execution_count, None)

    def restore(self, data: Any) -> None:
        """Start from the history a checkpoint stored (what is not a valid record is ignored)."""
        records = [CellRecord.from_json(item) for item in data] if isinstance(data, list) else []
        self.records = [r for r in records if r is not None][-MAX_CELLS:]
        self._json = [r.to_json() for r in self.records]
        self.parents = {}

    def to_json(self) -> list[dict[str, Any]]:
        """The history as a checkpoint stores it (a new list; the records' dicts are never changed)."""
        return list(self._json)

    def maker(self, name: str) -> CellRecord | None:
        """The last recorded cell that assigned ``name``."""
        for record in reversed(self.records):
            if name in record.binds:
                return record
        return None


def record_cell(
    execution_count: int, raw_cell: str, ok: bool, seconds: float, transform: Any = None, private: bool = False
) -> CellRecord:
    """What to remember of a cell that ran; ``private`` (it names an excluded variable): not its text."""
    if private:
        return CellRecord(execution_count, "", [], [], ok=False, seconds=seconds)
    found = names_of(python_of(raw_cell, transform))
    reads, binds = found if found is not None else ([], [])
    return CellRecord(execution_count, raw_cell, reads, binds, ok=ok and found is not None, seconds=seconds)


def first_line(record: CellRecord) -> str:
    """``In [3]: conn = sqlite3.connect('sales.db')`` (the first line of code, cut to fit a line);
    ``an earlier kernel's In [3]: ...`` for a cell an earlier kernel ran."""
    lines = [line for line in record.source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    text = lines[0].strip() if lines else ""
    if len(text) > 80:
        text = text[:79] + "…"
    more = " …" if len(lines) > 1 else ""
    whose = "an earlier kernel's " if record.earlier else ""  # this kernel counts from In [1] again
    return f"{whose}In [{record.execution_count}]: {text}{more}"


@dataclass
class Plan:
    """The cells to run again for some names, and why any other name cannot be made."""

    cells: list[CellRecord] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


def plan(history: CellHistory, names: Iterable[str], available: Iterable[str], makeable: Iterable[str] = ()) -> Plan:
    """The shortest chain of recorded cells that makes ``names`` from the ``available`` ones
    (and other ``makeable`` ones: variables that could not be saved, made on the way)."""
    cells, missing = chain_for(list(names), history.records, available, makeable)
    return Plan(cells, missing)


def safe_to_run_unasked(record: CellRecord, missing: set[str], max_seconds: float) -> str:
    """Why a cell may not be run again at start without asking ("" if it may)."""
    if not record.ok:
        return "it failed when it ran"
    if record.seconds > max_seconds:
        return f"it took {record.seconds:.1f} s, more than recompute_max_seconds ({max_seconds:g} s)"
    others = [n for n in record.binds if n not in missing]
    if others:
        return f"it also assigns {', '.join(others[:3])}"
    return ""


def advice(names_types: list[tuple[str, str]], history: CellHistory, available: Iterable[str]) -> list[str]:
    """One line per variable that was not saved: how to get it back, or why it cannot be made."""
    have = set(available)
    unsaved = [name for name, _ in names_types]
    lines = []
    for name, tname in names_types:
        wanted = plan(history, [name], have, unsaved)
        short = tname.rsplit(".", 2)
        kind = ".".join(short[-2:]) if len(short) > 1 else tname
        if wanted.cells:
            runs = "; ".join(first_line(r) for r in wanted.cells)
            lines.append(f"{name} was not saved ({kind}); `%checkpoint recompute {name}` re-runs {runs}")
        else:
            why = wanted.missing.get(name, "no recorded cell made it")
            lines.append(f"{name} was not saved ({kind}) and cannot be recomputed: {why}.")
    return lines


def run(shell: Any, cells: list[CellRecord], wanted: set[str]) -> tuple[list[CellRecord], str]:
    """Run ``cells`` again in the user's namespace, quietly; returns those that ran and the first error.

    A variable a cell assigns that is not wanted (it was restored) is put back
    as it was afterwards, so running a cell again only adds what was missing.
    """
    ns = shell.user_ns
    ran: list[CellRecord] = []
    for record in cells:
        keep = {n: ns[n] for n in record.binds if n in ns and n not in wanted}
        result = shell.run_cell(record.source, store_history=False, silent=True)
        ns.update(keep)
        error = getattr(result, "error_in_exec", None) or getattr(result, "error_before_exec", None)
        if error is not None:
            return ran, f"In [{record.execution_count}] raised {type(error).__name__}: {error}"
        ran.append(record)
    return ran, ""
