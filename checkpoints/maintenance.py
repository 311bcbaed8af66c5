"""Changes to the store from outside a kernel's commit: gc, clear, moving a notebook's state, and
making an older checkpoint the newest again (a restore while no kernel runs).

Every deletion happens under the notebook's lock (:meth:`NotebookFolder.locked`),
the one a kernel holds while committing or pruning, so a commit in progress
never loses a blob it just wrote.  Clearing and moving first wait for the
notebook's checkpoint processes (its ``saving`` file), which would otherwise
commit right after them.  What is stored is read through ``inventory.py``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import manifest as manifest_format
from . import retention
from .blobs import blob_entries
from .errors import CheckpointError, UnsafeStore
from .files import check_private, fsync_dir, make_private_dirs, write_atomically
from .inventory import NotebookInfo, describe, garbage, notebook_at
from .manifest import printable
from .store import NotebookStore, Store

#: How long clearing and moving wait for a notebook's checkpoint processes to finish.
SAVER_WAIT = 60.0

#: The ``cell`` of a checkpoint made by restoring checkpoint N outside a cell (no cell made that state).
RESTORED_CELL = "(restored checkpoint {})"


@dataclass
class Collected:
    """What :func:`collect` did for one notebook."""

    info: NotebookInfo
    files: int
    freed: int
    #: why some blobs were kept although nothing readable names them
    kept_because: list[str] = field(default_factory=list)
    #: why this notebook was left alone entirely (an unsafe folder)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.info.identity,
            "folder": str(self.info.folder),
            "files_removed": self.files,
            "freed": self.freed,
            "kept_because": self.kept_because,
            "error": self.error,
        }


def collect(store: Store, info: NotebookInfo) -> Collected:
    """Garbage-collect one notebook under its lock: unreferenced blobs, crash leftovers."""
    nb = notebook_at(store, info.folder, info.identity)
    nb.check_safe_to_delete()
    try:
        with nb.locked(create=False):
            found, unreadable = garbage(nb)
            files, freed = retention.remove(found)
            for folder in nb.blob_folders():
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
    except FileNotFoundError:  # cleared meanwhile: nothing left to collect
        return Collected(info, 0, 0)
    return Collected(info, files, freed, unreadable)


def collect_all(store: Store) -> list[Collected]:
    """:func:`collect` for every notebook folder in the store."""
    check_private(store.root)
    results = []
    for folder in store.notebook_dirs():
        info = describe(store, folder)
        try:
            results.append(collect(store, info))
        except UnsafeStore as exc:
            results.append(Collected(info, 0, 0, error=str(exc)))
    return results


def clear(store: Store, info: NotebookInfo, wait: float = SAVER_WAIT) -> int:
    """Delete the checkpoints of a stored notebook (as ``list`` shows it); returns bytes freed."""
    return clear_notebook(notebook_at(store, info.folder, info.identity), wait)


def clear_notebook(nb: NotebookStore, wait: float = SAVER_WAIT) -> int:
    """Delete one notebook's checkpoints under its lock; returns bytes freed.

    A checkpoint process still running for it is waited for first (up to
    ``wait`` seconds, else :class:`CheckpointError`): it would commit its
    state right after the clear.  Its remembered settings (names never to
    save) are kept: forgetting them could make a kernel write a variable the
    user excluded on purpose.
    """
    nb.check_safe_to_delete()
    wait_for_savers(nb, wait)
    try:
        with nb.locked(create=False):
            return nb.clear()
    except FileNotFoundError:  # the folder was deleted meanwhile: nothing to clear
        return 0


def wait_for_savers(nb: NotebookStore, wait: float) -> None:
    """Wait until no checkpoint process of ``nb`` runs; :class:`CheckpointError` if one still does after
    ``wait`` seconds.  Before taking the lock, which such a process needs to finish."""
    if nb.wait_for_savers(wait) is False:
        name = printable(nb.identity or nb.dir.name)
        raise CheckpointError(
            f"a checkpoint of {name} is still being written after {wait:g} s; nothing was changed, try again later"
        )


@dataclass
class Moved:
    """What :func:`move` did."""

    source: str
    target: str
    #: checkpoint ids in the target that came from the source, oldest first
    generations: list[int]
    #: checkpoints left in the source because they do not verify with this key
    left_behind: int = 0


def move(store: Store, source: NotebookStore, target_identity: str, wait: float = SAVER_WAIT) -> Moved:
    """Move a notebook's checkpoints to another identity (a renamed or moved notebook).

    Every checkpoint of ``source`` that verifies is signed again for the new
    identity and numbered after the target's own newest, so the moved state
    becomes the target's newest (the target's older checkpoints stay, older).
    Blobs are hard-linked (copied across file systems) before any manifest is
    written and the source is deleted last, so a crash at any instant leaves
    the state loadable from one place or the other.  Checkpoints that do not
    verify (another key) are left where they are.  Both notebooks are locked,
    after waiting (up to ``wait`` seconds, else :class:`CheckpointError`) for
    their checkpoint processes: one still running would commit after the
    move, under the old name or over the moved state.
    """
    target = store.notebook(target_identity)
    label = source.identity or source.dir.name
    if source.dir == target.dir:
        return Moved(label, target_identity, [])
    source.check_safe_to_delete()
    target.check_safe()
    deadline = time.monotonic() + wait
    wait_for_savers(source, wait)
    wait_for_savers(target, max(deadline - time.monotonic(), 0.0))
    first, second = sorted((source, target), key=lambda nb: nb.dir.name)
    with first.locked(create=first is target), second.locked(create=second is target):
        manifests = []
        left = 0
        for gen in sorted(source.checkpoint_ids()):
            try:
                manifests.append(source.read_manifest(gen))
            except CheckpointError:
                left += 1
        if not manifests:
            raise CheckpointError(f"{printable(label)} has no checkpoint this user's key can verify; nothing moved")
        touched = set()
        for name in sorted(set().union(*(m.blob_digests() for m in manifests))):
            src, dst = source.blob_path(name), target.blob_path(name)
            if dst.exists() or not src.exists():
                continue
            make_private_dirs(dst.parent)
            try:
                os.link(src, dst)
            except OSError:
                write_atomically(dst, [src.read_bytes()])
            touched.add(dst.parent)
        for folder in touched:
            fsync_dir(folder)
        base = max(target.checkpoint_ids(), default=0)
        moved = []
        for offset, man in enumerate(manifests, start=1):
            data = {**man.data, "identity": target_identity, "generation": base + offset}
            # The link changed the files' change time: their stamps would only
            # make the next commit check them, so say that plainly.
            for var in data["variables"]:
                var.pop("stamp", None)
                for buf in blob_entries(var):
                    buf.pop("stamp", None)
            write_atomically(target.manifest_path(base + offset), [manifest_format.encode(data, store.key)])
            moved.append(base + offset)
        fsync_dir(target.manifests_dir)
        settings = source.read_settings()
        if settings.get("exclude"):
            merged = target.read_settings()
            merged["exclude"] = list(dict.fromkeys([*merged.get("exclude", []), *settings["exclude"]]))
            target.write_settings(merged)
        if left:
            for man in manifests:
                with contextlib.suppress(FileNotFoundError):
                    source.manifest_path(man.generation).unlink()
        else:
            source.clear()
    return Moved(label, target_identity, moved, left)


def make_newest(nb: NotebookStore, generation: int, wait: float = SAVER_WAIT) -> int:
    """Make checkpoint ``generation`` of ``nb`` the one the next start loads; returns its new id.

    A restore while no kernel runs, without unpickling anything: the verified
    manifest is signed again as a new checkpoint numbered after the newest,
    naming the same blobs (so they stay as long as either is kept), with its
    variables, what was not saved, the cells and versions of the original;
    its time is now, its cell says it was restored (``RESTORED_CELL``) and its
    ``writer`` is empty (no kernel wrote it, none is still writing it).  The
    checkpoints it replaces as the newest stay, for undo: nothing is pruned
    here (the next commit prunes as usual).  A checkpoint that already is the
    newest is left as it is.  Waits (up to ``wait`` seconds, else
    :class:`CheckpointError`) for the notebook's checkpoint processes, whose
    commit would otherwise land on top of it, then works under the lock.
    """
    nb.check_safe()
    wait_for_savers(nb, wait)
    try:
        with nb.locked(create=False):
            return _make_newest_locked(nb, generation)
    except FileNotFoundError:  # cleared and removed meanwhile
        raise CheckpointError(f"no checkpoint {generation} for {printable(nb.identity)}") from None


def _make_newest_locked(nb: NotebookStore, generation: int) -> int:
    kept = nb.checkpoint_ids()
    if generation not in kept:
        raise CheckpointError(f"no checkpoint {generation} for {printable(nb.identity)}")
    man = nb.read_manifest(generation)  # verified: a failure is the one-line error
    if kept[0] == generation:
        return generation
    new = kept[0] + 1
    data = {**man.data, "generation": new, "created": time.time(), "cell": RESTORED_CELL.format(generation)}
    data["writer"] = {}
    data.pop("made_by", None)  # no kernel's cell made it
    try:
        replaced: dict[str, Any] | None = nb.read_manifest(kept[0]).data
    except CheckpointError:
        replaced = None
    # What this restore changed, against the checkpoint it replaces as the newest (not what the
    # restored checkpoint's own cell once changed).
    added, removed, changed = manifest_format.diff(replaced or {}, man.data)
    data["changes"] = {
        "from": kept[0] if replaced is not None else None,
        "added": added,
        "removed": removed,
        "changed": changed,
    }
    nb.files.publish(nb.manifest_key(new), manifest_format.encode(data, nb.store.key))
    return new
