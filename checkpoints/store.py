"""The on-disk store: content-addressed blobs, signed manifests, atomic commits.

Layout under the root folder (folders 0700, files 0600)::

    <root>/<key>/                 one folder per notebook; key = hash of its identity
        lock                      flock'd while committing, pruning or clearing
        manifests/<gen>.manifest  one per kept generation (see manifest.py)
        blobs/<d[:2]>/<d>         pickles and raw buffers, named by BLAKE3 digest d

Commit order, so that a crash at any instant leaves the newest committed
checkpoint loadable: each blob is written to a temp file in its folder,
fsynced and renamed to its digest; the folders are fsynced; then the manifest
is written the same way and its rename is the commit point.  Blobs already
present are not written again, which is what makes a checkpoint after a small
change cost little.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import secrets
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import blake3

from . import manifest as manifest_format
from .errors import CheckpointError, CorruptCheckpoint, SaveError, UnsafeStore
from .manifest import Manifest
from .serialize import Loader, Skipped, Snapshot

log = logging.getLogger(__name__)

#: Payloads up to this size live inside the manifest instead of a blob file.
INLINE_MAX_BYTES = 16 * 1024
#: Hash big buffers on all cores; below this the thread start-up costs more.
_PARALLEL_HASH_BYTES = 8 << 20
_WRITE_CHUNK = 64 << 20
TMP_PREFIX = ".tmp-"
_MANIFEST_SUFFIX = ".manifest"
#: For files the store reads: a symlink is refused rather than followed, and a
#: FIFO planted under a file's name opens at once instead of waiting forever
#: for a writer (the caller then refuses it: it is not a regular file).
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


_hash_threads = blake3.blake3.AUTO


def _hash_single_threaded_after_fork() -> None:
    # blake3's thread pool is created once per process and its workers do not
    # survive fork(): in a child of a process that already hashed in parallel
    # (a kernel that verified a large restore), a parallel hash waits forever.
    global _hash_threads
    _hash_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_hash_single_threaded_after_fork)


def digest(data: Any) -> str:
    """BLAKE3 hex digest of a bytes-like object."""
    view = memoryview(data)
    threads = _hash_threads if view.nbytes >= _PARALLEL_HASH_BYTES else 1
    return blake3.blake3(view, max_threads=threads).hexdigest()


def storage_key(identity: str) -> str:
    """The folder name for a notebook identity: a hash, never the path itself."""
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(final: Path, chunks: Iterable[Any]) -> int:
    """Write ``chunks`` to a temp file beside ``final``, fsync, rename. Returns bytes."""
    tmp = final.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            for start in range(0, view.nbytes, _WRITE_CHUNK):
                part = view[start : start + _WRITE_CHUNK]
                while part.nbytes:
                    n = os.write(fd, part)
                    part = part[n:]
                    written += n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, final)
    return written


@dataclass
class CommitResult:
    """What a commit did: the manifest and how many bytes hit the disk."""

    manifest: Manifest
    bytes_written: int
    blobs_written: int
    seconds: float
    #: the writer of the generation before this one, if another kernel wrote it
    other_writer: dict[str, Any] | None = None


@dataclass
class Restored:
    """A loaded checkpoint: the values, what did not come back, what was tried."""

    manifest: Manifest
    values: dict[str, Any]
    not_restored: list[Skipped]
    #: one line per newer generation that could not be loaded, and why
    fallbacks: list[str] = field(default_factory=list)


class Store:
    """All notebooks' checkpoints under one root folder."""

    def __init__(self, root: Path | str, key: bytes):
        self.root = Path(root)
        self.key = key

    def notebook(self, identity: str) -> "NotebookStore":
        """The checkpoints of one notebook identity."""
        return NotebookStore(self, identity)

    def notebook_dirs(self) -> list[Path]:
        """Every notebook folder in the store."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / "manifests").is_dir())


class NotebookStore:
    """One notebook's generations: commit, list, load, prune, clear."""

    def __init__(self, store: Store, identity: str):
        self.store = store
        self.identity = identity
        self.dir = store.root / storage_key(identity)
        self.manifests_dir = self.dir / "manifests"
        self.blobs_dir = self.dir / "blobs"
        #: generations this object found damaged while loading: the next commit
        #: must not trust their blobs (see _commit_locked)
        self._found_damaged: set[int] = set()

    # --- layout -------------------------------------------------------------

    def _blob_path(self, digest_hex: str) -> Path:
        return self.blobs_dir / digest_hex[:2] / digest_hex

    def _manifest_path(self, generation: int) -> Path:
        return self.manifests_dir / f"{generation:012d}{_MANIFEST_SUFFIX}"

    def _ensure_dirs(self) -> None:
        for path in (self.store.root, self.dir, self.manifests_dir, self.blobs_dir):
            _mkdir(path)

    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[bool]:
        """Hold this notebook's lock: one committer or pruner at a time.

        With ``wait=False`` it yields False at once if someone else holds it.
        """
        self._ensure_dirs()
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def generations(self) -> list[int]:
        """Committed generation numbers, newest first."""
        try:
            names = os.listdir(self.manifests_dir)
        except FileNotFoundError:
            return []
        gens = []
        for name in names:
            stem, _, suffix = name.partition(".")
            if "." + suffix == _MANIFEST_SUFFIX and stem.isdigit():
                gens.append(int(stem))
        return sorted(gens, reverse=True)

    # --- save path ------------------------------------------------------------

    def commit(
        self,
        snap: Snapshot,
        *,
        execution_count: int,
        cell: str = "",
        keep: int = 5,
        writer: dict[str, Any] | None = None,
    ) -> CommitResult:
        """Write ``snap`` as the newest generation, then prune to ``keep`` generations.

        Raises :class:`SaveError` (with the previous checkpoint untouched) on any
        failure, such as a full disk.
        """
        started = time.perf_counter()
        try:
            with self.locked():
                result = self._commit_locked(snap, execution_count, cell, writer or {})
                self._prune_locked(keep)
        except CheckpointError:
            raise
        except OSError as exc:
            raise SaveError(f"could not write the checkpoint: {exc.strerror or exc}") from exc
        result.seconds = time.perf_counter() - started
        return result

    def _commit_locked(
        self, snap: Snapshot, execution_count: int, cell: str, writer: dict[str, Any]
    ) -> CommitResult:
        written = 0
        blobs = 0
        touched: set[Path] = set()
        entries = []
        gens = self.generations()
        # When the newest generation failed to load, a blob it shares with this
        # state may be damaged on disk (same name and size, wrong bytes): check
        # the bytes of blobs already there, this once, so that this state is
        # durably saved; and write a new generation rather than refresh that one.
        distrust = bool(gens) and gens[0] in self._found_damaged
        put_blob = self._put_blob_checked if distrust else self._put_blob
        for var in snap.variables:
            entry: dict[str, Any] = {"name": var.name, "type": var.type, "kind": var.kind, "size": var.size}
            if var.kind != "pickle":
                entry["target"] = var.target
                entries.append(entry)
                continue
            entry["digest"] = digest(var.payload)
            if len(var.payload) <= INLINE_MAX_BYTES:
                entry["inline"] = base64.b64encode(var.payload).decode("ascii")
            else:
                n = put_blob(entry["digest"], var.payload, touched)
                written += n
                blobs += n > 0
            if var.buffers:
                entry["buffers"] = []
                for buf in var.buffers:
                    d = digest(buf)
                    n = put_blob(d, buf, touched)
                    written += n
                    blobs += n > 0
                    entry["buffers"].append({"digest": d, "size": buf.nbytes})
            entries.append(entry)
        for folder in touched:
            _fsync_dir(folder)
        if touched:
            _fsync_dir(self.blobs_dir)

        generation = (gens[0] + 1) if gens else 1
        skipped = [{"name": s.name, "type": s.type, "reason": s.reason} for s in snap.skipped]
        previous = self._read_or_none(gens[0]) if gens else None
        unchanged = previous is not None and not distrust and _same_state(previous, entries, skipped)
        newest = previous if unchanged else None
        if newest is not None:
            # Nothing changed since the newest generation: refresh it in place
            # (time, execution count) rather than push real history out; it
            # keeps the cell that made the state.
            generation, cell = gens[0], newest.data.get("cell", "")
        data = {
            "schema": manifest_format.SCHEMA_VERSION,
            "generation": generation,
            "created": time.time(),
            "execution_count": execution_count,
            "identity": self.identity,
            "cell": cell,
            "writer": writer,
            "versions": _versions(snap),
            "variables": entries,
            "skipped": skipped,
        }
        raw = manifest_format.encode(data, self.store.key)
        written += _write_atomically(self._manifest_path(generation), [raw])
        _fsync_dir(self.manifests_dir)
        other = previous.data.get("writer") if previous is not None else None
        if not isinstance(other, dict) or not other or other.get("id") == writer.get("id"):
            other = None
        return CommitResult(Manifest(data), written, blobs, 0.0, other)

    def _read_or_none(self, generation: int) -> Manifest | None:
        try:
            return self.read_manifest(generation)
        except CheckpointError:
            return None

    def _put_blob(self, digest_hex: str, data: Any, touched: set[Path]) -> int:
        path = self._blob_path(digest_hex)
        try:
            info = path.lstat()
        except FileNotFoundError:
            info = None
        if info is not None and stat.S_ISREG(info.st_mode) and info.st_size == memoryview(data).nbytes:
            return 0  # already stored: content-addressed, so identical (unless damaged on disk)
        if info is not None and stat.S_ISDIR(info.st_mode):
            self._set_aside_locked(digest_hex, info)  # a rename cannot replace a directory
        _mkdir(path.parent)
        touched.add(path.parent)
        return _write_atomically(path, [data])

    def _put_blob_checked(self, digest_hex: str, data: Any, touched: set[Path]) -> int:
        """:meth:`_put_blob`, but a blob already there is read back and replaced unless intact."""
        path = self._blob_path(digest_hex)
        with contextlib.suppress(FileNotFoundError):
            info = path.lstat()
            if not self._blob_intact(digest_hex, memoryview(data).nbytes):
                self._set_aside_locked(digest_hex, info)
        return self._put_blob(digest_hex, data, touched)

    def _prune_locked(self, keep: int) -> None:
        """Drop generations beyond ``keep``, then blobs no kept manifest needs."""
        gens = self.generations()
        for gen in gens[max(keep, 1):]:
            with contextlib.suppress(FileNotFoundError):
                self._manifest_path(gen).unlink()
        needed: set[str] | None = set()
        for gen in gens[: max(keep, 1)]:
            named = self._blobs_named_by(gen)
            if named is None:
                needed = None  # cannot tell what it needs: keep every blob this time
                break
            needed |= named
        self._sweep(needed)

    def _blobs_named_by(self, generation: int) -> set[str] | None:
        # Unverified read: used only to decide what to keep, so a bad manifest
        # can at worst keep a blob alive; it never gets a blob unpickled.  One
        # that read_manifest refuses unread (not a regular file, or too big)
        # can never load, so it needs nothing: skip it rather than read a huge
        # file into memory, or wait on a FIFO, at every commit.
        try:
            raw = self._manifest_bytes(generation)
        except CorruptCheckpoint as exc:
            log.warning("%s; its blobs are not kept", exc)
            return set()
        except OSError as exc:
            # Unreadable just now (permissions, I/O error): it may still be a
            # good checkpoint, so None tells the caller to delete no blob.
            log.warning("checkpoint %s: manifest cannot be read (%s); keeping every blob", generation, exc)
            return None
        try:
            body = raw.split(b"\n", 2)[2]
            return manifest_format.referenced_blobs(json.loads(body))
        except (IndexError, ValueError, TypeError, KeyError, AttributeError):
            return set()

    def _sweep(self, needed: set[str] | None) -> tuple[int, int]:
        """Delete unreferenced blobs and crash leftovers (under the lock); ``needed=None``: leftovers only."""
        removed = freed = 0
        for folder in (self.manifests_dir, *self._blob_folders()):
            for entry in os.scandir(folder):
                if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                    continue
                stale = entry.name.startswith(TMP_PREFIX) or (
                    folder != self.manifests_dir and needed is not None and entry.name not in needed
                )
                if stale:
                    with contextlib.suppress(FileNotFoundError):
                        freed += entry.stat(follow_symlinks=False).st_size
                        os.unlink(entry.path)
                        removed += 1
        return removed, freed

    def _blob_folders(self) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(self.blobs_dir) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def read_settings(self) -> dict[str, Any]:
        """This notebook's remembered settings (such as excluded names); {} if none."""
        try:
            data = json.loads((self.dir / "settings.json").read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_settings(self, settings: dict[str, Any]) -> None:
        """Replace this notebook's settings, atomically."""
        self._ensure_dirs()
        _write_atomically(self.dir / "settings.json", [json.dumps(settings, indent=1).encode()])

    def clear(self) -> int:
        """Delete every generation of this notebook; returns bytes freed.

        Callers hold :meth:`locked` (as ``%checkpoint clear`` and
        ``durable-kernel clear`` do), so no commit is half-way meanwhile.
        """
        if not self.dir.exists():
            return 0
        freed = disk_usage(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        return freed

    # --- restore path --------------------------------------------------------

    def read_manifest(self, generation: int) -> Manifest:
        """Read and verify one generation's manifest (nothing is unpickled)."""
        where = f"checkpoint {generation}"
        self._check_safe(self._manifest_path(generation))
        try:
            raw = self._manifest_bytes(generation)
        except OSError as exc:
            raise CorruptCheckpoint(f"{where} cannot be read: {exc.strerror or exc}") from None
        return manifest_format.decode(raw, self.store.key, where)

    def _manifest_bytes(self, generation: int) -> bytes:
        """A manifest's raw bytes, unverified.

        CorruptCheckpoint for one that can never load (gone, a symlink, not a
        regular file, too big), checked on the open file so nothing can be
        swapped in between; OSError for one that cannot be read just now.
        """
        where = f"checkpoint {generation}"
        try:
            fd = os.open(self._manifest_path(generation), _READ_FLAGS)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{where} no longer exists") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # what O_NOFOLLOW says of a symlink
                raise CorruptCheckpoint(f"{where}: manifest is not a regular file (a symlink)") from None
            raise
        with open(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CorruptCheckpoint(f"{where}: manifest is not a regular file")
            if info.st_size > manifest_format.MAX_MANIFEST_BYTES:
                raise CorruptCheckpoint(f"{where}: manifest is implausibly large")
            return f.read(manifest_format.MAX_MANIFEST_BYTES + 1)

    def load(self, generation: int, verify_buffers: bool = True) -> Restored:
        """Verify one generation completely, then unpickle it.

        Raises :class:`CheckpointError` if any part fails verification: then
        nothing of it has been unpickled.  Variables that fail to unpickle
        (say, a module no longer installed) are reported, not raised.
        """
        man = self.read_manifest(generation)
        where = f"checkpoint {generation}"
        entries = {}
        try:
            for var in man.variables:
                if var["kind"] == "pickle":
                    payload = self._payload(var, where)
                    buffers = [self._buffer(b, where, verify_buffers) for b in var.get("buffers", [])]
                    entries[var["name"]] = ("pickle", "", _constant((payload, buffers)))
                else:
                    entries[var["name"]] = (var["kind"], var["target"], _constant((b"", [])))
        except CorruptCheckpoint:
            self._found_damaged.add(generation)
            raise
        types = {v["name"]: v.get("type", "?") for v in man.variables}
        values, failed = Loader(entries).load_all()
        not_restored = [Skipped(s.get("name", "?"), s.get("type", "?"), s.get("reason", "?")) for s in man.skipped]
        not_restored += [Skipped(name, types.get(name, "?"), reason) for name, reason in failed.items()]
        return Restored(man, values, not_restored)

    def load_latest(self, verify_buffers: bool = True) -> Restored | None:
        """The newest generation that loads, falling back past damaged ones.

        Returns None if there is nothing loadable (``fallbacks`` are then lost;
        use :meth:`load_latest_with_reasons` to see them).
        """
        restored, _ = self.load_latest_with_reasons(verify_buffers)
        return restored

    def load_latest_with_reasons(self, verify_buffers: bool = True) -> tuple[Restored | None, list[str]]:
        """Like :meth:`load_latest`, plus one line per generation that failed."""
        reasons: list[str] = []
        for gen in self.generations():
            try:
                restored = self.load(gen, verify_buffers)
            except UnsafeStore:
                raise
            except CheckpointError as exc:
                log.warning("skipping %s: %s", gen, exc)
                reasons.append(str(exc))
                continue
            restored.fallbacks = reasons
            return restored, reasons
        return None, reasons

    def _payload(self, var: dict[str, Any], where: str) -> bytes:
        found = None
        if "inline" in var:
            try:
                payload = base64.b64decode(var["inline"], validate=True)
            except (ValueError, TypeError):
                raise CorruptCheckpoint(f"{where}: variable {var['name']!r} is damaged") from None
        else:
            payload, found = self._read_blob(var, where)
        if digest(payload) != var["digest"]:
            if found is not None:
                self._set_aside(var["digest"], found)
            raise CorruptCheckpoint(f"{where}: variable {var['name']!r} does not match its digest")
        return payload

    def _read_blob(self, var: dict[str, Any], where: str) -> tuple[bytes, os.stat_result]:
        """A payload blob's bytes, and what it was on disk (for :meth:`_set_aside`)."""
        # The recorded size counts the payload and the buffers, so an honest
        # payload is never bigger: refuse a bigger blob unread (it may be huge).
        limit = var.get("size", 0)
        fd, info = self._open_blob(var["digest"], where)
        with open(fd, "rb") as f:
            if info.st_size > limit:
                raise CorruptCheckpoint(
                    f"{where}: blob {var['digest'][:12]} has {info.st_size} bytes, "
                    f"more than the manifest says ({limit})"
                )
            try:
                return f.read(info.st_size + 1), info
            except OSError as exc:
                raise CorruptCheckpoint(
                    f"{where}: blob {var['digest'][:12]} cannot be read: {exc.strerror or exc}"
                ) from None

    def _buffer(self, buf: dict[str, Any], where: str, verify: bool) -> Any:
        fd, info = self._open_blob(buf["digest"], where)
        try:
            size = info.st_size
            if size != buf["size"]:
                raise CorruptCheckpoint(
                    f"{where}: blob {buf['digest'][:12]} has {size} bytes, expected {buf['size']} (truncated?)"
                )
            if size == 0:
                data: Any = bytearray()
            else:
                # A private copy-on-write map: the user may write to a restored
                # array without touching the stored blob, and pages are read
                # only when used.
                data = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            name = f"{where}: blob {buf['digest'][:12]}"
            raise CorruptCheckpoint(f"{name} cannot be read: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if verify and digest(data) != buf["digest"]:
            self._set_aside(buf["digest"], info)
            raise CorruptCheckpoint(f"{where}: blob {buf['digest'][:12]} does not match its digest")
        return data

    def _open_blob(self, digest_hex: str, where: str) -> tuple[int, os.stat_result]:
        """Open a blob for reading: ``(fd, its fstat)``; CorruptCheckpoint unless a regular file."""
        path = self._blob_path(digest_hex)
        name = f"{where}: blob {digest_hex[:12]}"
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{name} is missing") from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # ELOOP: what O_NOFOLLOW says of a symlink
                raise CorruptCheckpoint(f"{name} cannot be read: {exc.strerror or exc}") from None
            with contextlib.suppress(OSError):
                self._set_aside(digest_hex, path.lstat())
            raise CorruptCheckpoint(f"{name} is a symlink") from None
        try:
            info = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise CorruptCheckpoint(f"{name} cannot be read: {exc.strerror or exc}") from None
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            self._set_aside(digest_hex, info)
            raise CorruptCheckpoint(f"{name} is not a regular file")
        return fd, info

    def _blob_intact(self, digest_hex: str, size: int) -> bool:
        """True if the stored blob is a regular file holding exactly the bytes ``digest_hex`` names."""
        try:
            with open(os.open(self._blob_path(digest_hex), _READ_FLAGS), "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                    return False
                if size == 0:
                    return digest(b"") == digest_hex
                with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as data:
                    return digest(data) == digest_hex
        except OSError:
            return False

    def _set_aside(self, digest_hex: str, found: os.stat_result) -> None:
        """Move a blob found damaged while loading out of the way, so the next commit writes it again.

        Only for proof that the file itself is bad (its bytes do not hash to
        its name, or it is not a regular file), never for a size that differs
        from what one manifest says: that manifest may be the wrong one, and
        other generations may need the blob.  A blob of the wrong size needs
        no help anyway: a commit rewrites a blob whose size is not the data's.

        Only under the lock, so that no commit is deciding meanwhile that the
        blob is already stored.  If the lock is busy the blob is left where it
        is; when it belongs to the newest generation, the next commit checks
        the bytes of the blobs it reuses anyway (see _commit_locked).
        """
        try:
            with self.locked(wait=False) as held:
                if held:
                    self._set_aside_locked(digest_hex, found)
        except OSError as exc:
            log.warning("could not set aside damaged blob %s: %s", digest_hex[:12], exc)

    def _set_aside_locked(self, digest_hex: str, found: os.stat_result) -> None:
        # Renamed to a temp name, which the next prune sweeps away; and only if
        # it is still the file found damaged, never a good one written since.
        path = self._blob_path(digest_hex)
        try:
            now = path.lstat()
            if (now.st_dev, now.st_ino) != (found.st_dev, found.st_ino):
                return
            if stat.S_ISDIR(now.st_mode):
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # the sweep deletes files only: leave no empty directory behind
                    return
            os.rename(path, path.with_name(f"{TMP_PREFIX}damaged-{secrets.token_hex(4)}"))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not set aside damaged blob %s: %s", digest_hex[:12], exc)

    def _check_safe(self, path: Path) -> None:
        """Refuse a store other users could have written into."""
        for folder in (self.store.root, self.dir, self.manifests_dir):
            try:
                mode = folder.stat().st_mode
            except FileNotFoundError:
                continue
            if mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise UnsafeStore(
                    f"{folder} can be written by other users, so its checkpoints cannot be trusted; "
                    f"fix it with: chmod go-w {folder}"
                )


def _same_state(newest: Manifest, entries: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> bool:
    """True if ``newest`` stores exactly the state described by ``entries`` and ``skipped``."""
    return manifest_format.fingerprint(newest.data) == manifest_format.fingerprint({"variables": entries}) and sorted(
        s["name"] for s in newest.skipped
    ) == sorted(s["name"] for s in skipped)


def _constant(value: Any):
    return lambda: value


def disk_usage(path: Path) -> int:
    """Bytes used by the files under ``path``."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


_static_versions: dict[str, str] | None = None


def _versions(snap: Snapshot) -> dict[str, Any]:
    global _static_versions
    if _static_versions is None:
        from importlib import metadata

        _static_versions = {"python": sys.version.split()[0]}
        for dist in ("dill", "durable-kernel"):
            try:
                _static_versions[dist.replace("-", "_")] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                _static_versions[dist.replace("-", "_")] = "unknown"
    packages = {}
    for var in snap.variables:
        root = var.type.split(".", 1)[0] if var.kind == "pickle" else var.target.split(".", 1)[0]
        module = sys.modules.get(root)
        version = getattr(module, "__version__", None)
        if isinstance(version, str):
            packages[root] = version
    return {**_static_versions, "packages": packages}
