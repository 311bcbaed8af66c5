"""The restore path at start: what comes back, and what the user is told about it.

In order: wait for the previous kernel's last checkpoint (it outlives its
kernel), move over the state this kernel session saved under a notebook's old
name (a rename while it ran), load the newest checkpoint that verifies, and
describe it all; with nothing saved, name the state of a notebook whose file
is gone (it was probably moved here).  Nothing here touches the namespace:
the kernel applies the :class:`RestoreReport`.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import dataclass, field

from durable_kernel.checkpoints import (
    CheckpointError,
    NotebookStore,
    NotRestored,
    Restored,
    Store,
    inventory,
    maintenance,
    printable,
)

from . import humanize

log = logging.getLogger(__name__)

_MISSING_MODULE = re.compile(r"No module named '([^'.]+)")
#: A connection-file name made of a process id, not unique over time (see unique_kernel_id).
_PID_KERNEL_ID = re.compile(r"^kernel-[0-9]+$")


@dataclass
class RestoreReport:
    """What a restore brought back and what to tell (the first cell's lines; the banner holds them too)."""

    restored: Restored | None
    #: one line per newer checkpoint that could not be used
    reasons: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    #: banner text when it differs from the lines (nothing to tell in a cell)
    banner_only: str = ""
    #: stand-ins for variables whose saved data is kept but could not be loaded
    placeholders: dict[str, NotRestored] = field(default_factory=dict)

    @property
    def banner(self) -> str:
        return self.banner_only or "\n".join(self.lines)


def advice(reasons: list[str]) -> str:
    """What to do about variables whose saved data could not be unpickled: ``install pandas and
    restart the kernel to get it back``."""
    modules = sorted({m.group(1) for r in reasons for m in [_MISSING_MODULE.search(r)] if m})
    fix = f"install {' and '.join(modules)}" if modules else "fix the cause"
    return f"{fix} and restart the kernel to get {'it' if len(reasons) == 1 else 'them'} back"


def restore(
    store: Store,
    notebook: NotebookStore,
    *,
    kernel_id: str,
    follow_renames: bool,
    verify: bool,
    wait: float,
) -> RestoreReport:
    """Load the newest checkpoint of ``notebook`` that verifies; raises ``CheckpointError``
    (an unsafe store) only when nothing may be loaded at all."""
    # First, even with nothing saved yet: the user hears at once that this
    # store's folders are not private (no checkpoint will be written there).
    notebook.check_safe()
    lines = wait_for_previous_kernel(notebook, wait)
    if follow_renames and kernel_id:
        lines += follow_renamed_notebook(store, notebook, kernel_id, wait)
    restored, reasons = notebook.load_latest_with_reasons(verify)
    report = RestoreReport(restored, reasons, lines)
    if restored is None:
        if not reasons:
            report.lines += offer_orphans(store, notebook.identity)
        _describe_nothing(report, notebook)
        return report
    why = {s.name: s.reason for s in restored.not_restored}
    report.placeholders = {
        name: NotRestored(
            name,
            entry.get("type", "?"),
            why[name],
            advice([why[name]]).capitalize() + "; until then its saved data is kept.",
            entry,
        )
        for name, entry in restored.unloaded.items()
    }
    _describe(report, notebook)
    return report


def wait_for_previous_kernel(notebook: NotebookStore, wait: float) -> list[str]:
    """Let the previous kernel's last checkpoint finish (it outlives its kernel) before restoring."""
    started = time.monotonic()
    waited = notebook.wait_for_savers(wait)
    if waited is None:
        return []
    seconds = humanize.duration(time.monotonic() - started)
    if waited:
        return [f"waited {seconds} for the previous kernel's last checkpoint to be written."]
    return [
        f"the previous kernel's last checkpoint was still being written after {seconds}; restored the newest "
        "finished one. When it is done, '%checkpoint list' shows it and '%checkpoint restore ID' loads it."
    ]


def unique_kernel_id(kernel_id: str) -> bool:
    """Does ``kernel_id`` (the kernel's connection-file name) name one kernel session and no other?

    Not when empty, nor when made of a process id (``kernel-12345``: ipykernel's own
    default, jupyter console's): the next process with that pid gets the same name.
    """
    return bool(kernel_id) and not _PID_KERNEL_ID.match(kernel_id)


def follow_renamed_notebook(store: Store, notebook: NotebookStore, kernel_id: str, wait: float) -> list[str]:
    """A restart of this kernel session under a new name (the notebook was renamed while its
    kernel ran): move the state it saved under an old name to the new one.

    Every other notebook whose newest checkpoint this kernel session wrote, later than this
    notebook's newest, is moved here, oldest first (so the newest state ends up newest).  This
    notebook's own newest may be this session's too: the server extension moves the state at the
    rename, and the running kernel then goes on saving under the old name until it restarts.
    Only for a kernel id that names one session (:func:`unique_kernel_id`).
    """
    if not unique_kernel_id(kernel_id):
        return []
    mine = inventory.newest_verified(notebook)
    mine_created = float(mine.created) if mine is not None else 0.0
    renamed = [
        stored
        for stored in inventory.newest_checkpoints(store)
        if stored.writer.get("kernel") == kernel_id and stored.folder != notebook.dir and stored.created > mine_created
    ]
    lines: list[str] = []
    for stored in reversed(renamed):  # newest_checkpoints lists the newest first
        old = inventory.notebook_at(store, stored.folder, stored.identity)
        name = printable(stored.identity, 300)
        lines += wait_for_previous_kernel(old, wait)
        try:
            moved = maintenance.move(store, old, notebook.identity, wait=0)  # waited for just above
        except CheckpointError as exc:  # this notebook's own state still loads
            log.warning("moving the state of %s to %s failed: %s", stored.identity, notebook.identity, exc)
            lines.append(
                f"this notebook was renamed from {name}, but its saved state could not be moved ({exc}); "
                f"'%checkpoint adopt {shlex.quote(stored.identity)}' tries again."
            )
            continue
        log.info("state of %s moved to %s: %s", stored.identity, notebook.identity, moved)
        lines.append(f"this notebook was renamed from {name}; its saved state moved with it.")
    return lines


def offer_orphans(store: Store, identity: str) -> list[str]:
    """No state for this notebook: name saved state whose notebook file is gone (moved here?)."""
    try:
        candidates = inventory.orphans(inventory.newest_checkpoints(store), identity)
    except Exception:  # a hint, never a reason not to start
        log.exception("looking for moved notebooks failed")
        return []
    if not candidates:
        return []
    best = candidates[0]
    others = f" ({len(candidates) - 1} more: durable-kernel list)" if len(candidates) > 1 else ""
    return [
        f"no saved state for this notebook, but {printable(best.identity, 300)} (saved "
        f"{humanize.ago(best.created)}) no longer exists there. If this notebook was moved from it, "
        f"'%checkpoint adopt {shlex.quote(best.identity)}' brings its state here{others}."
    ]


def _describe_nothing(report: RestoreReport, notebook: NotebookStore) -> None:
    where = f" for {printable(notebook.identity, 300)}"
    if report.reasons:
        report.lines.append(f"no checkpoint{where} could be loaded; starting with an empty namespace.")
        report.lines += [f"  {r}" for r in report.reasons]
    elif not report.lines:  # the banner says it; a cell needs no news
        report.banner_only = f"no saved state{where} yet; variables are saved after every cell."


def _describe(report: RestoreReport, notebook: NotebookStore) -> None:
    restored = report.restored
    assert restored is not None
    man = restored.manifest
    names = sorted(restored.values)
    lines = report.lines
    lines.append(
        f"restored {humanize.plural(len(names), 'variable')} for {printable(notebook.identity, 300)}, saved "
        f"{humanize.when(man.created)} as of In [{man.execution_count}] of an earlier kernel"
        + (f": {humanize.names(names)}" if names else "")
    )
    if restored.not_restored:
        missing = [f"{s.name} ({s.reason})" for s in restored.not_restored]
        lines.append(f"not restored: {humanize.names(missing, 10)}")
    if restored.unloaded:
        why = {s.name: s.reason for s in restored.not_restored}
        kept = sorted(restored.unloaded)
        lines.append(
            f"{humanize.names(kept)} {'is' if len(kept) == 1 else 'are'} kept as saved: "
            + advice([why[n] for n in kept])
            + " (assign or del a name to let it go)."
        )
    if restored.damaged:
        older = notebook.older_copies(sorted(restored.damaged), man.generation)
        for name, gen in sorted(older.items()):
            lines.append(
                f"an older version of {name} is intact in checkpoint {gen}: "
                f"'%checkpoint restore {gen} {name}' brings it back."
            )
    if report.reasons:
        lines.append(
            f"the newest checkpoint could not be used ({'; '.join(report.reasons)}); "
            f"restored the one before it (checkpoint {man.generation})."
        )
