"""DurableKernel: IPython's kernel plus a checkpoint after every cell.

Save path: ``post_run_cell`` marks a checkpoint due; once the cell's reply is
sent, :meth:`DurableKernel.dispatch_shell` calls :meth:`DurableKernel._checkpoint`,
which forks a child (``background.py``) or saves in the foreground; either runs
:meth:`DurableKernel._checkpoint_job` -> ``checkpoints.snapshot`` and
``NotebookStore.commit``; the outcome comes back to :meth:`_on_checkpoint_result`.
Restore path: ``DurableKernelApp.init_code`` -> :meth:`DurableKernel.start_durability`
-> :meth:`_restore` (waits for the previous kernel's last checkpoint, follows a
renamed notebook) -> ``NotebookStore.load_latest_with_reasons`` -> ``user_ns``.
Everything the user sees is one line per fact on stderr of their cell (and in
the banner); details go to the kernel log.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from traitlets import Bool, Enum, Float, Integer, List, Unicode

from . import __version__, humanize, identity
from .background import BackgroundSaver, fork_supported, memory_for_fork
from .memory import available_memory
from durable_kernel.checkpoints import (
    CheckpointError,
    NotebookStore,
    NotRestored,
    Restored,
    Store,
    printable,
    snapshot,
)
from durable_kernel.checkpoints import maintenance
from durable_kernel.checkpoints.location import open_store
from durable_kernel.checkpoints.liveness import writer_alive

PREFIX = "durable-kernel: "
_IPYTHON_NAMES = frozenset({"In", "Out", "_", "__", "___", "_ih", "_oh", "_dh", "get_ipython", "exit", "quit"})
_IPYTHON_PATTERN = re.compile(r"^_i?\d+$|^_i{1,3}$")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING_MODULE = re.compile(r"No module named '([^'.]+)")
#: Free memory a foreground save leaves untouched, so the kernel itself survives it.
_FOREGROUND_RESERVE = 64 << 20


def is_ipython_name(name: str) -> bool:
    """IPython's own bookkeeping names and dunders: never saved."""
    return (
        name in _IPYTHON_NAMES
        or (name.startswith("__") and name.endswith("__"))
        or bool(_IPYTHON_PATTERN.match(name))
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


def _advice(reasons: list[str]) -> str:
    """What to do about variables whose saved data could not be unpickled: ``install pandas and
    restart the kernel to get it back``."""
    modules = sorted({m.group(1) for r in reasons for m in [_MISSING_MODULE.search(r)] if m})
    fix = f"install {' and '.join(modules)}" if modules else "fix the cause"
    return f"{fix} and restart the kernel to get {'it' if len(reasons) == 1 else 'them'} back"


class DurableKernel(IPythonKernel):
    """An IPython kernel whose user namespace survives restarts and crashes."""

    implementation = "durable_kernel"
    implementation_version = __version__

    checkpoint_dir = Unicode(
        "",
        config=True,
        help="Folder holding the checkpoints (default: durable_kernel/ under Jupyter's data dir). "
        "The DURABLE_KERNEL_DIR environment variable, when set, wins over this.",
    )
    keep_generations = Integer(
        5,
        config=True,
        help="How many checkpoints to keep per notebook; older ones and their data are deleted. "
        "Checkpoints this user's key cannot verify are never deleted by this.",
    )
    enabled = Bool(True, config=True, help="Save a checkpoint after every cell.")
    background = Bool(
        True,
        config=True,
        help="Write checkpoints in a forked child process so cells never wait for them "
        "(POSIX only; False saves in the foreground, after each cell).",
    )
    exclude = List(
        Unicode(), config=True, help="Variable names never saved; shell-style patterns such as 'tmp_*' are allowed."
    )
    max_variable_bytes = Integer(
        None,
        allow_none=True,
        config=True,
        help="Skip (with a warning) any variable whose pickled size exceeds this many bytes. Default: no limit.",
    )
    restore = Enum(
        ["auto", "off"], "auto", config=True, help="'auto' restores the last checkpoint at start; 'off' starts empty."
    )
    verify_on_restore = Bool(
        True,
        config=True,
        help="Check the digest of every large buffer when restoring. False checks only buffers whose file changed "
        "since it was saved (pickles are always checked before loading).",
    )
    shutdown_wait = Float(
        2.0,
        config=True,
        help="Seconds a shutdown or restart waits for a checkpoint still being written before the kernel exits. "
        "The checkpoint then finishes on its own, and the next kernel waits for it before restoring; keep this "
        "below the client's own wait (jupyter_client signals the kernel after 2.5 s).",
    )
    restore_wait = Float(
        45.0,
        config=True,
        help="Seconds a starting kernel waits for the previous kernel's last checkpoint to finish before "
        "restoring. Past that it restores the newest finished checkpoint and says so.",
    )
    fork_memory_margin = Integer(
        256 << 20,
        config=True,
        help="Bytes of memory to keep free beyond the copy-on-write growth a background checkpoint may cause "
        "(about half the kernel's size). With less free memory (container limits count), checkpoints are "
        "saved in the foreground, skipping what does not fit.",
    )
    checkpoint_timeout = Float(
        300.0,
        config=True,
        help="Seconds a checkpoint may take (background or foreground). Past that it is stopped, the previous "
        "checkpoint is kept, and the variable it was stuck on is skipped until it is reassigned. 0 means no limit.",
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._lock = threading.RLock()
        self._messages: list[str] = []
        self._notice = ""
        self._banner_notice = ""
        self._checkpoint_due = False
        self._reported_skips: dict[str, str] = {}
        self._last_error = ""
        self._last_cell = ""
        self._restored_names: dict[str, Any] = {}
        self.last_result: dict[str, Any] = {}
        # name -> (id of the value, reason): values that hung or crashed a
        # checkpoint are not tried again until the name is rebound.
        self._stuck: dict[str, tuple[int, str]] = {}
        # name -> id of the value: what %checkpoint clear forgot (not saved until rebound)
        self._forgotten: dict[str, int] = {}
        self._told: set[str] = set()
        self._seq = 0
        self._writer: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "id": uuid.uuid4().hex,
            "kernel": self._kernel_id(),
        }
        self.store: Store | None = None
        self.identity = ""
        self.notebook: NotebookStore | None = None
        self._notebook_excludes: list[str] = []
        self._identity_final = True
        self._vscode_name: str | None = None
        self._saver: BackgroundSaver | None = None
        #: why checkpoints are off for this kernel ("" while they work)
        self.off_reason = ""

    def _kernel_id(self) -> str:
        """The connection file's name: a client keeps it across restarts of one kernel session."""
        path = getattr(self.parent, "connection_file", "") or ""
        return Path(path).stem

    # --- start-up and restore path ------------------------------------------

    def start_durability(self) -> None:
        """Hook the shell and restore the last checkpoint; called before any cell runs.

        Never stops the kernel from starting: if the store or key cannot be
        used, it starts without checkpoints and says why and what to do.
        """
        from .magics import CheckpointMagics

        self.shell.register_magics(CheckpointMagics(self.shell, kernel=self))
        self.shell.events.register("pre_run_cell", self._pre_run_cell)
        self.shell.events.register("post_run_cell", self._post_run_cell)
        try:
            self._open_store()
        except Exception as exc:
            self.log.exception("checkpoints are off")
            self.store = None
            self.enabled = False
            reason = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            self.off_reason = reason
            self._set_notice(f"{PREFIX}checkpoints are off for this kernel: {reason}.", None)
            return
        if self.restore == "auto":
            self._restore()
        else:
            self._set_notice(f"{PREFIX}restore is off; variables are saved after every cell.", None)

    def _open_store(self) -> None:
        warnings: list[str] = []
        self.store = open_store(configured=self.checkpoint_dir or None, warnings=warnings)
        self._messages += [f"{PREFIX}{w}" for w in warnings]
        explicit = identity.from_environment()
        # Without an explicit identity, VS Code may still name the notebook
        # with a setup execute; until a user cell runs, the working folder is
        # only provisional.
        self._identity_final = explicit is not None
        self._use_identity(explicit or identity.working_folder())
        if self.background and fork_supported():
            self._saver = BackgroundSaver(self._on_checkpoint_result, self.checkpoint_timeout or None)

    def _use_identity(self, name: str) -> None:
        assert self.store is not None
        self.identity = name
        self.notebook = self.store.notebook(name)
        excludes = self.notebook.read_settings().get("exclude", [])
        self._notebook_excludes = [p for p in excludes if isinstance(p, str)]

    @property
    def shown_identity(self) -> str:
        """The identity as it can be printed (escape codes, newlines, undecodable bytes escaped)."""
        return printable(self.identity, 300)

    def _restore(self) -> None:
        assert self.notebook is not None
        lines: list[str] = []
        try:
            lines += self._wait_for_previous_kernel(self.notebook)
            lines += self._follow_renamed_notebook()
            restored, reasons = self.notebook.load_latest_with_reasons(self.verify_on_restore)
        except CheckpointError as exc:
            self.log.warning("restore refused: %s", exc)
            self._set_notice(f"{PREFIX}did not restore: {exc}", None)
            return
        except Exception:
            self.log.exception("restore failed")
            self._set_notice(
                f"{PREFIX}restoring failed unexpectedly (details in the kernel log); starting with an empty namespace.",
                None,
            )
            return
        if restored is not None:
            reasons_by_name = {s.name: s.reason for s in restored.not_restored}
            placeholders = {
                name: NotRestored(
                    name, entry.get("type", "?"), reasons_by_name[name],
                    _advice([reasons_by_name[name]]).capitalize() + "; until then its saved data is kept.", entry,
                )
                for name, entry in restored.unloaded.items()
            }
            self.shell.user_ns.update(restored.values)
            self.shell.user_ns.update(placeholders)
            self._restored_names = {**restored.values, **placeholders}
            self.shell.execution_count = restored.manifest.execution_count + 1
        else:
            lines += self._offer_orphans()
        self._set_notice(*self._describe_restore(restored, reasons, lines))

    def _wait_for_previous_kernel(self, notebook: NotebookStore) -> list[str]:
        """Let the previous kernel's last checkpoint finish (it outlives its kernel) before restoring."""
        started = time.monotonic()
        waited = notebook.wait_for_savers(self.restore_wait)
        if waited is None:
            return []
        seconds = humanize.duration(time.monotonic() - started)
        if waited:
            return [f"{PREFIX}waited {seconds} for the previous kernel's last checkpoint to be written."]
        return [
            f"{PREFIX}the previous kernel's last checkpoint was still being written after {seconds}; restored the "
            "newest finished one. When it is done, '%checkpoint list' shows it and '%checkpoint restore ID' loads it."
        ]

    def _follow_renamed_notebook(self) -> list[str]:
        """A restart of this kernel session under a new name (the notebook was renamed while its
        kernel ran): move the state saved under the old name to the new one."""
        assert self.store is not None and self.notebook is not None
        kernel = self._writer["kernel"]
        if not kernel or not self._identity_final:
            return []  # a provisional identity (VS Code has not named the notebook yet) follows nothing
        mine = maintenance.newest_verified(self.notebook)
        if mine is not None and mine.data.get("writer", {}).get("kernel") == kernel:
            return []  # a plain restart: the newest state is already this notebook's
        mine_created = mine.created if mine is not None else 0.0
        for stored in maintenance.newest_checkpoints(self.store):
            if stored.writer.get("kernel") != kernel or stored.folder == self.notebook.dir:
                continue
            if stored.created <= mine_created:
                return []
            old = self.store.notebook_at(stored.folder, stored.identity)
            lines = self._wait_for_previous_kernel(old)
            moved = maintenance.move(self.store, old, self.identity)
            self.log.info("state of %s moved to %s: %s", stored.identity, self.identity, moved)
            return lines + [
                f"{PREFIX}this notebook was renamed from {printable(stored.identity, 300)}; its saved state moved with it."
            ]
        return []

    def _offer_orphans(self) -> list[str]:
        """No state for this notebook: name saved state whose notebook file is gone (moved?)."""
        assert self.store is not None
        try:
            candidates = maintenance.orphans(maintenance.newest_checkpoints(self.store), self.identity)
        except Exception:
            self.log.exception("looking for moved notebooks failed")
            return []
        if not candidates:
            return []
        best = candidates[0]
        others = f" ({len(candidates) - 1} more: durable-kernel list)" if len(candidates) > 1 else ""
        return [
            f"{PREFIX}no saved state for this notebook, but {printable(best.identity, 300)} (saved "
            f"{humanize.ago(best.created)}) no longer exists there. If this notebook was moved from it, "
            f"'%checkpoint adopt {_quote(best.identity)}' brings its state here{others}."
        ]

    def _describe_restore(
        self, restored: Restored | None, reasons: list[str], lines: list[str]
    ) -> tuple[str, list[str]]:
        """(banner text, extra lines) telling what came back and what did not."""
        where = f" for {self.shown_identity}"
        if restored is None:
            if reasons:
                lines.append(f"{PREFIX}no checkpoint{where} could be loaded; starting with an empty namespace.")
                lines += [f"{PREFIX}  {r}" for r in reasons]
            elif not lines:  # the banner says it; a cell needs no news
                return f"{PREFIX}no saved state{where} yet; variables are saved after every cell.", []
            return "\n".join(lines), lines
        man = restored.manifest
        names = sorted(restored.values)
        lines.append(
            f"{PREFIX}restored {humanize.plural(len(names), 'variable')}{where}, saved {humanize.when(man.created)} "
            f"as of In [{man.execution_count}]" + (f": {humanize.names(names)}" if names else "")
        )
        if restored.not_restored:
            missing = [f"{s.name} ({s.reason})" for s in restored.not_restored]
            lines.append(f"{PREFIX}not restored: {humanize.names(missing, 10)}")
        if restored.unloaded:
            reasons_by_name = {s.name: s.reason for s in restored.not_restored}
            kept = sorted(restored.unloaded)
            lines.append(
                f"{PREFIX}{humanize.names(kept)} {'is' if len(kept) == 1 else 'are'} kept as saved: "
                + _advice([reasons_by_name[n] for n in kept])
                + " (assign or del a name to let it go)."
            )
        if restored.damaged:
            assert self.notebook is not None
            older = self.notebook.older_copies(sorted(restored.damaged), man.generation)
            for name, gen in sorted(older.items()):
                lines.append(
                    f"{PREFIX}an older version of {name} is intact in checkpoint {gen}: "
                    f"'%checkpoint restore {gen} {name}' brings it back."
                )
        if reasons:
            lines.append(
                f"{PREFIX}the newest checkpoint could not be used ({'; '.join(reasons)}); "
                f"restored the one before it (checkpoint {man.generation})."
            )
        for line in lines:
            self.log.info(line)
        return "\n".join(lines), lines

    def _set_notice(self, banner: str, cell_lines: list[str] | None) -> None:
        self._banner_notice = banner
        self._notice = banner if cell_lines is None else "\n".join(cell_lines)

    @property
    def banner(self) -> str:  # type: ignore[override]
        base = super().banner or ""
        return f"{base}\n{self._banner_notice}\n" if self._banner_notice else base

    def _switch_identity(self, name: str) -> None:
        """VS Code named the notebook: drop the provisional state, load its own."""
        ns = self.shell.user_ns
        for var, value in self._restored_names.items():
            if ns.get(var) is value:
                del ns[var]
        self._restored_names = {}
        self.shell.execution_count = 1  # the folder's count is not this notebook's
        self._use_identity(name)
        if self.restore == "auto":
            self._restore()

    def _renamed(self, name: str) -> None:
        """The running notebook got a new name (VS Code's rename): its state follows it."""
        assert self.store is not None and self.notebook is not None
        old = self.identity
        self.wait_for_checkpoint(self.restore_wait)
        try:
            if self.notebook.generations():
                maintenance.move(self.store, self.notebook, name)
            self._use_identity(name)
        except (CheckpointError, OSError) as exc:
            self.log.exception("moving the state of a renamed notebook failed")
            self._use_identity(name)
            self._messages.append(
                f"{PREFIX}this notebook was renamed but its saved state could not be moved ({exc}); "
                f"'%checkpoint adopt {_quote(old)}' tries again."
            )
            return
        self._messages.append(
            f"{PREFIX}this notebook was renamed from {printable(old, 300)}; its saved state moved with it."
        )

    def adopt(self, old: str) -> maintenance.Moved:
        """Bring the state saved for notebook ``old`` to this notebook (it was moved or renamed).

        The adopted checkpoints become this notebook's newest; the current
        namespace is replaced by the newest of them (the current state is
        saved first, so '%checkpoint undo' goes back to it).
        """
        assert self.store is not None and self.notebook is not None
        info = maintenance.find(self.store, old)
        source = maintenance.notebook_at(self.store, info.folder, info.identity)
        if source.dir == self.notebook.dir:
            raise CheckpointError(f"{printable(old)} is this notebook")
        self.checkpoint_now()
        self._wait_for_previous_kernel(source)
        moved = maintenance.move(self.store, source, self.identity)
        return moved

    # --- per-cell hooks ---------------------------------------------------------

    def _pre_run_cell(self, info: Any) -> None:
        if not getattr(info, "store_history", True):
            return  # setup code from a client, not the user's cell
        if self.notebook is not None:
            vscode = identity.from_vscode(self.shell.user_ns)
            if not self._identity_final:
                if vscode and vscode != self.identity:
                    self._switch_identity(vscode)
                self._identity_final = True
            elif vscode and self._vscode_name is not None and vscode != self._vscode_name and vscode != self.identity:
                self._renamed(vscode)
            self._vscode_name = vscode
        self._last_cell = self._label(getattr(info, "raw_cell", "") or "")
        lines = []
        if self._notice:
            lines.append(self._notice)
            self._notice = ""
        with self._lock:
            lines += self._messages
            self._messages = []
        self._tell(lines)

    def _label(self, cell: str) -> str:
        """The cell's first line, as a checkpoint records it; hidden if the cell names an excluded variable
        (a secret assigned there must not reach the store through the label)."""
        patterns = self.excluded_patterns()
        if patterns and any(
            fnmatch.fnmatchcase(word, p) for word in set(_IDENTIFIER.findall(cell)) for p in patterns
        ):
            return "(cell text not saved: it names an excluded variable)"
        return cell.strip().split("\n", 1)[0][:200]

    def _post_run_cell(self, result: Any) -> None:
        if not self._identity_final and self.notebook is not None:
            vscode = identity.from_vscode(self.shell.user_ns)
            if vscode and vscode != self.identity:
                self._switch_identity(vscode)
                self._identity_final = True
                self._vscode_name = vscode
            return  # nothing the user did yet: nothing to save
        if not self.enabled or self.notebook is None:
            return
        if self._saver is None:
            self._checkpoint()
            return
        # Fork once the reply and idle status are on their way (dispatch_shell):
        # copying a large process's page tables then costs the user nothing.
        self._checkpoint_due = True
        with self._lock:
            lines, self._messages = self._messages, []
        self._tell(lines)

    async def dispatch_shell(self, msg: Any, /, subshell_id: str | None = None, *, concurrent: bool = False) -> None:
        """Handle a shell message, then start the checkpoint its cell asked for."""
        await super().dispatch_shell(msg, subshell_id=subshell_id, concurrent=concurrent)
        if self._checkpoint_due:
            try:
                self._checkpoint(tell_now=False)
            finally:
                # Only now: a shutdown waits on this flag, then on the child.
                self._checkpoint_due = False

    def _tell(self, lines: list[str]) -> None:
        """Show lines on stderr of the current cell."""
        if lines:
            print("\n".join(lines), file=sys.stderr, flush=True)

    # --- save path -----------------------------------------------------------

    def names_to_save(self) -> list[str]:
        """The user's variables: not IPython's own, not hidden start-up names, not excluded,
        not what '%checkpoint clear' forgot."""
        ns = self.shell.user_ns
        hidden = self.shell.user_ns_hidden
        patterns = self.excluded_patterns()
        forgotten = self._forgotten
        return [
            name
            for name, value in ns.items()
            if not is_ipython_name(name)
            and not (name in hidden and hidden[name] is value)
            and not (name in forgotten and forgotten[name] == id(value))
            and not any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ]

    def excluded_patterns(self) -> list[str]:
        """Names never saved: ``c.DurableKernel.exclude`` plus this notebook's ``%checkpoint exclude``."""
        return list(dict.fromkeys([*self.exclude, *self._notebook_excludes]))

    def notebook_excludes(self) -> list[str]:
        """The patterns excluded with ``%checkpoint exclude`` for this notebook."""
        return list(self._notebook_excludes)

    def set_notebook_excludes(self, patterns: list[str]) -> None:
        """Remember excluded patterns for this notebook, across restarts."""
        assert self.notebook is not None
        settings = self.notebook.read_settings()
        settings["exclude"] = list(patterns)
        self.notebook.write_settings(settings)
        self._notebook_excludes = list(patterns)

    def forget_current_state(self) -> None:
        """After '%checkpoint clear': the variables as they are now are no longer saved
        (so the next start is fresh); a name assigned again is saved as usual."""
        ns = self.shell.user_ns
        self._forgotten = {name: id(ns[name]) for name in self.names_to_save()}

    def replace_namespace(self, values: dict[str, Any]) -> None:
        """Make the user's variables exactly ``values`` (excluded names are left alone)."""
        ns = self.shell.user_ns
        for name in self.names_to_save():
            del ns[name]
        ns.update(values)
        self._forgotten = {}

    def checkpoint_in_flight(self) -> bool:
        """True while a background checkpoint is being written."""
        return self._saver is not None and self._saver.running

    def checkpoint_now(self, timeout: float | None = None) -> dict[str, Any]:
        """Checkpoint the namespace as it is and wait until committed; returns the outcome."""
        if self.notebook is None:
            return {"ok": False, "error": "checkpoints are off for this kernel"}
        if self._saver is None or not self._can_fork():
            self._checkpoint()
            return self.last_result
        with self._lock:
            self._request(self._job(self.shell.execution_count))
        if not self._saver.wait(timeout):
            return {"ok": False, "error": "timed out waiting for the checkpoint to be written"}
        return self.last_result

    def _job(self, execution_count: int) -> Any:
        """The checkpoint of the namespace as it is now, labelled with the cell that made it.

        Bound when it is asked for: the notebook, the label and the sequence
        number (the newest state this kernel took wins, whatever the order
        in which its checkpoints finish).
        """
        self._seq += 1
        notebook, cell, writer = self.notebook, self._last_cell, {**self._writer, "seq": self._seq}
        skip = self._skipped_now()

        def job(progress: Any = None, memory_left: Any = None, stop_on: tuple = ()) -> dict[str, Any]:
            assert notebook is not None
            snap = snapshot(
                self.shell.user_ns, self.names_to_save(), self.max_variable_bytes, skip=skip,
                progress=progress, stop_on=stop_on, memory_left=memory_left,
            )
            done = notebook.commit(
                snap, execution_count=execution_count, cell=cell, keep=self.keep_generations, writer=writer
            )
            return {
                "other_writer": done.other_writer,
                "ok": True,
                "superseded": done.superseded,
                "generation": done.manifest.generation,
                "variables": len(snap.variables),
                "size": snap.size,
                "bytes_written": done.bytes_written,
                "seconds": done.seconds,
                "repaired": done.repaired,
                "skipped": [[s.name, s.type, s.reason] for s in snap.skipped],
            }

        return job

    def _skipped_now(self) -> dict[str, str]:
        ns = self.shell.user_ns
        return {name: reason for name, (oid, reason) in self._stuck.items() if id(ns.get(name)) == oid}

    def _request(self, job: Any) -> None:
        assert self._saver is not None and self.notebook is not None
        hold = self.notebook.hold_saving()
        self._saver.request(job, keep_fds=[hold] if hold is not None else [])

    def _checkpoint(self, tell_now: bool = True) -> None:
        """Save the namespace now: never raises, never fails the cell.

        Warnings go to the current cell's stderr, or with ``tell_now=False``
        (its reply is already sent) to the next cell's.
        """
        if self.notebook is None:
            return
        job = self._job(max(self.shell.execution_count - 1, 0))
        with self._lock:
            try:
                if self._saver is not None and self._can_fork():
                    self._request(job)
                else:
                    self._save_in_foreground(job)
                lines, self._messages = self._messages, []
            except Exception as exc:  # our bug or an OS refusal (fork): tell once, keep the cell
                self.log.exception("checkpoint failed")
                lines = self._note_failure(f"{type(exc).__name__}: {exc}")
            if not tell_now:
                self._messages[:0] = lines
                return
        self._tell(lines)

    def _save_in_foreground(self, job: Any) -> None:
        """Run a checkpoint job here: bounded in time and in the memory its pickles may take."""
        if self._saver is not None:
            self._saver.wait(self.shutdown_wait)  # a child may still be writing: let it finish first
        current = [""]

        def progress(name: str) -> None:
            current[0] = name

        def memory_left() -> int | None:
            available = available_memory().available
            return None if available is None else available - _FOREGROUND_RESERVE

        try:
            with _time_limit(self.checkpoint_timeout or None):
                result = job(progress, memory_left=memory_left, stop_on=(_TookTooLong,))
        except CheckpointError as exc:
            result = {"ok": False, "error": str(exc)}
        except _TookTooLong:
            result = {
                "ok": False,
                "error": f"the checkpoint took longer than {self.checkpoint_timeout:g} s"
                + (f" while saving {current[0]!r}" if current[0] else ""),
                "stuck_on": current[0],
                "stuck_reason": f"saving it took longer than {self.checkpoint_timeout:g} s",
            }
        except KeyboardInterrupt:
            result = {"ok": False, "error": "the checkpoint was interrupted" + (
                f" while saving {current[0]!r}" if current[0] else ""), "stuck_on": current[0],
                "stuck_reason": "saving it was interrupted"}
        self._on_checkpoint_result(result)

    def _can_fork(self) -> bool:
        """Is there memory to spare for a background checkpoint?  If not, say so once."""
        # Once a child was killed for lack of memory, ask for twice the margin.
        room, available, rss = memory_for_fork(self.fork_memory_margin * (2 if "oom" in self._told else 1))
        if room:
            self._told.discard("memory")
            return True
        if "memory" not in self._told:
            self._told.add("memory")
            with self._lock:
                self._messages.append(
                    f"{PREFIX}memory is low ({available_memory().describe()}; the kernel uses "
                    f"{humanize.size(rss)}): saving in the foreground instead of a background process, so cells "
                    "wait for checkpoints, and variables that do not fit in the memory left are not saved."
                )
        return False

    def _on_checkpoint_result(self, result: dict[str, Any]) -> None:
        """Turn a checkpoint's outcome into lines for the user's next output."""
        with self._lock:
            if result.get("superseded"):
                return  # this kernel already committed a newer state
            self.last_result = result
            stuck = result.get("stuck_on")
            if stuck and stuck in self.shell.user_ns:
                reason = result.get("stuck_reason") or "saving it failed"
                self._stuck[stuck] = (id(self.shell.user_ns[stuck]), reason)
                result["error"] = f"{result.get('error')}; {stuck!r} is skipped until it is reassigned"
            if result.get("out_of_memory"):
                self._told.add("oom")
            if not result.get("ok"):
                self._messages += self._note_failure(str(result.get("error", "unknown error")))
                return
            other = result.get("other_writer")
            if other and "writer" not in self._told and writer_alive(other):
                self._told.add("writer")
                self._messages.append(
                    f"{PREFIX}another kernel (pid {other.get('pid')} on {other.get('host')}) is also saving this "
                    "notebook's state; the newest save wins, so a restart restores whichever kernel saved last."
                )
            if self._last_error:
                self._messages.append(f"{PREFIX}checkpoints are being saved again.")
                self._last_error = ""
            repaired = [n for n in result.get("repaired", []) if f"repaired {n}" not in self._told]
            if repaired:
                self._told.update(f"repaired {n}" for n in repaired)
                self._messages.append(
                    f"{PREFIX}the saved copy of {humanize.names(repaired)} was damaged on disk; it has been saved again."
                )
            self.log.debug(
                "checkpoint %s: %s variables, %s written in %.3f s",
                result.get("generation"),
                result.get("variables"),
                humanize.size(result.get("bytes_written", 0)),
                result.get("seconds", 0.0),
            )
            ns = self.shell.user_ns
            for name, _, reason in result.get("skipped", []):
                if reason.startswith("not enough free memory") and name in ns:
                    # Trying again after every cell would only bring the container to its limit again.
                    self._stuck[name] = (id(ns[name]), f"{reason}; it is skipped until it is reassigned")
            skipped = {name: f"{tname}: {reason}" for name, tname, reason in result.get("skipped", [])}
            new = [f"{n} ({r})" for n, r in skipped.items() if self._reported_skips.get(n) != r]
            self._reported_skips = skipped
            if new:
                self._messages.append(f"{PREFIX}not saved: {humanize.names(new, 10)}")

    def _note_failure(self, error: str) -> list[str]:
        """One warning per distinct failure, not one per cell."""
        self.log.warning("checkpoint not saved: %s", error)
        if error == self._last_error:
            return []
        self._last_error = error
        return [f"{PREFIX}checkpoint not saved ({error}); the previous checkpoint is kept."]

    def wait_for_checkpoint(self, timeout: float | None = None) -> bool:
        """Block until every checkpoint in flight is committed."""
        return True if self._saver is None else self._saver.wait(timeout)

    # --- shutdown ------------------------------------------------------------

    def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        """Leave promptly: the last cell's checkpoint is forked, and finishes on its own if it must."""
        deadline = time.monotonic() + self.shutdown_wait
        if threading.current_thread() is not threading.main_thread():
            # A client may ask to shut down as soon as it has the last reply,
            # a moment before the main thread forks that cell's checkpoint.
            while self._checkpoint_due and time.monotonic() < deadline:
                time.sleep(0.002)
        if self._saver is not None and not self._saver.wait(max(deadline - time.monotonic(), 0.0)):
            self.log.info("exiting with a checkpoint still being written; it finishes on its own")
        return super().do_shutdown(restart)


def _quote(text: str) -> str:
    """``text`` as one shell-like argument for a magic."""
    return text if text and not re.search(r"[\s'\"\\]", text) else "'" + text.replace("'", "'\\''") + "'"
