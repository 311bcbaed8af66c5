"""``%checkpoint``: see and steer this notebook's checkpoints from a cell."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING, Any

from durable_kernel.checkpoints import CheckpointError, Manifest, disk_usage, inventory, maintenance, printable
from durable_kernel.checkpoints.inventory import NoSuchNotebook
from durable_kernel.checkpoints.manifest import diff, fingerprint
from durable_kernel.checkpoints.retention import state_key
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from . import humanize, recompute, remote
from .outcome import CheckpointOutcome

if TYPE_CHECKING:
    from .kernel import DurableKernel

HELP = """\
%checkpoint [COMMAND]: this notebook's checkpoints.

  status            (default) where checkpoints go, the newest one, what was skipped
  save              checkpoint now and wait until it is committed
  list              the kept checkpoints, newest first: the cell that made each state (In [n] as
                    its kernel counted: each kernel counts from 1) and what it changed
  restore ID        replace the namespace with checkpoint ID (the current state is saved first)
  restore ID NAME...  bring back only these variables from checkpoint ID
  undo              go back to the checkpoint before the newest; repeat to go further
                    (cells that ran while a checkpoint was being written share one checkpoint)
  diff [A [B]]      variables added, removed or changed from checkpoint A to B (default: the last two)
  exclude NAME...   never save these names (patterns like tmp_* allowed); remembered for this notebook
  include NAME...   save these names again
  empty             start over with an empty namespace (the current state is saved first:
                    %checkpoint undo brings it back)
  clear             delete this notebook's checkpoints: a restart then starts empty
  adopt OLD         bring here the state saved for notebook OLD (this notebook was moved or renamed)
  recompute [NAME...]  make again variables that could not be saved, by running again the recorded
                    cells that made them (default: every such variable that is missing)
  off | on          pause or resume saving for this kernel
"""


#: In ``%checkpoint list``, above the rows whose cell ran in an earlier kernel (or another one).
EARLIER_KERNEL = "--- an earlier kernel (In [n] as that kernel counted) ---"


def made_by(m: Manifest) -> Any:
    """The id of the kernel whose cell made a checkpoint's state (recorded since 0.3; before, the writer's)."""
    writer = m.data.get("writer")
    return m.data.get("made_by") or (writer.get("id") if isinstance(writer, dict) else None)


def _changes_text(kept: inventory.Kept) -> str:
    """What a checkpoint's cell changed: ``+added ~changed -removed``."""
    if not kept.known:
        return "(the checkpoint before it is not kept)"
    text = " ".join(
        f"{sign}{', '.join(names[:3])}{'…' if len(names) > 3 else ''}"
        for sign, names in (("+", kept.added), ("~", kept.changed), ("-", kept.removed))
        if names
    )
    return text or "(no change)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no SystemExit inside the kernel
        raise UsageError(f"%checkpoint: {message}. Try %checkpoint --help")


def _parser() -> _Parser:
    parser = _Parser(prog="%checkpoint", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("command", nargs="?", default="status")
    parser.add_argument("args", nargs="*")
    return parser


@magics_class
class CheckpointMagics(Magics):
    """The ``%checkpoint`` line magic of a DurableKernel."""

    def __init__(self, shell: Any, kernel: DurableKernel):
        super().__init__(shell)
        self.kernel = kernel
        self._undo_to: Manifest | None = None

    @line_magic
    def checkpoint(self, line: str) -> None:
        """Manage this notebook's checkpoints; ``%checkpoint --help`` lists the commands."""
        try:
            args = _parser().parse_args(shlex.split(line))
        except ValueError as exc:  # unbalanced quotes
            raise UsageError(f"%checkpoint: {exc}") from None
        if args.help or args.command == "help":
            print(HELP)
            return
        handler = getattr(self, f"_do_{args.command}", None)
        if handler is None:
            raise UsageError(f"%checkpoint: unknown command {args.command!r}. Try %checkpoint --help")
        if args.command != "undo":
            self._undo_to = None
        if self.kernel.notebook is None:
            raise UsageError(f"%checkpoint: checkpoints are off for this kernel: {self.kernel.off_reason}")
        try:
            handler(args.args)
        except (CheckpointError, NoSuchNotebook) as exc:
            raise UsageError(f"%checkpoint {args.command}: {exc}") from None

    # --- helpers -------------------------------------------------------------

    @property
    def notebook(self):
        return self.kernel.notebook

    def _manifest(self, text: str) -> Manifest:
        if not (text.isascii() and text.isdigit()):
            raise UsageError(f"%checkpoint: {text!r} is not a checkpoint id; %checkpoint list shows the ids")
        gen = int(text)
        if gen not in self.notebook.checkpoint_ids():
            raise UsageError(f"%checkpoint: no checkpoint {gen} for this notebook; %checkpoint list shows the ids")
        return self.notebook.read_manifest(gen)

    def _manifests(self) -> list[Manifest]:
        """Readable kept manifests, newest first."""
        return inventory.readable(self.notebook)[0]

    def _made_here(self, m: Manifest) -> bool:
        """Was this checkpoint's state made by a cell of this kernel (whose In [n] the prompts show)?"""
        return made_by(m) == self.kernel.writer_id

    def _cell_ref(self, m: Manifest) -> str:
        """``In [n]`` of the cell that made a checkpoint's state; another kernel's count says so."""
        ref = f"In [{m.execution_count}]"
        return ref if self._made_here(m) else f"{ref} of an earlier kernel"

    def _save_and_wait(self) -> CheckpointOutcome:
        return self.kernel.checkpoint_now()

    def _no_args(self, args: list[str], command: str) -> None:
        if args:
            raise UsageError(f"%checkpoint {command} takes no arguments")

    # --- commands --------------------------------------------------------------

    def _do_recompute(self, args: list[str]) -> None:
        k = self.kernel
        ns = self.shell.user_ns
        names = list(args) or k.missing_unsaved()
        if not names:
            print("Nothing to recompute: every variable the last checkpoint could not save is here.")
            return
        available = [n for n in ns if n not in names]
        wanted = recompute.plan(k.history, names, available, k.missing_unsaved())
        for name, why in wanted.missing.items():
            print(f"{name} cannot be recomputed: {why}.")
        if not wanted.cells:
            return
        ran, error = recompute.run(self.shell, wanted.cells, set(names))
        for record in ran:
            print(f"re-ran {recompute.first_line(record)}")
        made = [n for n in names if n in ns and n not in wanted.missing]
        if made:
            print(f"made again: {humanize.names(made)}")
        if error:
            raise UsageError(f"%checkpoint recompute: {error}; the cells after it were not run")

    def _do_status(self, args: list[str]) -> None:
        self._no_args(args, "status")
        k = self.kernel
        lines = [f"Notebook:     {k.shown_identity}", f"Store:        {self.notebook.dir}"]
        manifests = self._manifests()
        if manifests:
            m = manifests[0]
            lines.append(
                f"Newest:       checkpoint {m.generation}, {humanize.when(m.created)}, as of {self._cell_ref(m)}, "
                f"{len(m.variables)} variables; {len(manifests)} kept, "
                f"{humanize.size(disk_usage(self.notebook.dir))} on disk"
            )
        else:
            lines.append("Newest:       none yet")
        saving = "on" if k.enabled else "off (%checkpoint on resumes)"
        if k.checkpoint_in_flight():
            saving += ", a checkpoint is being written now"
        lines.append(f"Saving:       {saving}")
        if k.uploads is not None:
            lines.append(f"Uploads:      {k.uploads.status(self.notebook)}")
        last = k.last_outcome
        if last is not None and last.ok:
            lines.append(
                f"Last save:    {last.variables} variables, {humanize.size(last.bytes_written)} "
                f"written in {humanize.duration(last.seconds)}"
            )
        elif last is not None:
            lines.append(f"Last save:    failed: {last.error}")
        skipped = manifests[0].skipped if manifests else []
        if skipped:
            lines.append("Not saved:")
            lines += [f"  {s.get('name')} ({s.get('type')}): {s.get('reason')}" for s in skipped]
        excluded = k.excluded_patterns()
        if excluded:
            lines.append(f"Excluded:     {', '.join(excluded)}")
        print("\n".join(lines))

    def _do_save(self, args: list[str]) -> None:
        self._no_args(args, "save")
        outcome = self._save_and_wait()
        if not outcome.ok:
            raise UsageError(f"%checkpoint save: not saved: {outcome.error}")
        print(
            f"Saved checkpoint {outcome.checkpoint_id}: {outcome.variables} variables, "
            f"{humanize.size(outcome.bytes_written)} written in {humanize.duration(outcome.seconds)}."
        )

    def _do_list(self, args: list[str]) -> None:
        self._no_args(args, "list")
        manifests = self._manifests()
        if not manifests:
            print("No checkpoints for this notebook yet.")
            return
        rows = [("id", "saved", "In", "cell", "changes", "size")]
        states = [state_key(m.data) for m in manifests]
        for i, kept in enumerate(inventory.history(manifests)):
            m = kept.manifest
            change = _changes_text(kept)
            same = next((manifests[j].generation for j in range(i + 1, len(manifests)) if states[j] == states[i]), None)
            if same is not None:  # undo, restore, or cells that put things back
                change += f" (same as {same})"
            cell = m.data.get("cell", "")
            rows.append(
                (
                    str(m.generation),
                    humanize.ago(m.created),
                    str(m.execution_count),
                    cell if len(cell) <= 40 else cell[:39] + "…",
                    change,
                    humanize.size(kept.size),
                )
            )
        lines = humanize.table(rows)
        # In [n] is each kernel's own count (a kernel counts from 1): rows whose cell ran in
        # another kernel than this one are set apart, so that their In [n] is not read as this one's.
        out, previous = [lines[0]], self.kernel.writer_id
        for line, m in zip(lines[1:], manifests, strict=True):
            if made_by(m) != previous:
                out.append("--- this kernel ---" if self._made_here(m) else EARLIER_KERNEL)
                previous = made_by(m)
            out.append(line)
        print("\n".join(out))

    def _do_restore(self, args: list[str]) -> None:
        if not args:
            raise UsageError("%checkpoint restore takes a checkpoint id (and names); %checkpoint list shows the ids")
        target = self._manifest(args[0])
        names = args[1:]
        if names:
            stored = {v["name"] for v in target.variables}
            unknown = [n for n in names if n not in stored]
            if unknown:
                raise UsageError(f"%checkpoint restore: checkpoint {target.generation} has no {', '.join(unknown)}")
        self._save_and_wait()  # so this restore can itself be undone
        if names:
            self._restore_names(target, names)
        else:
            self._restore(target, f"Restored checkpoint {target.generation}")
        if self.kernel.running_silently():
            # A client's silent request (the Jupyter Server API): no cell end follows to save
            # the restored state, and a restart would bring back the state before it.
            outcome = self.kernel.checkpoint_now(cell=maintenance.RESTORED_CELL.format(target.generation))
            if outcome.ok:
                print(f"Saved as checkpoint {outcome.checkpoint_id}.")
            else:
                print(f"Not saved yet ({outcome.error}): the next cell saves it.")

    def _restore_names(self, target: Manifest, names: list[str]) -> None:
        restored = self.notebook.load(target.generation, self.kernel.verify_on_restore)
        back = {n: restored.values[n] for n in names if n in restored.values}
        self.shell.user_ns.update(back)
        if back:
            print(
                f"Restored {', '.join(back)} from checkpoint {target.generation} "
                f"({self._cell_ref(target)}, {humanize.ago(target.created)})."
            )
        missing = [f"{s.name} ({s.reason})" for s in restored.not_restored if s.name in names]
        if missing:
            print(f"Not restored: {humanize.names(missing, 10)}")

    def _restore(self, target: Manifest, what: str) -> None:
        restored = self.notebook.load(target.generation, self.kernel.verify_on_restore)
        self.kernel.replace_namespace(restored.values)
        print(f"{what} ({self._cell_ref(target)}, {humanize.ago(target.created)}): {len(restored.values)} variables.")
        if restored.not_restored:
            missing = [f"{s.name} ({s.reason})" for s in restored.not_restored]
            print(f"Not restored: {humanize.names(missing, 10)}")

    def _do_undo(self, args: list[str]) -> None:
        self._no_args(args, "undo")
        self._save_and_wait()
        manifests = self._manifests()
        if not manifests:
            raise UsageError("%checkpoint undo: nothing to undo, no checkpoints yet")
        current = manifests[0]
        start = 0
        cursor = self._undo_to
        if cursor is not None and fingerprint(current.data) == fingerprint(cursor.data):
            # Repeated undo: continue from where the last one went.
            start = next((i for i, m in enumerate(manifests) if m.generation == cursor.generation), 0)
        here = fingerprint(manifests[start].data)
        target = next((m for m in manifests[start + 1 :] if fingerprint(m.data) != here), None)
        if target is None:
            raise UsageError(
                f"%checkpoint undo: no older state kept (keep_generations is {self.kernel.keep_generations})"
            )
        self._restore(target, f"Undone: back to checkpoint {target.generation}")
        self._undo_to = target

    def _do_empty(self, args: list[str]) -> None:
        self._no_args(args, "empty")
        before = self._save_and_wait()  # so that %checkpoint undo brings it back
        self.kernel.replace_namespace({})
        kept = f" (checkpoint {before.checkpoint_id} keeps them: %checkpoint undo)" if before.ok else ""
        print(f"Emptied the namespace{kept}.")
        if self.kernel.running_silently():  # no cell end follows to save it (see _do_restore)
            outcome = self.kernel.checkpoint_now(cell="(emptied)")
            if not outcome.ok:
                print(f"Not saved yet ({outcome.error}): the next cell saves it.")

    def _do_diff(self, args: list[str]) -> None:
        if len(args) > 2:
            raise UsageError("%checkpoint diff takes at most two checkpoint ids")
        manifests = self._manifests()
        if len(args) == 2:
            old, new = self._manifest(args[0]), self._manifest(args[1])
        elif len(args) == 1:
            old, new = self._manifest(args[0]), (manifests[0] if manifests else None)
        else:
            if len(manifests) < 2:
                raise UsageError("%checkpoint diff: fewer than two checkpoints to compare")
            old, new = manifests[1], manifests[0]
        assert new is not None
        added, removed, changed = diff(old.data, new.data)
        print(f"From checkpoint {old.generation} to {new.generation}:")
        for label, names in (("added", added), ("removed", removed), ("changed", changed)):
            print(f"  {label:8} {', '.join(names) if names else '-'}")

    def _do_exclude(self, args: list[str]) -> None:
        if not args:
            raise UsageError("%checkpoint exclude needs one or more names or patterns")
        patterns = self.kernel.notebook_excludes()
        patterns += [a for a in args if a not in patterns]
        self.kernel.set_notebook_excludes(patterns)
        print(f"Not saving: {', '.join(patterns)} (remembered for this notebook).")

    def _do_include(self, args: list[str]) -> None:
        if not args:
            raise UsageError("%checkpoint include needs one or more names or patterns")
        patterns = self.kernel.notebook_excludes()
        unknown = [a for a in args if a not in patterns]
        self.kernel.set_notebook_excludes([p for p in patterns if p not in args])
        if unknown:
            configured = [a for a in unknown if a in self.kernel.exclude]
            if configured:
                print(f"{', '.join(configured)}: excluded by c.DurableKernel.exclude in your config; change it there.")
            others = [a for a in unknown if a not in configured]
            if others:
                print(f"{', '.join(others)}: was not excluded.")
        included = [a for a in args if a in patterns]
        if included:
            print(f"Saving again: {', '.join(included)}.")

    def _do_clear(self, args: list[str]) -> None:
        self._no_args(args, "clear")
        self.kernel.wait_for_checkpoint(self.kernel.restore_wait)
        count = len(self.notebook.checkpoint_ids())
        freed = maintenance.clear_notebook(self.notebook)
        if self.kernel.uploads is not None:
            # The bucket too: else the next start would download the state again.
            problem = remote.clear(self.kernel.uploads.store, self.notebook)
            if problem:
                print(f"{problem}; a restart may bring the state back from there.", file=sys.stderr)
        self.kernel.forget_current_state()
        print(
            f"Removed {humanize.plural(count, 'checkpoint')} ({humanize.size(freed)}) "
            f"for {self.kernel.shown_identity}. "
            "A restart now starts with an empty namespace: the variables you have now are not saved again "
            "unless you assign them anew; new variables are saved as usual."
        )

    def _do_adopt(self, args: list[str]) -> None:
        if len(args) != 1:
            raise UsageError("%checkpoint adopt takes the old notebook's path (as 'durable-kernel list' shows it)")
        moved = self.kernel.adopt(args[0])
        if not moved.generations:
            print("Nothing to adopt.")
            return
        newest = self.notebook.read_manifest(moved.generations[-1])
        print(f"Adopted {humanize.plural(len(moved.generations), 'checkpoint')} of {printable(moved.source)}.")
        if moved.left_behind:
            print(f"{humanize.plural(moved.left_behind, 'checkpoint')} this user's key cannot verify stayed behind.")
        self._restore(newest, f"Restored its newest, checkpoint {newest.generation}")

    def _do_off(self, args: list[str]) -> None:
        self._no_args(args, "off")
        self.kernel.enabled = False
        print("Checkpoints paused for this kernel; %checkpoint on resumes them.")

    def _do_on(self, args: list[str]) -> None:
        self._no_args(args, "on")
        self.kernel.enabled = True
        print("Checkpoints resumed: the namespace is saved after every cell.")
