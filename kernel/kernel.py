"""DurableKernel: IPython's kernel plus a checkpoint after every cell.

Save path: ``post_run_cell`` -> :meth:`DurableKernel._checkpoint` -> a forked
child (``background.py``) or the foreground -> ``checkpoints.snapshot`` and
``NotebookStore.commit``.  Restore path: ``DurableKernelApp.init_code`` ->
:meth:`DurableKernel.start_durability` -> ``NotebookStore.load_latest_with_reasons``
-> ``user_ns``.  Everything the user sees is one line per fact on stderr of
their cell (and in the banner); details go to the kernel log.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import socket
import sys
import threading
import time
import uuid
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from traitlets import Bool, Enum, Float, Integer, List, Unicode

from . import __version__, humanize, identity
from .background import BackgroundSaver, fork_supported, memory_for_fork
from durable_kernel.checkpoints import (
    CheckpointError,
    NotebookStore,
    Restored,
    Store,
    load_or_create_key,
    snapshot,
)
from durable_kernel.checkpoints.maintenance import store_root

PREFIX = "durable-kernel: "
_IPYTHON_NAMES = frozenset({"In", "Out", "_", "__", "___", "_ih", "_oh", "_dh", "get_ipython", "exit", "quit"})
_IPYTHON_PATTERN = re.compile(r"^_i?\d+$|^_i{1,3}$")


def is_ipython_name(name: str) -> bool:
    """IPython's own bookkeeping names and dunders: never saved."""
    return (
        name in _IPYTHON_NAMES
        or (name.startswith("__") and name.endswith("__"))
        or bool(_IPYTHON_PATTERN.match(name))
    )


def _still_running(writer: dict[str, Any]) -> bool:
    """Is the kernel that wrote a checkpoint still alive (not a previous session)?"""
    if writer.get("host") != socket.gethostname() or not isinstance(writer.get("pid"), int):
        return True  # another machine sharing the store: assume it is
    try:
        os.kill(writer["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A kernel that has exited but is not reaped yet (its client quit without
    # waiting) still answers kill(0): a zombie is not saving anything.
    try:
        with open(f"/proc/{writer['pid']}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


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
        5, config=True, help="How many checkpoints to keep per notebook; older ones and their data are deleted."
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
        help="Check the digest of every large buffer when restoring (pickles are always checked before loading).",
    )
    shutdown_wait = Float(
        30.0, config=True, help="Seconds to wait at shutdown or restart for a checkpoint still being written."
    )
    fork_memory_margin = Integer(
        256 << 20,
        config=True,
        help="Bytes of memory to keep free beyond the copy-on-write growth a background checkpoint may cause "
        "(about half the kernel's size). With less free memory, checkpoints are saved in the foreground.",
    )
    checkpoint_timeout = Float(
        300.0,
        config=True,
        help="Seconds a background checkpoint may take. Past that it is stopped, the previous checkpoint is kept, "
        "and the variable it was stuck on is skipped until it is reassigned. 0 means no limit.",
    )

    _notice: str = ""
    _banner_notice: str = ""
    _checkpoint_due = False

    # --- start-up and restore path ------------------------------------------

    def start_durability(self) -> None:
        """Hook the shell and restore the last checkpoint; called before any cell runs."""
        self._lock = threading.RLock()
        self._messages: list[str] = []
        self._reported_skips: dict[str, str] = {}
        self._last_error = ""
        self._last_cell = ""
        self._restored_names: dict[str, Any] = {}
        self.last_result: dict[str, Any] = {}
        # name -> (id of the value, reason): values that hung a checkpoint are
        # not tried again until the name is rebound.
        self._stuck: dict[str, tuple[int, str]] = {}
        self._told: set[str] = set()
        self._writer = {"pid": os.getpid(), "host": socket.gethostname(), "id": uuid.uuid4().hex}
        # The environment variable wins over the config file, as documented.
        root = store_root(os.environ.get("DURABLE_KERNEL_DIR") or self.checkpoint_dir or None)
        self.store = Store(root, load_or_create_key())
        explicit = identity.from_environment()
        # Without an explicit identity, VS Code may still name the notebook
        # with a setup execute; until a user cell runs, the working folder is
        # only provisional.
        self._identity_final = explicit is not None
        self._use_identity(explicit or identity.working_folder())
        self._saver = (
            BackgroundSaver(self._queue_result, self.checkpoint_timeout or None)
            if self.background and fork_supported()
            else None
        )
        from .magics import CheckpointMagics

        self.shell.register_magics(CheckpointMagics(self.shell, kernel=self))
        self.shell.events.register("pre_run_cell", self._pre_run_cell)
        self.shell.events.register("post_run_cell", self._post_run_cell)
        if self.restore == "auto":
            self._restore()
        else:
            self._set_notice(f"{PREFIX}restore is off; variables are saved after every cell.", [])

    def _use_identity(self, name: str) -> None:
        self.identity = name
        self.notebook: NotebookStore = self.store.notebook(name)
        excludes = self.notebook.read_settings().get("exclude", [])
        self._notebook_excludes = [p for p in excludes if isinstance(p, str)]

    def _restore(self) -> None:
        try:
            restored, reasons = self.notebook.load_latest_with_reasons(self.verify_on_restore)
        except CheckpointError as exc:
            self.log.warning("restore refused: %s", exc)
            self._set_notice(f"{PREFIX}did not restore: {exc}", [])
            return
        except Exception:
            self.log.exception("restore failed")
            self._set_notice(
                f"{PREFIX}restoring failed unexpectedly (details in the kernel log); starting with an empty namespace.",
                [],
            )
            return
        if restored is not None:
            self.shell.user_ns.update(restored.values)
            self._restored_names = dict(restored.values)
            self.shell.execution_count = restored.manifest.execution_count + 1
        self._set_notice(*self._describe_restore(restored, reasons))

    def _describe_restore(self, restored: Restored | None, reasons: list[str]) -> tuple[str, list[str]]:
        """(banner text, extra lines) telling what came back and what did not."""
        where = f" for {self.identity}"
        lines: list[str] = []
        if restored is None:
            if reasons:
                lines.append(f"{PREFIX}no checkpoint{where} could be loaded; starting with an empty namespace.")
                lines += [f"{PREFIX}  {r}" for r in reasons]
                return "\n".join(lines), lines
            return f"{PREFIX}no saved state{where} yet; variables are saved after every cell.", []
        man = restored.manifest
        names = sorted(restored.values)
        count = f"{len(names)} variable{'s' if len(names) != 1 else ''}"
        lines.append(
            f"{PREFIX}restored {count}{where}, saved {humanize.when(man.created)} as of "
            f"In [{man.execution_count}]" + (f": {humanize.names(names)}" if names else "")
        )
        if restored.not_restored:
            missing = [f"{s.name} ({s.reason})" for s in restored.not_restored]
            lines.append(f"{PREFIX}not restored: {humanize.names(missing, 10)}")
        if reasons:
            lines.append(
                f"{PREFIX}the newest checkpoint could not be used ({'; '.join(reasons)}); "
                f"restored the one before it (checkpoint {man.generation})."
            )
        for line in lines:
            self.log.info(line)
        return "\n".join(lines), lines

    def _set_notice(self, banner: str, cell_lines: list[str]) -> None:
        self._banner_notice = banner
        self._notice = "\n".join(cell_lines)

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

    # --- per-cell hooks ---------------------------------------------------------

    def _pre_run_cell(self, info: Any) -> None:
        if self._saver is not None:
            self._saver.cell_started()
        if not getattr(info, "store_history", True):
            return  # setup code from a client, not the user's cell
        if not self._identity_final:
            vscode = identity.from_vscode(self.shell.user_ns)
            if vscode and vscode != self.identity:
                self._switch_identity(vscode)
            self._identity_final = True
        self._last_cell = (getattr(info, "raw_cell", "") or "").strip().split("\n", 1)[0][:200]
        lines = []
        if self._notice:
            lines.append(self._notice)
            self._notice = ""
        with self._lock:
            lines += self._messages
            self._messages = []
        self._tell(lines)

    def _post_run_cell(self, result: Any) -> None:
        if not self._identity_final:
            vscode = identity.from_vscode(self.shell.user_ns)
            if vscode and vscode != self.identity:
                self._switch_identity(vscode)
                self._identity_final = True
            return  # nothing the user did yet: nothing to save
        if not self.enabled:
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
        """The user's variables: not IPython's own, not hidden start-up names, not excluded."""
        ns = self.shell.user_ns
        hidden = self.shell.user_ns_hidden
        patterns = self.excluded_patterns()
        return [
            name
            for name, value in ns.items()
            if not is_ipython_name(name)
            and not (name in hidden and hidden[name] is value)
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
        settings = self.notebook.read_settings()
        settings["exclude"] = list(patterns)
        self.notebook.write_settings(settings)
        self._notebook_excludes = list(patterns)

    def replace_namespace(self, values: dict[str, Any]) -> None:
        """Make the user's variables exactly ``values`` (excluded names are left alone)."""
        ns = self.shell.user_ns
        for name in self.names_to_save():
            del ns[name]
        ns.update(values)

    def checkpoint_in_flight(self) -> bool:
        """True while a background checkpoint is being written."""
        return self._saver is not None and self._saver.running

    def checkpoint_now(self, timeout: float | None = None) -> dict[str, Any]:
        """Checkpoint the namespace as it is and wait until committed; returns the outcome."""
        if self._saver is None:
            self._checkpoint()
            return self.last_result
        deadline = None if timeout is None else time.monotonic() + timeout
        # Let the checkpoint of the previous cell land first, under its own
        # label; if this cell changed nothing since, it is simply refreshed.
        self._saver.wait(timeout)
        job = functools.partial(
            self._checkpoint_job, cell=self._last_cell, execution_count=self.shell.execution_count
        )
        with self._lock:
            self._saver.request(job, cell_ended=False)
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self._saver.wait(remaining):
            return {"ok": False, "error": "timed out waiting for the checkpoint to be written"}
        return self.last_result

    def _checkpoint_job(self, progress: Any = None, *, cell: str, execution_count: int) -> dict[str, Any]:
        """Snapshot the namespace and commit it (in the child, or in the foreground).

        ``cell`` and ``execution_count`` label the checkpoint; they are bound
        when it is asked for, since a coalesced one runs during a later cell.
        """
        ns = self.shell.user_ns
        skip = {name: reason for name, (oid, reason) in self._stuck.items() if id(ns.get(name)) == oid}
        snap = snapshot(ns, self.names_to_save(), self.max_variable_bytes, skip=skip, progress=progress)
        done = self.notebook.commit(
            snap,
            execution_count=execution_count,
            cell=cell,
            keep=self.keep_generations,
            writer=self._writer,
        )
        return {
            "other_writer": done.other_writer,
            "ok": True,
            "generation": done.manifest.generation,
            "variables": len(snap.variables),
            "size": snap.size,
            "bytes_written": done.bytes_written,
            "seconds": done.seconds,
            "skipped": [[s.name, s.type, s.reason] for s in snap.skipped],
        }

    def _checkpoint(self, tell_now: bool = True) -> None:
        """Save the namespace now: never raises, never fails the cell.

        Warnings go to the current cell's stderr, or with ``tell_now=False``
        (its reply is already sent) to the next cell's.
        """
        background = self._saver is not None and self._room_to_fork()
        job = functools.partial(
            self._checkpoint_job, cell=self._last_cell, execution_count=max(self.shell.execution_count - 1, 0)
        )
        with self._lock:
            try:
                if background:
                    self._saver.request(job)  # type: ignore[union-attr]
                    lines = self._messages
                    self._messages = []
                else:
                    try:
                        result = job()
                    except CheckpointError as exc:
                        result = {"ok": False, "error": str(exc)}
                    self._queue_result(result)
                    lines = self._messages
                    self._messages = []
            except Exception as exc:  # our bug or an OS refusal (fork): tell once, keep the cell
                self.log.exception("checkpoint failed")
                lines = self._note_failure(f"{type(exc).__name__}: {exc}")
            if not tell_now:
                self._messages[:0] = lines
                return
        self._tell(lines)

    def _room_to_fork(self) -> bool:
        """Fork only with memory to spare; else save in the foreground (said once)."""
        room, available, rss = memory_for_fork(self.fork_memory_margin)
        if room:
            self._told.discard("memory")
            return True
        if "memory" not in self._told:
            self._told.add("memory")
            with self._lock:
                self._messages.append(
                    f"{PREFIX}memory is low ({humanize.size(available)} free, the kernel uses "
                    f"{humanize.size(rss)}): saving in the foreground instead of a background process, "
                    "so cells wait for checkpoints."
                )
        # A child may still be running: let it finish before saving here.
        self._saver.wait(self.shutdown_wait)  # type: ignore[union-attr]
        return False

    def _queue_result(self, result: dict[str, Any]) -> None:
        """Turn a checkpoint's outcome into lines for the user's next output."""
        with self._lock:
            self.last_result = result
            stuck = result.get("stuck_on")
            if stuck and stuck in self.shell.user_ns:
                reason = f"saving it took longer than {self.checkpoint_timeout:g} s"
                self._stuck[stuck] = (id(self.shell.user_ns[stuck]), reason)
                result["error"] = f"{result.get('error')}; {stuck!r} is skipped until it is reassigned"
            if not result.get("ok"):
                self._messages += self._note_failure(str(result.get("error", "unknown error")))
                return
            other = result.get("other_writer")
            if other and "writer" not in self._told and _still_running(other):
                self._told.add("writer")
                self._messages.append(
                    f"{PREFIX}another kernel (pid {other.get('pid')} on {other.get('host')}) is also saving this "
                    "notebook's state; the newest save wins, so a restart restores whichever kernel saved last."
                )
            if self._last_error:
                self._messages.append(f"{PREFIX}checkpoints are being saved again.")
                self._last_error = ""
            self.log.debug(
                "checkpoint %s: %s variables, %s written in %.3f s",
                result.get("generation"),
                result.get("variables"),
                humanize.size(result.get("bytes_written", 0)),
                result.get("seconds", 0.0),
            )
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
        """Block until the checkpoint in flight (and any coalesced one) is committed."""
        return True if self._saver is None else self._saver.wait(timeout)

    # --- shutdown ------------------------------------------------------------

    def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        saver = getattr(self, "_saver", None)
        deadline = time.monotonic() + self.shutdown_wait
        if threading.current_thread() is not threading.main_thread():
            # A client may ask to shut down as soon as it has the last reply,
            # a moment before the main thread forks that cell's checkpoint.
            while self._checkpoint_due and time.monotonic() < deadline:
                time.sleep(0.002)
        if saver is not None and not saver.wait(max(deadline - time.monotonic(), 0.0)):
            self.log.warning("shutting down with a checkpoint still being written; the previous one is kept")
        return super().do_shutdown(restart)
