"""What is stored, read-only: the notebooks, their checkpoints, disk use, what gc would remove.

For the ``durable-kernel`` command, ``%checkpoint``, the Jupyter Server API
and a starting kernel (which looks for the state of a renamed or moved notebook).  It never
unpickles anything and never deletes: it reads manifests only, verified with
the user's key where what they say is shown to the user, and unverified only
to decide what to *keep* (a bad manifest can at worst keep a blob alive).
Changes to the store are ``maintenance.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import retention
from .errors import CheckpointError
from .files import TMP_PREFIX
from .manifest import Manifest, diff, folder_name, printable
from .store import NotebookStore, Store, disk_usage

#: A temp file beside settings.json (written without the lock) is only taken
#: for a crash leftover once its writer is gone or it is this old.
STALE_TMP_SECONDS = 3600
_KEY_NAME = re.compile(r"^[0-9a-f]{32}$")


class NoSuchNotebook(LookupError):
    """No stored notebook matches what the user typed."""


def notebook_at(store: Store, folder: Path, identity: str | None = None) -> NotebookStore:
    """A :class:`NotebookStore` for one notebook folder, whatever identity it was stored under
    (the one way to open a folder found by listing the store rather than by identity)."""
    if identity is not None and folder_name(identity) == folder.name:
        return store.notebook(identity)
    return NotebookStore(store, identity or "", folder=folder)


@dataclass
class NotebookInfo:
    """One notebook folder as ``list`` and ``du`` show it."""

    folder: Path
    #: the identity the newest readable manifest names; None if none is readable
    identity: str | None
    #: kept generation ids, newest first
    generations: list[int]
    #: the newest manifest that verified, if any
    newest: Manifest | None
    #: unix time of the last checkpoint (refreshed by every cell, even one that changed nothing)
    last_used: float
    #: bytes on disk under the folder
    size: int
    #: one line per generation that could not be read, newer than ``newest``
    problems: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.folder.name

    @property
    def label(self) -> str:
        """The identity, printable, or a placeholder naming the folder when it is unknown."""
        return printable(self.identity, 500) if self.identity is not None else f"(unknown: folder {self.key})"

    @property
    def variables(self) -> int | None:
        return len(self.newest.variables) if self.newest is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "folder": str(self.folder),
            "key": self.key,
            "last_used": self.last_used,
            "last_used_iso": iso_time(self.last_used),
            "generations": self.generations,
            "checkpoints": len(self.generations),
            "newest": self.newest.generation if self.newest is not None else None,
            "execution_count": self.newest.execution_count if self.newest is not None else None,
            "variables": self.variables,
            "size": self.size,
            "problems": self.problems,
        }


def iso_time(ts: float) -> str:
    """A unix time as ISO 8601 local time, for ``--json``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def describe(store: Store, folder: Path) -> NotebookInfo:
    """Read one notebook folder: identity, generations, newest checkpoint, size."""
    nb = notebook_at(store, folder)
    gens = nb.checkpoint_ids()
    newest: Manifest | None = None
    problems: list[str] = []
    for gen in gens:
        try:
            newest = nb.read_manifest(gen)
            break
        except CheckpointError as exc:
            problems.append(str(exc))
    if newest is not None:
        last = float(newest.created)
    else:
        last = max([_mtime(nb.manifest_path(g)) for g in gens] or [_mtime(folder)])
    return NotebookInfo(
        folder=folder,
        identity=newest.identity if newest is not None else None,
        generations=gens,
        newest=newest,
        last_used=last,
        size=disk_usage(folder),
        problems=problems,
    )


def notebooks(store: Store) -> list[NotebookInfo]:
    """Every notebook with something stored, most recently used first."""
    found = []
    for folder in store.notebook_dirs():
        info = describe(store, folder)
        if info.generations or notebook_at(store, folder).blob_names():
            found.append(info)
    return sorted(found, key=lambda i: i.last_used, reverse=True)


def readable(nb: NotebookStore) -> tuple[list[Manifest], list[str]]:
    """The kept checkpoints of ``nb`` that verify, newest first, and one line per one that does not."""
    found: list[Manifest] = []
    problems: list[str] = []
    for gen in nb.checkpoint_ids():
        try:
            found.append(nb.read_manifest(gen))
        except CheckpointError as exc:
            problems.append(str(exc))
    return found, problems


@dataclass
class Kept:
    """One kept checkpoint as ``%checkpoint list`` shows it: what its cell changed."""

    manifest: Manifest
    #: names added, removed and changed by the cell that made it: against the checkpoint it
    #: replaced, as recorded when it was made (0.3+), else against the next older one kept
    added: list[str]
    removed: list[str]
    changed: list[str]
    #: False when that cannot be told (an older checkpoint whose predecessor is not kept)
    known: bool = True

    @property
    def size(self) -> int:
        return sum(v.get("size", 0) for v in self.manifest.variables)

    def to_json(self) -> dict[str, Any]:
        man = self.manifest
        return {
            "id": man.generation,
            "created": man.created,
            "created_iso": iso_time(man.created),
            "execution_count": man.execution_count,
            "cell": man.data.get("cell", ""),
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "changes_known": self.known,
            "variables": len(man.variables),
            "size": self.size,
        }


def history(manifests: list[Manifest]) -> list[Kept]:
    """Readable checkpoints (newest first, as :func:`readable` gives them), each with what its cell
    changed: as recorded when it was made (which stays true once its predecessor is pruned), else
    against the next older one kept; checkpoint 1 against nothing; otherwise unknown."""
    out = []
    for i, man in enumerate(manifests):
        recorded = man.data.get("changes")
        if isinstance(recorded, dict) and all(
            isinstance(recorded.get(k), list) and all(isinstance(n, str) for n in recorded[k])
            for k in ("added", "removed", "changed")
        ):
            out.append(Kept(man, recorded["added"], recorded["removed"], recorded["changed"]))
        elif i + 1 < len(manifests):
            out.append(Kept(man, *diff(manifests[i + 1].data, man.data)))
        elif man.generation == 1:
            out.append(Kept(man, *diff({}, man.data)))
        else:
            out.append(Kept(man, [], [], [], known=False))
    return out


def variable_json(var: dict[str, Any]) -> dict[str, Any]:
    """One variable of a manifest, for JSON output: name, type, kind, size and where it is stored."""
    out = {k: var.get(k) for k in ("name", "type", "kind", "size")}
    if var.get("kind") == "pickle":
        out["stored"] = "inline" if "inline" in var else "chunks" if "stream" in var else "blob"
        out["buffers"] = len(var.get("pieces") or var.get("buffers", []))
    else:
        out["target"] = var.get("target")
    return out


def checkpoint_json(man: Manifest) -> dict[str, Any]:
    """One checkpoint as ``durable-kernel show --json`` gives it: variables (sorted by name), sizes,
    what was not saved and why, who wrote it; from the manifest alone."""
    return {
        "identity": man.identity,
        "generation": man.generation,
        "created": man.created,
        "created_iso": iso_time(man.created),
        "execution_count": man.execution_count,
        "cell": man.data.get("cell", ""),
        "writer": man.data.get("writer", {}),
        "versions": man.data.get("versions", {}),
        "variables": [variable_json(v) for v in sorted(man.variables, key=lambda v: v["name"].lower())],
        "size": sum(v.get("size", 0) for v in man.variables),
        "skipped": man.skipped,
    }


def find(store: Store, name: str) -> NotebookInfo:
    """The stored notebook the user means by ``name``.

    ``name`` may be the identity as stored, a path as the user knows it
    (relative to the current folder or absolute), or a folder key as ``list``
    shows for notebooks whose identity cannot be read.
    """
    candidates = [name]
    if name:
        for path in (os.path.abspath(os.path.expanduser(name)), os.path.realpath(os.path.expanduser(name))):
            if path not in candidates:
                candidates.append(path)
    for candidate in candidates:
        folder = store.root / folder_name(candidate)
        if (folder / "manifests").is_dir():
            info = describe(store, folder)
            if info.identity is None:
                info.identity = candidate
            return info
    if _KEY_NAME.match(name) and (store.root / name / "manifests").is_dir():
        return describe(store, store.root / name)
    where = f"in {store.root}"
    base = os.path.basename(name.rstrip(os.sep)) if name else ""
    similar = [i.identity for i in notebooks(store) if i.identity and base and os.path.basename(i.identity) == base]
    hint = (
        f"; did you mean {' or '.join(repr(s) for s in similar[:3])}?"
        if similar
        else ("; 'durable-kernel list' shows the stored notebooks")
    )
    raise NoSuchNotebook(f"no checkpoints for {name!r} {where}{hint}")


def _stale_top_level_tmp(nb: NotebookStore, now: float) -> list[tuple[Path, int]]:
    """Temp files beside settings.json whose writer is gone (settings are written without the lock)."""
    from .liveness import pid_alive

    found: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(nb.dir))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        pid_text = entry.name[len(TMP_PREFIX) :].split("-", 1)[0]
        writer_alive = pid_text.isdigit() and pid_alive(int(pid_text))
        if not writer_alive or now - info.st_mtime > STALE_TMP_SECONDS:
            found.append((Path(entry.path), info.st_size))
    return found


def garbage(nb: NotebookStore, now: float | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """What :func:`collect` would remove now: ``([(path, bytes)], manifests that could not be read)``.

    The same plan a commit's prune executes; while a manifest cannot be read,
    every blob is kept (only crash leftovers are listed).
    """
    now = time.time() if now is None else now
    needed, unreadable = retention.blobs_needed(nb, nb.store.key)
    return retention.sweep_plan(nb, needed) + _stale_top_level_tmp(nb, now), unreadable


@dataclass
class Usage:
    """Disk use of one notebook, as ``du`` shows it."""

    info: NotebookInfo
    manifests: int
    blobs: int
    blob_count: int
    reclaimable: int

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.info.identity,
            "folder": str(self.info.folder),
            "size": self.info.size,
            "manifests": self.manifests,
            "blobs": self.blobs,
            "blob_count": self.blob_count,
            "checkpoints": len(self.info.generations),
            "reclaimable": self.reclaimable,
        }


def usage(store: Store) -> list[Usage]:
    """Disk use of every notebook folder, biggest first."""
    rows = []
    for folder in store.notebook_dirs():
        info = describe(store, folder)
        nb = notebook_at(store, folder, info.identity)
        blob_bytes = blob_count = 0
        for sub in nb.blob_folders():
            with contextlib.suppress(OSError):
                for entry in os.scandir(sub):
                    with contextlib.suppress(OSError):
                        blob_bytes += entry.stat(follow_symlinks=False).st_size
                        blob_count += not entry.name.startswith(TMP_PREFIX)
        found, _ = garbage(nb)
        if not info.generations and not blob_count and not found:
            continue  # nothing stored (a cleared notebook's remembered settings only)
        rows.append(Usage(info, disk_usage(nb.manifests_dir), blob_bytes, blob_count, sum(s for _, s in found)))
    return sorted(rows, key=lambda u: u.info.size, reverse=True)


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")


_UNITS = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 7 * 86400,
    "week": 7 * 86400,
    "weeks": 7 * 86400,
}


def parse_age(text: str) -> float:
    """``30d`` -> seconds; units s, m, h, d, w (or their names)."""
    match = _AGE.match(text.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not an age; use a number and a unit such as 30d, 12h, 90m or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def unused_since(store: Store, seconds: float, now: float | None = None) -> list[NotebookInfo]:
    """Notebooks whose last checkpoint is older than ``seconds``."""
    cutoff = (time.time() if now is None else now) - seconds
    return [info for info in notebooks(store) if info.last_used < cutoff]


def free_space(path: Path) -> int | None:
    """Bytes free on the disk holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


@dataclass
class Stored:
    """A notebook's newest verified checkpoint, as a scan for moved notebooks sees it."""

    folder: Path
    identity: str
    created: float
    writer: dict[str, Any]


def newest_checkpoints(store: Store) -> list[Stored]:
    """Each notebook's newest checkpoint that verifies, newest first (manifests only, no sizes)."""
    found = []
    for folder in store.notebook_dirs():
        man = newest_verified(notebook_at(store, folder))
        if man is not None:
            writer = man.data.get("writer")
            found.append(Stored(folder, man.identity, float(man.created), writer if isinstance(writer, dict) else {}))
    return sorted(found, key=lambda s: s.created, reverse=True)


def orphans(stored: list[Stored], identity: str) -> list[Stored]:
    """Notebooks whose file is gone (an absolute path that no longer exists), likeliest
    first: same file name as ``identity``, then the most recently saved."""
    base = os.path.basename(identity)
    gone = [
        s for s in stored if s.identity != identity and os.path.isabs(s.identity) and not os.path.exists(s.identity)
    ]
    return sorted(gone, key=lambda s: (os.path.basename(s.identity) != base, -s.created))


def newest_verified(nb: NotebookStore) -> Manifest | None:
    """The newest checkpoint of ``nb`` that verifies, or None."""
    for gen in nb.checkpoint_ids():
        try:
            return nb.read_manifest(gen)
        except CheckpointError:
            continue
    return None
