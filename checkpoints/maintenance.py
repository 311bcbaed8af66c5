"""Store-wide operations for the ``durable-kernel`` command line.

Listing the stored notebooks, their disk use, garbage collection and clearing
by age.  Like the rest of this package it never imports IPython, ipykernel or
zmq, and it never unpickles anything: it reads manifests only, verified with
the user's key where what they say is shown to the user, and unverified only
to decide what to *keep* (a bad manifest can at worst keep a blob alive).

Every deletion happens under the notebook's lock (:meth:`NotebookStore.locked`),
the one a kernel holds while committing or pruning, so a commit in progress
never loses a blob it just wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import manifest as manifest_format
from .errors import CheckpointError, UnsafeStore
from .manifest import Manifest
from .signing import default_key_path, load_or_create_key
from .store import TMP_PREFIX, NotebookStore, Store, disk_usage, storage_key

#: A temp file beside settings.json (written without the lock) is only taken
#: for a crash leftover once its writer is gone or it is this old.
STALE_TMP_SECONDS = 3600
_KEY_NAME = re.compile(r"^[0-9a-f]{32}$")


class NoSuchNotebook(LookupError):
    """No stored notebook matches what the user typed."""


# --- opening the store ---------------------------------------------------------


def store_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the checkpoints are: ``explicit``, else ``$DURABLE_KERNEL_DIR``,
    else ``durable_kernel/`` under Jupyter's data dir (as the kernel decides)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("DURABLE_KERNEL_DIR")
    if env:
        return Path(env).expanduser()
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "durable_kernel"


def open_store(root: str | os.PathLike[str] | None = None) -> Store:
    """The store at :func:`store_root`, with this user's signing key.

    A missing key is not created (reading the store should leave no trace);
    then no manifest verifies, which is the truth: none was signed by a key
    this user still has.
    """
    if default_key_path().exists():
        key = load_or_create_key()
    else:
        key = secrets.token_hex(32).encode()
    return Store(store_root(root), key)


def notebook_at(store: Store, folder: Path, identity: str | None = None) -> NotebookStore:
    """A :class:`NotebookStore` for one notebook folder, whatever identity it was stored under."""
    if identity is not None and storage_key(identity) == folder.name:
        return store.notebook(identity)
    nb = store.notebook(identity or "")
    nb.dir = folder
    nb.manifests_dir = folder / "manifests"
    nb.blobs_dir = folder / "blobs"
    return nb


# --- what is stored --------------------------------------------------------------


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
        """The identity, or a placeholder naming the folder when it is unknown."""
        return self.identity if self.identity is not None else f"(unknown: folder {self.key})"

    @property
    def variables(self) -> int | None:
        return len(self.newest.variables) if self.newest is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "folder": str(self.folder),
            "key": self.key,
            "last_used": self.last_used,
            "last_used_iso": _iso(self.last_used),
            "generations": self.generations,
            "checkpoints": len(self.generations),
            "newest": self.newest.generation if self.newest is not None else None,
            "execution_count": self.newest.execution_count if self.newest is not None else None,
            "variables": self.variables,
            "size": self.size,
            "problems": self.problems,
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def describe(store: Store, folder: Path) -> NotebookInfo:
    """Read one notebook folder: identity, generations, newest checkpoint, size."""
    nb = notebook_at(store, folder)
    gens = nb.generations()
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
        last = max([_mtime(nb._manifest_path(g)) for g in gens] or [_mtime(folder)])
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
        if info.generations or _blob_names(notebook_at(store, folder)):
            found.append(info)
    return sorted(found, key=lambda i: i.last_used, reverse=True)


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
        folder = store.root / storage_key(candidate)
        if (folder / "manifests").is_dir():
            info = describe(store, folder)
            if info.identity is None:
                info.identity = candidate
            return info
    if _KEY_NAME.match(name) and (store.root / name / "manifests").is_dir():
        return describe(store, store.root / name)
    where = f"in {store.root}"
    base = os.path.basename(name.rstrip(os.sep)) if name else ""
    similar = [
        i.identity for i in notebooks(store) if i.identity and base and os.path.basename(i.identity) == base
    ]
    hint = f"; did you mean {' or '.join(repr(s) for s in similar[:3])}?" if similar else (
        "; 'durable-kernel list' shows the stored notebooks"
    )
    raise NoSuchNotebook(f"no checkpoints for {name!r} {where}{hint}")


# --- garbage -------------------------------------------------------------------------


def _blob_names(nb: NotebookStore) -> set[str]:
    names = set()
    for folder in nb._blob_folders():
        with contextlib.suppress(OSError):
            names |= {e.name for e in os.scandir(folder) if not e.name.startswith(TMP_PREFIX)}
    return names


def needed_blobs(nb: NotebookStore) -> tuple[set[str], list[str]]:
    """Blobs the kept manifests name, and one line per manifest that could not be read.

    Deliberately unverified: this decides what to keep, so an untrusted
    manifest keeps its blobs (clearing the notebook is how to drop those).
    While any manifest cannot be parsed at all, the caller must keep every blob.
    """
    needed: set[str] = set()
    unreadable: list[str] = []
    for gen in nb.generations():
        try:
            raw = nb._manifest_path(gen).read_bytes()
        except FileNotFoundError:
            continue  # pruned meanwhile: it needs nothing any more
        except OSError as exc:
            unreadable.append(f"checkpoint {gen} cannot be read: {exc.strerror or exc}")
            continue
        try:
            data = json.loads(raw.split(b"\n", 2)[2])
            schema = data.get("schema")
            if not isinstance(schema, int) or schema > manifest_format.SCHEMA_VERSION:
                raise ValueError(f"schema {schema!r} unknown to this version")
            needed |= manifest_format.referenced_blobs(data)
        except (IndexError, ValueError, TypeError, KeyError, AttributeError) as exc:
            unreadable.append(f"checkpoint {gen} cannot be parsed ({exc})")
    return needed, unreadable


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _stale_top_level_tmp(nb: NotebookStore, now: float) -> list[tuple[Path, int]]:
    """Temp files beside settings.json whose writer is gone (settings are written without the lock)."""
    found = []
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
        pid_text = entry.name[len(TMP_PREFIX):].split("-", 1)[0]
        writer_alive = pid_text.isdigit() and _pid_alive(int(pid_text))
        if not writer_alive or now - info.st_mtime > STALE_TMP_SECONDS:
            found.append((Path(entry.path), info.st_size))
    return found


def garbage(nb: NotebookStore, now: float | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """What :func:`collect` would remove now: ``([(path, bytes)], unreadable manifests)``."""
    now = time.time() if now is None else now
    needed, unreadable = needed_blobs(nb)
    found: list[tuple[Path, int]] = []
    for folder in (nb.manifests_dir, *nb._blob_folders()):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                continue
            tmp = entry.name.startswith(TMP_PREFIX)
            orphan = folder != nb.manifests_dir and entry.name not in needed and not unreadable
            if tmp or orphan:
                with contextlib.suppress(FileNotFoundError):
                    found.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
    found += _stale_top_level_tmp(nb, now)
    return found, unreadable


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


def check_safe(store: Store, folder: Path | None = None) -> None:
    """Refuse to delete in a store other users could have rearranged (symlinks, shared folders)."""
    paths = [store.root]
    if folder is not None:
        paths += [folder, folder / "manifests", folder / "blobs"]
    for path in paths:
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) and path != store.root:
            raise UnsafeStore(f"{path} is a symlink; refusing to delete anything through it")
        mode = path.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeStore(
                f"{path} can be written by other users; refusing to delete anything in it "
                f"(fix it with: chmod go-w {path})"
            )


def collect(store: Store, info: NotebookInfo) -> Collected:
    """Garbage-collect one notebook under its lock: unreferenced blobs, crash leftovers."""
    check_safe(store, info.folder)
    nb = notebook_at(store, info.folder, info.identity)
    now = time.time()
    with nb.locked():
        needed, unreadable = needed_blobs(nb)
        if unreadable:
            needed |= _blob_names(nb)  # keep every blob: we cannot tell what that manifest needs
        files, freed = nb._sweep(needed)
        for path, size in _stale_top_level_tmp(nb, now):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                files += 1
                freed += size
        for folder in nb._blob_folders():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
    return Collected(info, files, freed, unreadable)


def collect_all(store: Store) -> list[Collected]:
    """:func:`collect` for every notebook folder in the store."""
    check_safe(store)
    results = []
    for folder in store.notebook_dirs():
        info = describe(store, folder)
        try:
            results.append(collect(store, info))
        except UnsafeStore as exc:
            results.append(Collected(info, 0, 0, error=str(exc)))
    return results


# --- disk use --------------------------------------------------------------------------


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
        for sub in nb._blob_folders():
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


# --- clearing ------------------------------------------------------------------------


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")
_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 7 * 86400, "week": 7 * 86400, "weeks": 7 * 86400,
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


def clear(store: Store, info: NotebookInfo) -> int:
    """Delete one notebook's checkpoints under its lock; returns bytes freed.

    Its remembered settings (names never to save) are kept: forgetting them
    could make a kernel write a variable the user excluded on purpose.
    """
    check_safe(store, info.folder)
    nb = notebook_at(store, info.folder, info.identity)
    settings = nb.read_settings()
    with nb.locked():
        freed = nb.clear()
        if settings:
            nb.write_settings(settings)
            freed -= disk_usage(nb.dir)
    return max(freed, 0)


def free_space(path: Path) -> int | None:
    """Bytes free on the disk holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None
