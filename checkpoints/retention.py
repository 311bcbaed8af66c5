"""What a notebook keeps and what goes: one plan for a commit's prune, ``gc`` and ``du``.

Plan, then execute (a dry run simply does not execute), as restic prunes.
Nothing that could not be verified is ever deleted: retention counts only the
checkpoints signed with this user's key (of a schema this version reads), so
a changed key, a copied store or a newer schema never costs the checkpoints it
cannot read, nor the blobs they name.  Deleting happens under the notebook's
lock, the one every commit holds, so a commit never loses a blob it relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from . import manifest as manifest_format
from .errors import CheckpointError
from .files import TMP_PREFIX
from .folder import NotebookFolder

#: ``(path, bytes)`` of each file a sweep removes
Plan = list[tuple[Path, int]]


def signed(nb: NotebookFolder, key: bytes, checkpoint_id: int) -> dict[str, Any] | None:
    """A manifest's JSON if it is signed with ``key`` and readable by this version, else None."""
    try:
        return manifest_format.signed_data(
            nb.manifest_bytes(checkpoint_id),
            key,
            f"checkpoint {checkpoint_id}",
            generation=checkpoint_id,
            folder=nb.dir.name,
        )
    except (CheckpointError, OSError):
        return None


def prune(nb: NotebookFolder, key: bytes, keep: int, verified: dict[int, dict[str, Any] | None] | None = None) -> None:
    """Drop the verified checkpoints :func:`to_drop` names, then blobs no kept manifest needs.

    Call under the notebook's lock.  ``verified`` maps each checkpoint id to its
    verified JSON (None: it does not verify), if the caller read them already.
    """
    if verified is None:
        verified = {gen: signed(nb, key, gen) for gen in nb.checkpoint_ids()}
    mine = {gen: data for gen, data in verified.items() if data is not None}
    for gen in to_drop(mine, keep):
        nb.files.delete(nb.manifest_key(gen))
        del verified[gen]
    needed, _ = blobs_needed(nb, key, verified)
    remove(sweep_plan(nb, needed))


def to_drop(checkpoints: dict[int, dict[str, Any]], keep: int) -> list[int]:
    """Which of these (verified) checkpoints go: keep the ``keep`` newest *states*, not checkpoints.

    A checkpoint whose state is one an older kept checkpoint holds (``%checkpoint
    undo`` or ``restore`` went back to it, or the cells did) adds no state: it does
    not count, so stepping back and forth through the kept checkpoints never pushes
    one of them out.  Of the checkpoints of one state, the oldest is kept (it names
    the cell that made the state) and the newest checkpoint of all (what a restart
    restores); the others go.  So at most ``keep`` states are kept, in at most
    ``keep + 1`` manifests, and disk use stays bounded by ``keep`` states' data.
    """
    newest_first = sorted(checkpoints, reverse=True)
    oldest_of: dict[Any, int] = {}
    for gen in newest_first:
        oldest_of[state_key(checkpoints[gen])] = gen  # the last one met is the oldest
    kept_states: list[Any] = []
    drop = []
    for gen in newest_first:
        state = state_key(checkpoints[gen])
        if state not in kept_states:
            if len(kept_states) >= max(keep, 1):
                drop.append(gen)
                continue
            kept_states.append(state)
        if gen != newest_first[0] and gen != oldest_of[state]:
            drop.append(gen)
    return drop


def state_key(data: dict[str, Any]) -> Any:
    """What a checkpoint holds, comparable between checkpoints: its stored variables and the names it skipped."""
    prints = manifest_format.fingerprint(data)
    skipped = sorted(str(s.get("name")) for s in data.get("skipped", []) if isinstance(s, dict))
    return (tuple(sorted(prints.items())), tuple(skipped))


def blobs_needed(
    nb: NotebookFolder, key: bytes, verified: dict[int, dict[str, Any] | None] | None = None
) -> tuple[set[str] | None, list[str]]:
    """The blobs the kept manifests name, and one line per manifest that could not be read.

    None instead of a set means some manifest cannot be read now: keep every
    blob.  Manifests that do not verify still keep their blobs (read
    unverified, only to decide what to keep: a bad manifest can at worst
    keep a blob alive, never get one unpickled).
    """
    if verified is None:
        verified = {gen: signed(nb, key, gen) for gen in nb.checkpoint_ids()}
    needed: set[str] | None = set()
    problems: list[str] = []
    for gen, data in verified.items():
        named = manifest_format.referenced_blobs(data) if data is not None else _named_unverified(nb, gen, problems)
        if named is None or needed is None:
            needed = None
        else:
            needed |= named
    return needed, problems


def _named_unverified(nb: NotebookFolder, checkpoint_id: int, problems: list[str]) -> set[str] | None:
    """Blobs an unverifiable manifest names; None if that cannot be told (keep them all).

    Only a manifest that is gone needs nothing.  One that cannot be read
    (another user's or writable by others, a symlink, not a regular file,
    too big) keeps every blob: it may be readable again after a chmod or a
    restored file, and a deleted blob is the one loss that cannot be undone.
    """
    try:
        raw = nb.manifest_bytes(checkpoint_id)
    except (OSError, CheckpointError) as exc:
        if not os.path.lexists(nb.manifest_path(checkpoint_id)):
            return set()  # pruned or cleared meanwhile
        why = str(exc).removeprefix(f"checkpoint {checkpoint_id}: ") if isinstance(exc, CheckpointError) else None
        problems.append(f"checkpoint {checkpoint_id} cannot be read: {why or getattr(exc, 'strerror', None) or exc}")
        return None
    try:
        return manifest_format.referenced_blobs(json.loads(manifest_format.body_of(raw)))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        problems.append(f"checkpoint {checkpoint_id} cannot be parsed ({exc})")
        return None


def sweep_plan(nb: NotebookFolder, needed: set[str] | None) -> Plan:
    """Blobs not in ``needed`` and crash leftovers (temp files) among manifests and blobs;
    ``needed=None``: leftovers only."""
    plan = []
    for folder in (nb.manifests_dir, *nb.blob_folders()):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                continue
            if entry.name.startswith(TMP_PREFIX) or (
                folder != nb.manifests_dir and needed is not None and entry.name not in needed
            ):
                with contextlib.suppress(FileNotFoundError):
                    plan.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
    return plan


def remove(plan: Plan) -> tuple[int, int]:
    """Delete what a plan lists: ``(files removed, bytes freed)``."""
    removed = freed = 0
    for path, size in plan:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
            freed += size
    return removed, freed
