"""DurableKernel: IPython's kernel plus a checkpoint after every cell.

Save path: ``post_run_cell`` marks a checkpoint due; once the cell's reply is
sent, :meth:`DurableKernel.dispatch_shell` builds a ``SaveRequest`` and hands
it to the ``Saver`` (``saver.py``), which runs it in a forked child or in the
foreground; the ``CheckpointOutcome`` comes back to
:meth:`DurableKernel._on_outcome`.  Restore path: ``DurableKernelApp.init_code``
-> :meth:`DurableKernel.start_durability` -> ``restore.restore`` -> ``user_ns``.
Everything the user sees goes through ``Notices``: one line per fact on stderr
of their next cell (and in the banner at start); details go to the kernel log.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from durable_kernel.checkpoints import CheckpointError, NotebookStore, Store, inventory, maintenance, printable
from durable_kernel.checkpoints.liveness import writer_alive
from durable_kernel.checkpoints.location import open_store
from durable_kernel.checkpoints.tracking import WrittenPages
from ipykernel.ipkernel import IPythonKernel
from traitlets import Bool, Enum, Float, Integer, List, Unicode

from . import __version__, humanize, identity, recompute, remote
from .adoption import Adoption
from .notices import PREFIX, Notices
from .outcome import CheckpointOutcome
from .recompute import CellHistory, record_cell
from .restore import restore, wait_for_previous_kernel
from .saver import Saver, SaveRequest

_IPYTHON_NAMES = frozenset({"In", "Out", "_", "__", "___", "_ih", "_oh", "_dh", "get_ipython", "exit", "quit"})
_IPYTHON_PATTERN = re.compile(r"^_i?\d+$|^_i{1,3}$")
COMM_TARGET = "durable_kernel"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_ipython_name(name: str) -> bool:
    """IPython's own bookkeeping names and dunders: never saved."""
    return (
        name in _IPYTHON_NAMES or (name.startswith("__") and name.endswith("__")) or bool(_IPYTHON_PATTERN.match(name))
    )


class DurableKernel(IPythonKernel):
    """An IPython kernel whose user namespace survives restarts and crashes."""

    implementation = "durable_kernel"
    implementation_version = __version__

    checkpoint_dir = Unicode(
        "",
        config=True,
        help="Folder holding the checkpoints (default: durable_kernel/ under Jupyter's data dir), or a bucket "
        "URL (s3://bucket/prefix, gs://..., az://...): checkpoints are then committed to a local cache "
        "(cache_dir) and uploaded in the background, and a kernel on another machine restores from there. "
        "The DURABLE_KERNEL_DIR environment variable, when set, wins over this.",
    )
    cache_dir = Unicode(
        "",
        config=True,
        help="With a bucket as checkpoint_dir: the local folder each checkpoint is committed to before it is "
        "uploaded (default: durable_kernel_cache/<bucket> under Jupyter's data dir).",
    )
    download_timeout = Float(
        300.0,
        config=True,
        help="With a bucket as checkpoint_dir: seconds a starting kernel waits for the bucket's newest "
        "checkpoint to download before it restores from the local cache instead.",
    )
    key_file = Unicode(
        "",
        config=True,
        help="File holding the key that signs checkpoints (default: durable_kernel_secret in Jupyter's data dir); "
        "created, private, if it does not exist. The DURABLE_KERNEL_KEY environment variable, when set, holds the "
        "key itself and wins over this. 'durable-kernel key export' and 'key import' move a key between machines.",
    )
    keep_generations = Integer(
        5,
        config=True,
        help="How many states to keep per notebook: the checkpoints of the newest states are kept, older ones "
        "and their data are deleted. A checkpoint that goes back to a kept state ('%checkpoint undo' or "
        "'restore') does not count. Checkpoints this user's key cannot verify are never deleted by this.",
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
    recompute = Enum(
        ["off", "ask", "auto"],
        "ask",
        config=True,
        help="Variables a checkpoint could not save (a database connection, a generator) can be made again by "
        "running again the cells that made them. 'ask': the restore notice names the cells and "
        "'%checkpoint recompute NAME' runs them; 'auto': at start, run again the cells that succeeded before, took "
        "less than recompute_max_seconds and assign nothing but what is missing (listed in the notice); "
        "'off': say nothing about it.",
    )
    recompute_max_seconds = Float(
        10.0,
        config=True,
        help="With recompute = 'auto': a cell that took longer than this when it ran is not run again at start "
        "(it is named in the notice instead).",
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
    map_arrays = Bool(
        False,
        config=True,
        help="After a checkpoint, back each large array computed here (numpy buffers over 1 MiB that malloc got "
        "from mmap) by the chunk files it wrote: between cells, byte for byte checked, its memory becomes private "
        "copy-on-write maps of those files, as restored arrays already are. A checkpoint then reads only the "
        "chunks written since (a trivial cell's checkpoint of 4 GiB hashes megabytes instead of 4 GiB), and clean "
        "pages are page cache the system can reclaim. The cost: each chunk is a memory area, which makes every "
        "fork (after each cell) slower, by about 3 ms per GiB and much more once the arrays are written; and a "
        "checkpoint file changed in place changes the array (you are told). Off by default. Linux only.",
    )
    track_writes = Bool(
        True,
        config=True,
        help="Track which pages of large arrays are written between cells (Linux 6.7+: userfaultfd's asynchronous "
        "write-protect and PAGEMAP_SCAN, the kernel's stand-in for soft-dirty bits), so that a checkpoint reads and "
        "hashes only the chunks written since the last one: a trivial cell's checkpoint of 4 GiB of arrays reads "
        "megabytes instead of 4 GiB. The cost: the first write to each 4 KiB page after a checkpoint takes a fault "
        "(about 1 us); an array mostly rewritten between checkpoints is let go for a while. Where the system cannot "
        "track pages, every chunk is hashed, as with this off.",
    )
    coalesce_seconds = Float(
        0.0,
        config=True,
        help="While a background checkpoint is still being written, cells that end less than this many seconds "
        "after it was started share the next one, started when the time is up and the kernel is between cells "
        "(or at once when the kernel shuts down or a cell waits for checkpoints): a run of quick cells (Run All, "
        "a script) then pays for one fork, 10-20 ms with a large namespace, instead of one each. The cost: "
        "a kill -9 during a long cell that follows them loses what they made, and `%checkpoint list` and undo "
        "step over them. 0 (the default): a checkpoint after every cell.",
    )
    checkpoint_timeout = Float(
        300.0,
        config=True,
        help="Seconds a checkpoint may take (background or foreground). Past that it is stopped, the previous "
        "checkpoint is kept, and the variable it was stuck on is skipped until it is reassigned. 0 means no limit.",
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.notices = Notices()
        self._banner_notice = ""
        #: set by post_run_cell, cleared once that cell's checkpoint is started (dispatch_shell, or later: coalesced)
        self._checkpoint_due = False
        #: the cell count and request the due checkpoint is labelled with and reports to
        self._due_for: tuple[int, dict[str, Any] | None] = (0, None)
        self._due_timer: Any = None
        #: when the last background checkpoint was forked (time.monotonic)
        self._last_fork = 0.0
        self._dispatching = False
        self._reported_skips: dict[str, str] = {}
        self._last_error = ""
        self._last_cell = ""
        self._restored_names: dict[str, Any] = {}
        self.last_outcome: CheckpointOutcome | None = None
        # name -> (id of the value, reason): values whose saving hung, crashed or ran out of
        # memory are not tried again until the name is rebound.
        self._skip_until_rebound: dict[str, tuple[int, str]] = {}
        # name -> id of the value: what %checkpoint clear forgot (not saved until rebound)
        self._forgotten: dict[str, int] = {}
        self._checkpoint_seq = 0
        #: the cells run (restored ones first): what made each variable, and how to make it again
        self.history = CellHistory()
        #: (name, type, reason) of what the restored checkpoint could not save
        self._unsaved_at_restore: list[tuple[str, str, str]] = []
        #: checkpoint request seq -> the cell request it was taken after (where its news goes)
        self._request_parents: dict[int, dict[str, Any]] = {}
        self._cell_started = 0.0
        self._writer: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "id": uuid.uuid4().hex,
            "kernel": Path(getattr(self.parent, "connection_file", "") or "").stem,
        }
        self.store: Store | None = None
        self.identity = ""
        self.notebook: NotebookStore | None = None
        self._notebook_excludes: list[str] = []
        # False until the notebook is named: VS Code names it with a setup execute after start.
        self._identity_final = True
        self._vscode_name: str | None = None
        self._saver: Saver | None = None
        #: the process that uploads checkpoints, with a bucket as the store
        self.uploads: remote.Uploads | None = None
        #: backs arrays by the chunk files checkpoints wrote (``map_arrays``)
        self.adoption: Adoption | None = None
        #: which pages of large arrays were written since the last checkpoint (``track_writes``)
        self.written_pages: WrittenPages | None = None
        #: checkpoint children save the large buffers first and let go of them before pickling
        #: (``checkpoints/buffers_first.py``); off for good once that made one fail
        self.buffers_first = True
        #: a checkpoint failed for a reason that taking it again fixes
        self._take_again = False
        #: why checkpoints are off for this kernel ("" while they work)
        self.off_reason = ""
        self._key_warnings: list[str] = []
        #: what this start restored, for frontends (kernel_info's ``durable_kernel``, the comm)
        self.start_info: dict[str, Any] = {"state": "starting", "lines": [], "warning": False}
        self._frontend_told = False

    # --- start-up and restore path ------------------------------------------

    def start_durability(self) -> None:
        """Hook the shell and restore the last checkpoint; called before any cell runs.

        Never stops the kernel from starting: if the store or key cannot be
        used, it starts without checkpoints and says why and what to do.
        """
        from .magics import CheckpointMagics

        self._log_to_kernel_log()
        self.shell.register_magics(CheckpointMagics(self.shell, kernel=self))
        self.shell.events.register("pre_run_cell", self._pre_run_cell)
        self.shell.events.register("post_run_cell", self._post_run_cell)
        self.comm_manager.register_target(COMM_TARGET, self._frontend_comm)
        try:
            self.store = open_store(
                configured=self.checkpoint_dir or None,
                warnings=self._key_warnings,
                cache_dir=self.cache_dir or None,
                key_file=self.key_file or None,
            )
            self.notices.add(*self._key_warnings)
        except Exception as exc:
            self.log.exception("checkpoints are off")
            self.enabled = False
            self.off_reason = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            self._set_notice([f"checkpoints are off for this kernel: {self.off_reason}."], state="off")
            return
        explicit = identity.from_environment()
        self._identity_final = explicit is not None
        self._use_identity(explicit or identity.working_folder())
        if self.store.remote:
            self.uploads = remote.Uploads(self.store, self.keep_generations, self.notices.once)
        self._saver = Saver(
            self._on_outcome,
            self.notices,
            background=self.background,
            timeout=self.checkpoint_timeout or None,
            fork_margin=self.fork_memory_margin,
        )
        if self.map_arrays and self.background:
            self.adoption = Adoption(self._run_on_main_thread)
        if self.track_writes and self._saver.forks:
            self.written_pages = WrittenPages.open()
        if self.restore == "auto":
            self._restore()
        else:
            self._set_notice(["restore is off; variables are saved after every cell."], state="restore-off")

    def _log_to_kernel_log(self) -> None:
        """Our modules' log records go where the kernel's own do (its log), never to the user's cell:
        with no handler, Python prints warnings on sys.stderr, which in a kernel is the running cell."""
        ours = logging.getLogger("durable_kernel")
        if ours.handlers:
            return
        for handler in getattr(self.log, "handlers", []) or [logging.NullHandler()]:
            ours.addHandler(handler)
        ours.propagate = False
        ours.setLevel(logging.INFO)

    def _use_identity(self, name: str) -> None:
        assert self.store is not None
        self.identity = name
        self.notebook = self.store.notebook(name)
        excludes = self.notebook.read_settings().get("exclude", [])
        self._notebook_excludes = [p for p in excludes if isinstance(p, str)]

    @property
    def writer_id(self) -> str:
        """This kernel process's id in the checkpoints it writes (``writer.id``, ``made_by``)."""
        return self._writer["id"]

    @property
    def shown_identity(self) -> str:
        """The identity as it can be printed (escape codes, newlines, undecodable bytes escaped)."""
        return printable(self.identity, 300)

    def _restore(self) -> None:
        assert self.store is not None and self.notebook is not None
        fetched: list[str] = []
        reached = True
        if self.uploads is not None:
            fetched, reached = remote.download(self.store, self.notebook, self.download_timeout)
            self.uploads.request(self.notebook)  # resumes an upload a killed kernel left unfinished
        try:
            report = restore(
                self.store,
                self.notebook,
                kernel_id=self._writer["kernel"],
                follow_renames=self._identity_final,
                verify=self.verify_on_restore,
                wait=self.restore_wait,
            )
        except CheckpointError as exc:
            self.log.warning("restore refused: %s", exc)
            self._set_notice([f"did not restore: {exc}"], state="failed")
            return
        except Exception:
            self.log.exception("restore failed")
            self._set_notice(
                ["restoring failed unexpectedly (details in the kernel log); starting with an empty namespace."],
                state="failed",
            )
            return
        if not reached:
            fetched[-1] += (
                "; restored from this machine's cache instead"
                if report.restored is not None
                else "; nothing in this machine's cache either, so the namespace starts empty"
            ) + (
                ". If another machine saved newer state there, restart once the bucket can be read: this "
                "kernel's next checkpoint becomes the newest one there."
            )
        report.lines[:0] = fetched
        if report.restored is not None:
            # The cell count is left alone: a new kernel counts from In [1], as every client
            # expects (jupyter console's first prompt, a notebook's Restart and Clear Outputs,
            # nbclient); the checkpoints' In [n] of earlier kernels are shown as theirs.
            values = {**report.restored.values, **report.placeholders}
            self.shell.user_ns.update(values)
            self._restored_names = values
            self.history.restore(report.restored.manifest.data.get("cells"))
            self._unsaved_at_restore = [
                (s.get("name", ""), s.get("type", "?"), s.get("reason", "")) for s in report.restored.manifest.skipped
            ]
            # Told at restore: a checkpoint that still cannot save them is no news.
            self._reported_skips = {n: f"{t}: {r}" for n, t, r in self._unsaved_at_restore}
            report.lines += self._recompute_at_start()
        for line in report.lines:
            self.log.info(line)
        self._set_notice(report.lines, banner=report.banner_only, state="empty")
        if report.restored is not None:
            man = report.restored.manifest
            self.start_info.update(
                state="restored",
                checkpoint=man.generation,
                created=man.created,
                execution_count=man.execution_count,
                names=sorted(self._restored_names),
                warning=bool(
                    self._unsaved_at_restore or report.placeholders or report.reasons or report.restored.not_restored
                ),
            )

    def missing_unsaved(self) -> list[str]:
        """Variables the restored checkpoint could not save that are still missing."""
        return [name for name, _, _ in self._unsaved_at_restore if name not in self.shell.user_ns]

    def _recompute_at_start(self) -> list[str]:
        """How to make again what could not be saved; with recompute='auto', make what is safe to."""
        missing = self.missing_unsaved()
        if self.recompute == "off" or not missing:
            return []
        lines = []
        try:
            if self.recompute == "auto":
                wanted = recompute.plan(
                    self.history, missing, [n for n in self.shell.user_ns if n not in missing], missing
                )
                unsafe = {
                    r.execution_count: why
                    for r in wanted.cells
                    if (why := recompute.safe_to_run_unasked(r, set(missing), self.recompute_max_seconds))
                }
                if wanted.cells and not unsafe:
                    ran, error = recompute.run(self.shell, wanted.cells, set(missing))
                    made = [n for n in missing if n in self.shell.user_ns]
                    if ran:
                        lines.append(
                            f"made {humanize.names(made) or 'nothing'} again by running "
                            + "; ".join(recompute.first_line(r) for r in ran)
                        )
                    if error:
                        lines.append(f"running it again stopped: {error}")
                for record in wanted.cells:
                    if record.execution_count in unsafe:
                        lines.append(
                            f"{recompute.first_line(record).split(':', 1)[0]} was not run again at start: "
                            + unsafe[record.execution_count]
                        )
            types = {name: tname for name, tname, _ in self._unsaved_at_restore}
            still = [(n, types.get(n, "?")) for n in self.missing_unsaved()]
            lines += recompute.advice(still, self.history, [n for n in self.shell.user_ns if n not in dict(still)])
        except Exception:  # making things again is a help, never a reason to fail the start
            self.log.exception("recompute at start failed")
        return lines

    def _set_notice(self, lines: list[str], banner: str = "", state: str = "") -> None:
        """What the banner says at start, and the first cell too (``banner``: news for the banner only)."""
        self.notices.add(*lines)
        self._banner_notice = "\n".join(PREFIX + line for line in (lines or ([banner] if banner else [])))
        self.start_info = {
            "state": state,
            "lines": [line if line.startswith(PREFIX) else PREFIX + line for line in lines],  # as Notices.add
            "banner": self._banner_notice,
            "warning": state in ("failed", "off"),
        }

    @property
    def kernel_info(self) -> dict[str, Any]:  # type: ignore[override]
        """kernel_info_reply's content, plus ``durable_kernel``: the start notice, machine-readable."""
        return {**super().kernel_info, "durable_kernel": self.frontend_status()}

    def frontend_status(self) -> dict[str, Any]:
        """What a frontend shows of this kernel: how its start went, whether checkpoints are on."""
        return {
            "version": __version__,
            "comm_target": COMM_TARGET,
            "start": self.start_info,
            "enabled": bool(self.enabled and self.notebook is not None),
            "off_reason": self.off_reason or ("" if self.enabled else "paused (%checkpoint off)"),
            "identity": self.identity,
        }

    def _frontend_comm(self, comm: Any, msg: dict[str, Any]) -> None:
        """A frontend extension (JupyterLab's) opened the ``durable_kernel`` comm: it shows the start
        notice itself, so the first cell's stderr copy is dropped; it is answered with
        :meth:`frontend_status` (``first``: whether this start was told to a frontend before), and
        again on each message it sends."""
        data = (msg.get("content") or {}).get("data") or {}
        if data.get("shows_notices"):
            self.notices.discard(*self.start_info.get("lines", []))
        first, self._frontend_told = not self._frontend_told, True
        comm.send({**self.frontend_status(), "first": first})
        comm.on_msg(lambda _msg: comm.send({**self.frontend_status(), "first": False}))

    @property
    def banner(self) -> str:  # type: ignore[override]
        base = super().banner or ""
        return f"{base}\n{self._banner_notice}\n" if self._banner_notice else base

    def _learn_vscode_name(self) -> None:
        """VS Code names the notebook in ``__vsc_ipynb_file__``: right after start (the working
        folder's provisional state gives way to the notebook's own) and again after a rename."""
        name = identity.from_vscode(self.shell.user_ns)
        if not name or name == self._vscode_name or self.notebook is None:
            return
        if not self._identity_final:
            if name != self.identity:
                self._switch_identity(name)
            self._identity_final = True
        elif self._vscode_name is not None and name != self.identity:
            self._renamed(name)
        self._vscode_name = name

    def _switch_identity(self, name: str) -> None:
        """The notebook was named: drop the provisional state, load its own."""
        ns = self.shell.user_ns
        for var, value in self._restored_names.items():
            if ns.get(var) is value:
                del ns[var]
        self._restored_names = {}
        self.notices.take()  # news of the provisional state is moot
        self.notices.add(*self._key_warnings)
        self._identity_final = True
        self._use_identity(name)
        if self.restore == "auto":
            self._restore()

    def _renamed(self, name: str) -> None:
        """The running notebook got a new name: its state follows it."""
        assert self.store is not None and self.notebook is not None
        old = self.identity
        self.wait_for_checkpoint(self.restore_wait)
        try:
            if self.notebook.checkpoint_ids():
                maintenance.move(self.store, self.notebook, name)
        except (CheckpointError, OSError) as exc:
            self.log.exception("moving the state of a renamed notebook failed")
            self.notices.add(
                f"this notebook was renamed but its saved state could not be moved ({exc}); "
                f"'%checkpoint adopt {old}' tries again."
            )
        else:
            self.notices.add(f"this notebook was renamed from {printable(old, 300)}; its saved state moved with it.")
        self._use_identity(name)

    def adopt(self, old: str) -> maintenance.Moved:
        """Bring the state saved for notebook ``old`` to this notebook (it was moved or renamed).

        The adopted checkpoints become this notebook's newest (the current
        state is saved first, so '%checkpoint undo' goes back to it).
        """
        assert self.store is not None and self.notebook is not None
        info = inventory.find(self.store, old)
        source = inventory.notebook_at(self.store, info.folder, info.identity)
        if source.dir == self.notebook.dir:
            raise CheckpointError(f"{printable(old)} is this notebook")
        self.checkpoint_now()
        wait_for_previous_kernel(source, self.restore_wait)
        return maintenance.move(self.store, source, self.identity)

    # --- per-cell hooks ---------------------------------------------------------

    def _pre_run_cell(self, info: Any) -> None:
        if not getattr(info, "store_history", True):
            return  # setup code from a client, not the user's cell
        self._learn_vscode_name()
        self._identity_final = True  # no name came: the working folder it is
        self._last_cell = self._label(getattr(info, "raw_cell", "") or "")
        self._cell_started = time.monotonic()
        self.notices.show()

    def _label(self, cell: str) -> str:
        """The cell's first line, as a checkpoint records it; hidden if the cell names an excluded variable
        (a secret assigned there must not reach the store through the label)."""
        if self._names_excluded(cell):
            return "(cell text not saved: it names an excluded variable)"
        return cell.strip().split("\n", 1)[0][:200]

    def _names_excluded(self, cell: str) -> bool:
        """Does the cell's text name an excluded variable (then none of it is stored)?"""
        patterns = self.excluded_patterns()
        return bool(patterns) and any(
            fnmatch.fnmatchcase(word, p) for word in set(_IDENTIFIER.findall(cell)) for p in patterns
        )

    def _post_run_cell(self, result: Any) -> None:
        if not self._identity_final:
            self._learn_vscode_name()
            return  # a client's set-up before the first user cell: nothing the user did yet
        self._learn_vscode_name()
        if not self.enabled or self.notebook is None or self._saver is None:
            return
        info = getattr(result, "info", None)
        if getattr(info, "store_history", True):
            self._record_cell(result, getattr(info, "raw_cell", "") or "")
        if self._saver.forks:
            # Fork once the reply and idle status are on their way (dispatch_shell):
            # copying a large process's page tables then costs the user nothing.
            self._checkpoint_due = True
            self._due_for = (self._cell_number(), self._parent_message())
        else:
            self._checkpoint(self._cell_number())  # part of the cell: it shows busy meanwhile
        if getattr(getattr(result, "info", None), "store_history", True):
            self.notices.show()  # a user's cell, not a client's quiet request

    async def dispatch_shell(self, msg: Any, /, *args: Any, **kwargs: Any) -> None:
        """Handle a shell message, then start the checkpoint its cell asked for."""
        # Passed on as given: ipykernel 6 passes only msg, 7.0-7.3 add subshell_id, 7.4 concurrent
        # (and 7.4 needs Python 3.11, so Python 3.10 always gets an older one).
        if self.adoption is not None:
            self.adoption.note_activity()
        self._dispatching = True
        try:
            await super().dispatch_shell(msg, *args, **kwargs)
        finally:
            self._dispatching = False
        if self._checkpoint_due:
            wait = self._coalesce_wait()
            if wait > 0:
                self._start_due_later(wait)
                return
            self._let_iopub_send()
            self._start_due()

    def _coalesce_wait(self) -> float:
        """Seconds to hold the due checkpoint back, so that one fork serves a run of quick cells (0: none).

        Only with ``coalesce_seconds`` set, and while the last one is still being written (the new one
        would wait for it anyway).  A long cell starting meanwhile holds it back until it ends."""
        assert self._saver is not None
        left = self._last_fork + self.coalesce_seconds - time.monotonic()
        return left if left > 0 and self._saver.running else 0.0

    def _start_due_later(self, wait: float) -> None:
        if self._due_timer is None:
            self._due_timer = self.io_loop.call_later(wait, self._start_due_now)

    def _start_due_now(self) -> None:
        self._due_timer = None
        if self._checkpoint_due and not self._dispatching:  # else the request being handled starts it as it ends
            self._start_due()

    def _start_due(self) -> None:
        """Start the checkpoint the last cell asked for (main thread, between requests)."""
        if self._due_timer is not None:
            self.io_loop.remove_timeout(self._due_timer)
            self._due_timer = None
        count, parent = self._due_for
        try:
            self._checkpoint(count, parent=parent)
        finally:
            # Only now: a shutdown waits on this flag, then on the child.
            self._checkpoint_due = False

    def _let_iopub_send(self) -> None:
        # The reply is sent, but the idle status waits in the IOPub thread's queue: a fork
        # holds the GIL (and the memory map) while it copies page tables, so forking now
        # would hold back the message the client is waiting for by the fork's duration.
        thread = getattr(self.iopub_socket, "io_thread", None)
        if thread is None or not hasattr(thread, "schedule"):
            return
        sent = threading.Event()
        thread.schedule(sent.set)  # runs after the messages queued before it
        sent.wait(0.05)

    def _record_cell(self, result: Any, raw_cell: str) -> None:
        """Remember the cell that just ran (its names, for recompute); never fails the cell."""
        try:
            count = result.execution_count if result.execution_count is not None else self._cell_number()
            record = record_cell(
                count,
                raw_cell,
                ok=bool(result.success),
                seconds=time.monotonic() - self._cell_started,
                transform=self.shell.transform_cell,
                private=self._names_excluded(raw_cell),
            )
            self.history.add(record, self._parent_message())
        except Exception:
            self.log.exception("could not record the cell")

    def _parent_message(self) -> dict[str, Any] | None:
        """The request being handled (ipykernel 6.0+), to send late news to its cell."""
        try:
            parent = self.get_parent("shell")
        except Exception:  # noqa: BLE001  # older ipykernel, or no request
            return None
        return parent if isinstance(parent, dict) and parent.get("header") else None

    def running_silently(self) -> bool:
        """Is the request being handled a silent execute (a client's quiet request, such as the Jupyter
        Server API's)?  IPython runs no cell hooks for one, so no checkpoint follows it."""
        parent = self._parent_message()
        content = parent.get("content") if parent is not None else None
        return isinstance(content, dict) and bool(content.get("silent"))

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
        self._unsaved_at_restore = []
        self.history = CellHistory()

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

    def checkpoint_now(self, timeout: float | None = None, cell: str | None = None) -> CheckpointOutcome:
        """Checkpoint the namespace as it is and wait until committed; returns the outcome.
        ``cell`` labels it (default: the first line of the last cell run)."""
        if self._saver is None:
            return CheckpointOutcome.failed("checkpoints are off for this kernel")
        # Let the previous cell's checkpoint land first, under its own label (a newer
        # request would supersede it); if this cell changed nothing since, it is refreshed.
        self._wait_for_saves(timeout)
        self._checkpoint(self._cell_number(), cell)
        if not self._wait_for_saves(timeout):
            return CheckpointOutcome.failed("timed out waiting for the checkpoint to be written")
        return self.last_outcome or CheckpointOutcome.failed("no checkpoint was taken")

    def _checkpoint_again(self) -> bool:
        """Take the checkpoint that failed for a reason taking it again fixes, if one did; True if started."""
        if not self._take_again or self._saver is None or self.notebook is None:
            return False
        self._take_again = False
        self._checkpoint(self._cell_number())
        return True

    def _wait_for_saves(self, timeout: float | None) -> bool:
        """Wait until every checkpoint in flight is committed, one taken again included. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._due_timer is not None and threading.current_thread() is threading.main_thread():
            self._start_due()  # held back (coalesced): whoever waits for checkpoints waits for that one too
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if self._saver is None or not self._saver.wait(left):
                return self._saver is None
            if not self._checkpoint_again():
                return True

    def _cell_number(self) -> int:
        """In [n] of the cell running now, else of the last cell run.

        IPython 9.8+ counts a cell before running it, older IPython (all that Python 3.10
        gets) after it, so ``shell.execution_count`` during a cell is n + 1 or n; the
        running cell's ExecutionResult holds n in both.
        """
        running = getattr(self.shell.displayhook, "exec_result", None)
        if running is not None and running.execution_count is not None and running.info.store_history:
            return running.execution_count
        return max(self.shell.execution_count - 1, 0)

    def _checkpoint(self, execution_count: int, cell: str | None = None, parent: Any = False) -> None:
        """Start (or take, in the foreground) a checkpoint of the namespace as it is now.

        Never raises and never fails the cell: our own bug or an OS refusal
        (fork) is told once.  Its news shows at the next cell.  ``parent``: the request whose
        cell it follows (default: the one being handled).
        """
        assert self._saver is not None and self.notebook is not None
        ns = self.shell.user_ns
        self._checkpoint_seq += 1
        request = SaveRequest(
            notebook=self.notebook,
            namespace=ns,
            names=self.names_to_save(),
            execution_count=execution_count,
            cell=self._last_cell if cell is None else cell,
            writer={**self._writer, "seq": self._checkpoint_seq},
            keep=self.keep_generations,
            max_variable_bytes=self.max_variable_bytes,
            skip={name: reason for name, (oid, reason) in self._skip_until_rebound.items() if id(ns.get(name)) == oid},
            cells=self.history.to_json(),
            missing=[u for u in self._unsaved_at_restore if u[0] not in ns],
            adopt=self.adoption is not None,
        )
        if parent is False:
            parent = self._parent_message()
        if parent is not None:
            self._request_parents[self._checkpoint_seq] = parent
            for old in [seq for seq in self._request_parents if seq < self._checkpoint_seq - 8]:
                del self._request_parents[old]
        send_scan = None
        try:
            hold = self.notebook.hold_saving()
            keep = [hold] if hold is not None else []
            if self.written_pages is not None:
                received, send_scan = os.pipe()
                request.tracking = (self.written_pages, self.written_pages.next_scan, received, send_scan)
                request.buffers_first = self.buffers_first
                keep.append(received)
            self._saver.save(request, keep_fds=keep)
            self._last_fork = time.monotonic()
        except Exception as exc:
            self.log.exception("checkpoint failed")
            self._note_failure(f"{type(exc).__name__}: {exc}")
        finally:
            tracker = self.written_pages
            if send_scan is not None and tracker is not None:
                # Right after the fork: what was written since the last scan (up to now) goes to the child.
                try:
                    tracker.scan(send_scan)
                except Exception:
                    self.log.exception("written-page tracking failed; checkpoints hash every chunk from now on")
                    self.written_pages = None
                    tracker.close()

    def _run_on_main_thread(self, fn: Callable[[], None], delay: float) -> None:
        """Run ``fn`` on the kernel's main loop, between cells, after ``delay`` seconds (from any thread)."""
        loop = self.io_loop
        loop.add_callback(lambda: loop.call_later(delay, fn))

    def _on_outcome(self, outcome: CheckpointOutcome) -> None:
        """Turn a checkpoint's outcome into what the user is told (at their next cell)."""
        if outcome.superseded:
            return  # this kernel already committed a newer state
        assert self._saver is not None
        if not outcome.ok and self.buffers_first and (outcome.released_too_early or outcome.crashed):
            # Something read memory the child had let go of early (an in-band pickle of memory no saved
            # array owns): nothing was saved from it and the previous checkpoint stands.  Take this one
            # again, and every later one, without letting go early.
            self.log.warning("a checkpoint let go of memory too early (%s); taking it again without", outcome.error)
            self.buffers_first = False
            self._take_again = True  # before the child leaves the list: whoever waits for it sees this
            self._run_on_main_thread(self._checkpoint_again, 0)
            return
        self._saver.note_outcome(outcome)
        self.last_outcome = outcome
        ns = self.shell.user_ns
        if outcome.stuck_on in ns:
            self._skip_until_rebound[outcome.stuck_on] = (id(ns[outcome.stuck_on]), outcome.stuck_reason)
            outcome.error += f"; {outcome.stuck_on!r} is skipped until it is reassigned"
        if not outcome.ok:
            self._note_failure(outcome.error)
            return
        other = outcome.other_writer
        if other and writer_alive(other):
            self.notices.once(
                "writer",
                f"another kernel (pid {other.get('pid')} on {other.get('host')}) is also saving this notebook's "
                "state; the newest save wins, so a restart restores whichever kernel saved last.",
            )
        if self._last_error:
            self.notices.add("checkpoints are being saved again.")
            self._last_error = ""
        if self.uploads is not None and self.notebook is not None:
            self.uploads.request(self.notebook)
        if self.adoption is not None and self.notebook is not None:
            self.adoption.offer(outcome.adoptable, self.notebook.blob_path)
        tracker = self.written_pages
        if tracker is not None and outcome.tracked_scan:
            tracker.confirm(outcome.tracked_scan)
            tracker.offer([(a, b) for a, b in outcome.tracked_buffers])
            saver = self._saver
            tracker.restore_huge_pages(lambda: not saver.running)
        for name in outcome.repaired:
            self.notices.once(
                f"repaired {name}", f"the saved copy of {name} was damaged on disk; it has been saved again."
            )
        for name in outcome.backing_changed:
            self.notices.once(
                f"backing {name}",
                f"a checkpoint file holding part of {name} was changed on disk while {name} was backed by it "
                f"(its memory mapped from that file), so {name}'s values in memory changed with it; it is saved "
                f"as it is now: check it, or make it again.",
            )
        self.log.debug(
            "checkpoint %s: %s variables, %s written in %.3f s",
            outcome.checkpoint_id,
            outcome.variables,
            humanize.size(outcome.bytes_written),
            outcome.seconds,
        )
        for name, _, reason in outcome.skipped:
            if reason.startswith("not enough free memory") and name in ns:
                # Trying again after every cell would only bring the container to its limit again.
                self._skip_until_rebound[name] = (id(ns[name]), f"{reason}; it is skipped until it is reassigned")
        skipped = {name: f"{tname}: {reason}" for name, tname, reason in outcome.skipped}
        new = [n for n, r in skipped.items() if self._reported_skips.get(n) != r]
        self._reported_skips = skipped
        self._tell_not_saved([(n, skipped[n]) for n in new], outcome.seq)

    def _tell_not_saved(self, new: list[tuple[str, str]], seq: int) -> None:
        """Say under the cell that assigned each variable that it was not saved (the checkpoint
        finished after that cell: frontends place output by the request it answers)."""
        by_cell: dict[int, list[str]] = {}
        for name, why in new:
            maker = self.history.maker(name)
            count = maker.execution_count if maker is not None and maker.execution_count in self.history.parents else -1
            by_cell.setdefault(count, []).append(f"{name} ({why})")
        for count, items in by_cell.items():
            line = f"{PREFIX}not saved: {humanize.names(items, 10)}"
            parent = self.history.parents.get(count) or self._request_parents.get(seq)
            if parent is None or not self._publish_stderr(line, parent):
                self.notices.add(line)

    def _publish_stderr(self, text: str, parent: dict[str, Any]) -> bool:
        """Send ``text`` as stderr output of the cell whose request is ``parent`` (from any thread)."""
        try:
            self.session.send(
                self.iopub_socket,
                "stream",
                {"name": "stderr", "text": text + "\n"},
                parent=parent,
                ident=self._topic("stream"),
            )
        except Exception:
            self.log.exception("could not send a notice to its cell")
            return False
        return True

    def _note_failure(self, error: str) -> None:
        """One warning per distinct failure, not one per cell."""
        self.log.warning("checkpoint not saved: %s", error)
        if error != self._last_error:
            self._last_error = error
            self.notices.add(f"checkpoint not saved ({error}); the previous checkpoint is kept.")

    def wait_for_checkpoint(self, timeout: float | None = None) -> bool:
        """Block until every checkpoint in flight is committed."""
        return self._wait_for_saves(timeout)

    def wait_for_upload(self, timeout: float = 60.0) -> bool:
        """Block until the newest checkpoint is committed and uploaded to the bucket (True at once
        without a bucket); False after ``timeout`` seconds."""
        from durable_kernel.checkpoints.sync import waiting

        deadline = time.monotonic() + timeout
        if not self.wait_for_checkpoint(timeout) or self.uploads is None or self.notebook is None:
            return self.uploads is None
        while waiting(self.notebook, self.uploads.store.remote or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        return time.monotonic() < deadline

    # --- shutdown ------------------------------------------------------------

    def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        """Leave promptly: the last cell's checkpoint is forked, and finishes on its own if it must."""
        deadline = time.monotonic() + self.shutdown_wait
        if threading.current_thread() is not threading.main_thread():
            # A client may ask to shut down as soon as it has the last reply,
            # a moment before the main thread forks that cell's checkpoint.
            if self._due_timer is not None:
                self.io_loop.add_callback(self._start_due_now)  # held back (coalesced): not any longer
            while self._checkpoint_due and time.monotonic() < deadline:
                time.sleep(0.002)
        if self._saver is not None and not self._wait_for_saves(max(deadline - time.monotonic(), 0.0)):
            self.log.info("exiting with a checkpoint still being written; it finishes on its own")
        if self.uploads is not None:
            self.uploads.close()
        return super().do_shutdown(restart)
