"""The on-disk store: content-addressed blobs, signed manifests, atomic commits.

Layout under the root folder (folders 0700, files 0600)::

    <root>/<key>/                 one folder per notebook; key = hash of its identity
        lock                      flock'd while committing, pruning or clearing
        saving                    flock'd (shared) by every checkpoint process while it lives
        manifests/<gen>.manifest  one per kept generation (see manifest.py)
        blobs/<d[:2]>/<d>         pickles and raw buffers, named by BLAKE3 digest d

Commit order, so that a crash at any instant leaves the newest committed
checkpoint loadable: each blob is written to a temp file in its folder,
fsynced and renamed to its digest; the folders are fsynced; then the manifest
is written the same way and its rename is the commit point.  Blobs already
present are not written again, which is what makes a checkpoint after a small
change cost little; a present blob is trusted only if it is the user's own and
its file is unchanged since a checkpoint recorded it (same inode and change
time), otherwise its bytes are checked and, if damaged, written again.

Nothing that could not be verified is ever deleted: retention counts only
checkpoints signed with this user's key, so a changed key, a copied store or
a newer schema never costs the checkpoints it cannot read.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import blake3

from . import manifest as manifest_format
from .errors import CheckpointError, CorruptCheckpoint, SaveError, UnsafeStore, UntrustedCheckpoint
from .files import READ_FLAGS, TMP_PREFIX, check_private, foreign, fsync_dir, make_private_dirs, write_atomically
from .manifest import Manifest, storage_key
from .serialize import Loader, Skipped, Snapshot

log = logging.getLogger(__name__)

#: Payloads up to this size live inside the manifest instead of a blob file.
INLINE_MAX_BYTES = 16 * 1024
#: Hash big buffers on all cores; below this the thread start-up costs more.
_PARALLEL_HASH_BYTES = 8 << 20
_MANIFEST_SUFFIX = ".manifest"
_GENERATION_FILE = re.compile(r"^([0-9]{1,18})\.manifest$")

__all__ = ["CommitResult", "NotebookStore", "Restored", "Store", "digest", "disk_usage", "storage_key"]

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


def _stamp(info: os.stat_result) -> list[int]:
    """What changes whenever a file is written, replaced or re-linked."""
    return [info.st_ino, info.st_ctime_ns]


@dataclass
class CommitResult:
    """What a commit did: the manifest and how many bytes hit the disk."""

    manifest: Manifest
    bytes_written: int
    blobs_written: int
    seconds: float
    #: the writer of the generation before this one, if another kernel wrote it
    other_writer: dict[str, Any] | None = None
    #: names whose stored copy was found damaged on disk and written again
    repaired: list[str] = field(default_factory=list)
    #: True if this kernel had already committed a newer state: nothing was written
    superseded: bool = False


@dataclass
class Restored:
    """A loaded checkpoint: the values, what did not come back, what was tried."""

    manifest: Manifest
    values: dict[str, Any]
    not_restored: list[Skipped]
    #: one line per newer generation that could not be loaded, and why
    fallbacks: list[str] = field(default_factory=list)
    #: variables whose stored data verified but could not be unpickled (a module
    #: missing, a class gone): name -> manifest entry, to carry forward unchanged
    unloaded: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: variables whose stored data is damaged: name -> reason
    damaged: dict[str, str] = field(default_factory=dict)


class Store:
    """All notebooks' checkpoints under one root folder."""

    def __init__(self, root: Path | str, key: bytes, key_problem: str | None = None):
        self.root = Path(root)
        self.key = key
        #: why this user's key could not be read (then ``key`` verifies nothing)
        self.key_problem = key_problem

    def notebook(self, identity: str) -> "NotebookStore":
        """The checkpoints of one notebook identity."""
        return NotebookStore(self, identity)

    def notebook_at(self, folder: Path, identity: str | None = None) -> "NotebookStore":
        """The checkpoints in one notebook folder, whatever identity it was stored under."""
        return NotebookStore(self, identity or "", folder=folder)

    def notebook_dirs(self) -> list[Path]:
        """Every notebook folder in the store."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        return sorted(
            Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and os.path.isdir(Path(e.path, "manifests"))
        )


class NotebookStore:
    """One notebook's generations: commit, list, load, prune, clear."""

    def __init__(self, store: Store, identity: str, folder: Path | None = None):
        self.store = store
        self.identity = identity
        self.dir = folder if folder is not None else store.root / storage_key(identity)
        self.manifests_dir = self.dir / "manifests"
        self.blobs_dir = self.dir / "blobs"
        #: digests of blobs this object found damaged while loading: the next
        #: commit checks their bytes even if their file looks unchanged
        self._damaged: set[str] = set()

    # --- layout -------------------------------------------------------------

    def blob_path(self, digest_hex: str) -> Path:
        """Where the blob named ``digest_hex`` lives."""
        return self.blobs_dir / digest_hex[:2] / digest_hex

    def manifest_path(self, generation: int) -> Path:
        """Where generation ``generation``'s manifest lives."""
        return self.manifests_dir / f"{generation:012d}{_MANIFEST_SUFFIX}"

    def _ensure_dirs(self) -> None:
        make_private_dirs(self.store.root)
        for path in (self.dir, self.manifests_dir, self.blobs_dir):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)

    @contextlib.contextmanager
    def locked(self, wait: bool = True, create: bool = True) -> Iterator[bool]:
        """Hold this notebook's lock: one committer or pruner at a time.

        With ``wait=False`` it yields False at once if someone else holds it.
        With ``create=False`` (clearing, collecting) a notebook folder that is
        gone is not made again: FileNotFoundError.
        """
        if create:
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

    def hold_saving(self) -> int | None:
        """Open and share-lock this notebook's ``saving`` file; returns the fd (or None).

        A checkpoint process keeps the fd for its whole life (it is inherited
        across fork), so :meth:`wait_for_savers` can wait until every
        checkpoint that was started has finished, even after its kernel exited.
        """
        try:
            self._ensure_dirs()
            fd = os.open(self.dir / "saving", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # someone is waiting for the savers this instant: the commit lock still orders us
        return fd

    def wait_for_savers(self, timeout: float) -> bool | None:
        """Wait until no checkpoint process of this notebook is alive.

        Returns None if none was running, True if one was and has finished,
        False if one is still running after ``timeout`` seconds.
        """
        try:
            fd = os.open(self.dir / "saving", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                time.sleep(0.05)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    continue
            return False
        except OSError:
            return None
        finally:
            os.close(fd)  # releases the lock at once: savers that start later share it again

    def generations(self) -> list[int]:
        """Committed generation numbers, newest first."""
        try:
            names = os.listdir(self.manifests_dir)
        except OSError:
            return []
        return sorted((int(m.group(1)) for m in map(_GENERATION_FILE.match, names) if m), reverse=True)

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
        failure, such as a full disk.  If this kernel (``writer["id"]``) already
        committed a state taken later (``writer["seq"]``), nothing is written.
        """
        started = time.perf_counter()
        try:
            with self.locked():
                # Leftovers of crashed commits first: on a small disk they are
                # what keeps this commit from fitting.
                self.remove(self.sweep_plan(None))
                result = self._commit_locked(snap, execution_count, cell, writer or {}, keep)
        except CheckpointError:
            raise
        except OSError as exc:
            raise SaveError(f"could not write the checkpoint: {exc.strerror or exc}") from exc
        result.seconds = time.perf_counter() - started
        return result

    def _commit_locked(
        self, snap: Snapshot, execution_count: int, cell: str, writer: dict[str, Any], keep: int
    ) -> CommitResult:
        gens = self.generations()
        kept = {gen: self._signed_or_none(gen) for gen in gens}
        previous = next((data for data in kept.values() if data is not None), None)
        if previous is not None and _newer_from_same_writer(previous.get("writer"), writer):
            return CommitResult(Manifest(previous), 0, 0, 0.0, superseded=True)
        known: dict[str, list[int]] = {}
        for data in reversed(kept.values()):
            if data is not None:
                known.update(_stamps_named_by(data))
        writing = _BlobWriter(self, known)
        entries = []
        skipped = [{"name": s.name, "type": s.type, "reason": s.reason} for s in snap.skipped]
        for var in snap.variables:
            if var.stored is not None:
                entry = writing.carry(var.stored)
                if entry is None:
                    skipped.append({"name": var.name, "type": var.type, "reason": "its saved data is damaged"})
                else:
                    entries.append({**entry, "name": var.name})
                continue
            entry: dict[str, Any] = {"name": var.name, "type": var.type, "kind": var.kind, "size": var.size}
            if var.kind != "pickle":
                entry["target"] = var.target
                entries.append(entry)
                continue
            entry["digest"] = digest(var.payload)
            if len(var.payload) <= INLINE_MAX_BYTES:
                entry["inline"] = base64.b64encode(var.payload).decode("ascii")
            else:
                entry["stamp"] = writing.put(entry["digest"], var.payload, var.name)
            if var.buffers:
                entry["buffers"] = []
                for buf in var.buffers:
                    d = digest(buf)
                    entry["buffers"].append({"digest": d, "size": buf.nbytes, "stamp": writing.put(d, buf, var.name)})
            entries.append(entry)
        for folder in writing.touched:
            fsync_dir(folder)
        if writing.touched:
            fsync_dir(self.blobs_dir)

        generation = (gens[0] + 1) if gens else 1
        newest = previous if gens and previous is not None and previous.get("generation") == gens[0] else None
        if newest is not None and _same_state(newest, entries, skipped):
            # Nothing changed since the newest generation: refresh it in place
            # (time, execution count, file stamps) rather than push real
            # history out; it keeps the cell that made the state.
            generation, cell = gens[0], newest.get("cell", "")
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
        written = writing.written + write_atomically(self.manifest_path(generation), [raw])
        fsync_dir(self.manifests_dir)
        kept[generation] = data
        self._prune_locked(keep, kept)
        other = previous.get("writer") if previous is not None else None
        if not isinstance(other, dict) or not other or other.get("id") == writer.get("id"):
            other = None
        self._damaged -= writing.checked
        return CommitResult(Manifest(data), written, writing.blobs, 0.0, other, sorted(writing.repaired))

    def _signed_or_none(self, generation: int) -> dict[str, Any] | None:
        """A manifest's JSON if it is signed with this key and readable by this version, else None."""
        try:
            return manifest_format.signed_data(
                self._manifest_bytes(generation), self.store.key, f"checkpoint {generation}",
                generation=generation, folder=self.dir.name,
            )
        except (CheckpointError, OSError):
            return None

    def _prune_locked(self, keep: int, signed: dict[int, dict[str, Any] | None] | None = None) -> None:
        """Drop verified generations beyond ``keep``, then blobs no kept manifest needs.

        ``signed`` maps each generation to its verified JSON (None: it does not
        verify); read here if not given.  A manifest that does not verify (another key, a newer schema,
        unreadable just now) neither counts nor is deleted: it may be good with
        the right key or version, and so are the blobs it names.
        """
        if signed is None:
            signed = {gen: self._signed_or_none(gen) for gen in self.generations()}
        verified = [gen for gen in sorted(signed, reverse=True) if signed[gen] is not None]
        for gen in verified[max(keep, 1):]:
            with contextlib.suppress(FileNotFoundError):
                self.manifest_path(gen).unlink()
            del signed[gen]
        needed, _ = self.blobs_needed(signed)
        self.remove(self.sweep_plan(needed))

    def blobs_needed(
        self, signed: dict[int, dict[str, Any] | None] | None = None
    ) -> tuple[set[str] | None, list[str]]:
        """The blobs the kept manifests name, and one line per manifest that could not be read.

        None instead of a set means some manifest cannot be read now: keep
        every blob.  Manifests that do not verify still keep their blobs (read
        unverified, only to decide what to keep: a bad manifest can at worst
        keep a blob alive, never get one unpickled).  ``signed`` is what the
        caller already verified (generation -> JSON, or None).
        """
        if signed is None:
            signed = {gen: self._signed_or_none(gen) for gen in self.generations()}
        needed: set[str] | None = set()
        problems: list[str] = []
        for gen, data in signed.items():
            named = manifest_format.referenced_blobs(data) if data is not None else self._blobs_named_unverified(gen, problems)
            if named is None or needed is None:
                needed = None
            else:
                needed |= named
        return needed, problems

    def _blobs_named_unverified(self, generation: int, problems: list[str]) -> set[str] | None:
        """Blobs an unverifiable manifest names; None if that cannot be told (keep them all).

        One that can never load (gone, not a regular file, too big) needs nothing.
        """
        try:
            raw = self._manifest_bytes(generation)
        except CorruptCheckpoint as exc:
            log.warning("%s; its blobs are not kept", exc)
            return set()
        except OSError as exc:
            problems.append(f"checkpoint {generation} cannot be read: {exc.strerror or exc}")
            return None
        try:
            return manifest_format.referenced_blobs(json.loads(manifest_format.body_of(raw)))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            problems.append(f"checkpoint {generation} cannot be parsed ({exc})")
            return None

    def sweep_plan(self, needed: set[str] | None) -> list[tuple[Path, int]]:
        """What a sweep removes: ``(path, bytes)`` of blobs not in ``needed`` and of
        crash leftovers (temp files) among manifests and blobs; ``needed=None``:
        leftovers only.  Deleting happens in :meth:`remove`, under the lock."""
        plan = []
        for folder in (self.manifests_dir, *self.blob_folders()):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                    continue
                if entry.name.startswith(TMP_PREFIX) or (
                    folder != self.manifests_dir and needed is not None and entry.name not in needed
                ):
                    with contextlib.suppress(FileNotFoundError):
                        plan.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        return plan

    @staticmethod
    def remove(plan: list[tuple[Path, int]]) -> tuple[int, int]:
        """Delete what :meth:`sweep_plan` listed: ``(files removed, bytes freed)``."""
        removed = freed = 0
        for path, size in plan:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
                freed += size
        return removed, freed

    def blob_folders(self) -> list[Path]:
        """The ``blobs/<2 hex>`` folders."""
        try:
            return [Path(e.path) for e in os.scandir(self.blobs_dir) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return []

    def blob_names(self) -> set[str]:
        """The names of every stored blob (temp files left out)."""
        names: set[str] = set()
        for folder in self.blob_folders():
            with contextlib.suppress(OSError):
                names |= {e.name for e in os.scandir(folder) if not e.name.startswith(TMP_PREFIX)}
        return names

    def read_settings(self) -> dict[str, Any]:
        """This notebook's remembered settings (such as excluded names); {} if none."""
        try:
            with open(os.open(self.dir / "settings.json", READ_FLAGS), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    return {}
                data = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_settings(self, settings: dict[str, Any]) -> None:
        """Replace this notebook's settings, atomically."""
        self._ensure_dirs()
        write_atomically(self.dir / "settings.json", [json.dumps(settings, indent=1).encode()])

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
        self.check_safe()
        try:
            raw = self._manifest_bytes(generation)
        except OSError as exc:
            raise CorruptCheckpoint(f"{where} cannot be read: {exc.strerror or exc}") from None
        return manifest_format.decode(raw, self.store.key, where, generation=generation, folder=self.dir.name)

    def _manifest_bytes(self, generation: int) -> bytes:
        """A manifest's raw bytes, unverified.

        CorruptCheckpoint for one that can never load (gone, a symlink, not a
        regular file, too big, another user's), checked on the open file so
        nothing can be swapped in between; OSError for one that cannot be read
        just now.
        """
        where = f"checkpoint {generation}"
        try:
            fd = os.open(self.manifest_path(generation), READ_FLAGS)
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
            problem = foreign(info)
            if problem:
                raise UntrustedCheckpoint(f"{where}: its manifest {problem}; it was not loaded")
            if info.st_size > manifest_format.MAX_MANIFEST_BYTES:
                raise CorruptCheckpoint(f"{where}: manifest is implausibly large")
            return f.read(manifest_format.MAX_MANIFEST_BYTES + 1)

    def manifest_bytes_unverified(self, generation: int) -> bytes:
        """A manifest file's bytes for tools that only decide what to keep (never to load).

        The same guarded read the loader uses: a FIFO, symlink or huge file
        planted as a manifest raises :class:`CorruptCheckpoint` instead of hanging.
        """
        return self._manifest_bytes(generation)

    def load(self, generation: int, verify_buffers: bool = True) -> Restored:
        """Verify one generation's manifest, then unpickle each variable whose data verifies.

        Raises :class:`CheckpointError` if the manifest fails verification: then
        nothing of it has been unpickled.  A variable whose blob is damaged,
        missing or not the user's own is not unpickled either: it is reported
        in ``damaged`` and costs only itself and the variables that refer to it.
        Variables that verify but fail to unpickle (say, a module no longer
        installed) are reported in ``not_restored`` and kept in ``unloaded``.

        With ``verify_buffers=False`` a buffer is hashed only if its file
        changed since it was committed (another inode or change time).
        """
        man = self.read_manifest(generation)
        where = f"checkpoint {generation}"
        reading = _BlobReader(self, where, verify_buffers)
        entries = {}
        damaged: dict[str, str] = {}
        for var in man.variables:
            if var["kind"] != "pickle":
                entries[var["name"]] = (var["kind"], var["target"], _constant((b"", [])))
                continue
            try:
                payload = reading.payload(var)
                buffers = [reading.buffer(b) for b in var.get("buffers", [])]
            except CorruptCheckpoint as exc:
                damaged[var["name"]] = str(exc).removeprefix(f"{where}: ")
                continue
            entries[var["name"]] = ("pickle", "", _constant((payload, buffers)))
        types = {v["name"]: v.get("type", "?") for v in man.variables}
        versions = man.data.get("versions")
        written = versions.get("python") if isinstance(versions, dict) else None
        # A variable carried forward unloaded keeps the Python that pickled it.
        python = {v["name"]: v.get("python", written) for v in man.variables if v["kind"] == "pickle"}
        values, failed = Loader(entries, python).load_all()
        by_name = {v["name"]: v for v in man.variables}
        not_restored = [Skipped(s.get("name", "?"), s.get("type", "?"), s.get("reason", "?")) for s in man.skipped]
        not_restored += [
            Skipped(name, types.get(name, "?"), f"its saved data is damaged ({reason})") for name, reason in damaged.items()
        ]
        not_restored += [Skipped(name, types.get(name, "?"), reason) for name, reason in failed.items()]
        unloaded = {name: _with_python(by_name[name], python.get(name)) for name in failed if name in by_name}
        return Restored(man, values, not_restored, unloaded=unloaded, damaged=damaged)

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

    def older_copies(self, names: list[str], newer_than: int) -> dict[str, int]:
        """For each name, the newest generation before ``newer_than`` that stores another
        version of it whose data is intact (checked by digest); names with none are left out."""
        found: dict[str, int] = {}
        try:
            reference = manifest_format.fingerprint(self.read_manifest(newer_than).data)
        except CheckpointError:
            reference = {}
        for gen in self.generations():
            if gen >= newer_than or len(found) == len(names):
                continue
            try:
                man = self.read_manifest(gen)
            except CheckpointError:
                continue
            prints = manifest_format.fingerprint(man.data)
            reading = _BlobReader(self, f"checkpoint {gen}", True)
            for var in man.variables:
                name = var["name"]
                if name not in names or name in found or prints.get(name) == reference.get(name):
                    continue
                if var["kind"] != "pickle":
                    found[name] = gen
                    continue
                with contextlib.suppress(CorruptCheckpoint):
                    reading.payload(var)
                    for buf in var.get("buffers", []):
                        reading.buffer(buf)
                    found[name] = gen
        return found

    def check_safe(self) -> None:
        """Refuse a store whose folders other users own or could write into."""
        for folder in (self.store.root, self.dir, self.manifests_dir, self.blobs_dir):
            check_private(folder)

    def check_safe_to_delete(self) -> None:
        """:meth:`check_safe`, and no symlinked folder a deletion could be led through."""
        self.check_safe()
        for folder in (self.dir, self.manifests_dir, self.blobs_dir):
            if folder.is_symlink():
                raise UnsafeStore(f"{folder} is a symlink; refusing to delete anything through it")

    def set_aside(self, digest_hex: str, found: os.stat_result) -> None:
        """Move a blob found damaged while loading out of the way, so the next commit writes it again.

        Only for proof that the file itself is bad (its bytes do not hash to
        its name, it is not a regular file, it is not the user's own), never
        for a size that differs from what one manifest says: that manifest may
        be the wrong one, and other generations may need the blob.

        Only under the lock, so that no commit is deciding meanwhile that the
        blob is already stored.  If the lock is busy the blob is left where it
        is; the next commit checks it anyway (it is remembered as damaged).
        """
        self._damaged.add(digest_hex)
        try:
            with self.locked(wait=False) as held:
                if held:
                    self._set_aside_locked(digest_hex, found)
        except OSError as exc:
            log.warning("could not set aside damaged blob %s: %s", digest_hex[:12], exc)

    def _set_aside_locked(self, digest_hex: str, found: os.stat_result) -> None:
        # Renamed to a temp name, which the next sweep removes; and only if it
        # is still the file found damaged, never a good one written since.
        path = self.blob_path(digest_hex)
        try:
            now = path.lstat()
            if (now.st_dev, now.st_ino) != (found.st_dev, found.st_ino):
                return
            if stat.S_ISDIR(now.st_mode):
                aside = path.with_name(f"{TMP_PREFIX}damaged-{secrets.token_hex(4)}")
                os.rename(path, aside)
                shutil.rmtree(aside, ignore_errors=True)  # the sweep deletes files only
                return
            os.rename(path, path.with_name(f"{TMP_PREFIX}damaged-{secrets.token_hex(4)}"))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not set aside damaged blob %s: %s", digest_hex[:12], exc)


class _BlobWriter:
    """Puts a commit's blobs: writes what is missing, checks what it reuses."""

    def __init__(self, nb: NotebookStore, known: dict[str, list[int]]):
        self.nb = nb
        #: digest -> stamp of its file as a kept checkpoint recorded it
        self.known = known
        self.touched: set[Path] = set()
        self.written = 0
        self.blobs = 0
        #: digests whose stored bytes were read back and checked
        self.checked: set[str] = set()
        #: names whose stored copy was damaged and has been written again
        self.repaired: set[str] = set()
        self._stamps: dict[str, list[int]] = {}

    def put(self, digest_hex: str, data: Any, name: str) -> list[int]:
        """Make sure blob ``digest_hex`` holds ``data``; returns its file's stamp."""
        if digest_hex in self._stamps:  # the same buffer twice in this commit
            return self._stamps[digest_hex]
        path = self.nb.blob_path(digest_hex)
        size = memoryview(data).nbytes
        try:
            info: os.stat_result | None = path.lstat()
        except FileNotFoundError:
            info = None
        if info is not None and self._trusted(digest_hex, info, size, name):
            stamp = _stamp(info)
        else:
            if info is not None and stat.S_ISDIR(info.st_mode):
                self.nb._set_aside_locked(digest_hex, info)  # a rename cannot replace a directory
            make_private_dirs(path.parent)
            self.touched.add(path.parent)
            self.written += write_atomically(path, [data])  # a rename replaces a bad file
            self.blobs += 1
            stamp = _stamp(path.lstat())
        self._stamps[digest_hex] = stamp
        return stamp

    def _trusted(self, digest_hex: str, info: os.stat_result, size: int, name: str) -> bool:
        """Can the file already there be reused as the blob ``digest_hex``?"""
        if not stat.S_ISREG(info.st_mode) or info.st_size != size or foreign(info):
            return False
        if self._intact(digest_hex, info, self.known.get(digest_hex)):
            return True
        log.warning("blob %s was damaged on disk; writing it again", digest_hex[:12])
        self.repaired.add(name)
        return False

    def _intact(self, digest_hex: str, info: os.stat_result, stamp: Any) -> bool:
        """Does this regular file hold the bytes ``digest_hex`` names? Read only when in doubt."""
        if stamp == _stamp(info) and digest_hex not in self.nb._damaged:
            return True  # unchanged since a checkpoint recorded it
        self.checked.add(digest_hex)
        return _file_digest(self.nb.blob_path(digest_hex), info.st_size) == digest_hex

    def carry(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """A manifest entry of an earlier checkpoint, kept as it was (its blobs still there)."""
        out = dict(entry)
        if entry.get("kind") != "pickle":  # a module or an alias: a name, no data
            return out
        digests = [] if "inline" in entry else [(entry["digest"], entry.get("size", 0), out)]
        out["buffers"] = [dict(b) for b in entry.get("buffers", [])]
        digests += [(b["digest"], b["size"], b) for b in out["buffers"]]
        if not out["buffers"]:
            del out["buffers"]
        for digest_hex, size, holder in digests:
            try:
                info = self.nb.blob_path(digest_hex).lstat()
            except OSError:
                return None
            # A payload blob's size is at most the variable's; a buffer's is exact.
            fits = info.st_size <= size if holder is out else info.st_size == size
            stamp = holder.get("stamp") or self.known.get(digest_hex)
            if not (stat.S_ISREG(info.st_mode) and fits and not foreign(info) and self._intact(digest_hex, info, stamp)):
                return None
            holder["stamp"] = _stamp(info)
        return out


class _BlobReader:
    """Reads and verifies one generation's blobs for :meth:`NotebookStore.load`."""

    def __init__(self, nb: NotebookStore, where: str, verify_buffers: bool):
        self.nb = nb
        self.where = where
        self.verify_buffers = verify_buffers
        self._folders_checked: set[Path] = set()

    def payload(self, var: dict[str, Any]) -> bytes:
        found = None
        if "inline" in var:
            try:
                payload = base64.b64decode(var["inline"], validate=True)
            except (ValueError, TypeError):
                raise CorruptCheckpoint(f"{self.where}: variable {var['name']!r} is damaged") from None
        else:
            payload, found = self._read_blob(var)
        if digest(payload) != var["digest"]:
            if found is not None:
                self.nb.set_aside(var["digest"], found)
            raise CorruptCheckpoint(f"{self.where}: variable {var['name']!r} does not match its digest")
        return payload

    def _read_blob(self, var: dict[str, Any]) -> tuple[bytes, os.stat_result]:
        """A payload blob's bytes, and what it was on disk (for set_aside)."""
        # The recorded size counts the payload and the buffers, so an honest
        # payload is never bigger: refuse a bigger blob unread (it may be huge).
        limit = var.get("size", 0)
        fd, info = self._open(var["digest"])
        with open(fd, "rb") as f:
            if info.st_size > limit:
                raise CorruptCheckpoint(
                    f"{self.where}: blob {var['digest'][:12]} has {info.st_size} bytes, "
                    f"more than the manifest says ({limit})"
                )
            try:
                return f.read(info.st_size + 1), info
            except OSError as exc:
                raise CorruptCheckpoint(
                    f"{self.where}: blob {var['digest'][:12]} cannot be read: {exc.strerror or exc}"
                ) from None

    def buffer(self, buf: dict[str, Any]) -> Any:
        fd, info = self._open(buf["digest"])
        try:
            size = info.st_size
            if size != buf["size"]:
                raise CorruptCheckpoint(
                    f"{self.where}: blob {buf['digest'][:12]} has {size} bytes, expected {buf['size']} (truncated?)"
                )
            if size == 0:
                data: Any = bytearray()
            else:
                # A private copy-on-write map: the user may write to a restored
                # array without touching the stored blob, and pages are read
                # only when used.  Never of a file others can write (_open).
                data = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            name = f"{self.where}: blob {buf['digest'][:12]}"
            raise CorruptCheckpoint(f"{name} cannot be read: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        unchanged = buf.get("stamp") == _stamp(info) and buf["digest"] not in self.nb._damaged
        if (self.verify_buffers or not unchanged) and digest(data) != buf["digest"]:
            self.nb.set_aside(buf["digest"], info)
            raise CorruptCheckpoint(f"{self.where}: blob {buf['digest'][:12]} does not match its digest")
        return data

    def _open(self, digest_hex: str) -> tuple[int, os.stat_result]:
        """Open a blob for reading: ``(fd, its fstat)``; CorruptCheckpoint unless a regular file of the user's."""
        path = self.nb.blob_path(digest_hex)
        name = f"{self.where}: blob {digest_hex[:12]}"
        if path.parent not in self._folders_checked:
            try:
                problem = foreign(path.parent.lstat())
            except OSError:
                problem = None  # the open below says what is wrong
            if problem:
                raise CorruptCheckpoint(f"{name}: its folder {problem}")
            self._folders_checked.add(path.parent)
        try:
            fd = os.open(path, READ_FLAGS)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{name} is missing") from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # ELOOP: what O_NOFOLLOW says of a symlink
                raise CorruptCheckpoint(f"{name} cannot be read: {exc.strerror or exc}") from None
            with contextlib.suppress(OSError):
                self.nb.set_aside(digest_hex, path.lstat())
            raise CorruptCheckpoint(f"{name} is a symlink") from None
        try:
            info = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise CorruptCheckpoint(f"{name} cannot be read: {exc.strerror or exc}") from None
        problem = "is not a regular file" if not stat.S_ISREG(info.st_mode) else foreign(info)
        if problem:
            os.close(fd)
            self.nb.set_aside(digest_hex, info)
            raise CorruptCheckpoint(f"{name} {problem}")
        return fd, info


def _file_digest(path: Path, size: int) -> str | None:
    """BLAKE3 of a file's bytes, read through a private map; None if it cannot be read."""
    try:
        with open(os.open(path, READ_FLAGS), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                return None
            if size == 0:
                return digest(b"")
            with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as data:
                return digest(data)
    except OSError:
        return None


def _stamps_named_by(data: dict[str, Any]) -> dict[str, list[int]]:
    found = {}
    for var in data.get("variables", []):
        if "stamp" in var and "inline" not in var:
            found[var["digest"]] = var["stamp"]
        for buf in var.get("buffers", []):
            if "stamp" in buf:
                found[buf["digest"]] = buf["stamp"]
    return found


def _with_python(entry: dict[str, Any], version: Any) -> dict[str, Any]:
    """A stored variable's entry, naming the Python that pickled it (so that a later
    checkpoint written by another Python, which carries it forward, still knows)."""
    if entry.get("kind") != "pickle" or "python" in entry or not isinstance(version, str):
        return entry
    return {**entry, "python": version}


def _newer_from_same_writer(previous: Any, writer: dict[str, Any]) -> bool:
    """Did the kernel committing now already commit a state it took later?"""
    return (
        isinstance(previous, dict)
        and previous.get("id") is not None
        and previous.get("id") == writer.get("id")
        and isinstance(previous.get("seq"), int)
        and isinstance(writer.get("seq"), int)
        and previous["seq"] > writer["seq"]
    )


def _same_state(newest: dict[str, Any], entries: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> bool:
    """True if ``newest`` stores exactly the state described by ``entries`` and ``skipped``."""
    return manifest_format.fingerprint(newest) == manifest_format.fingerprint({"variables": entries}) and sorted(
        s.get("name") for s in newest.get("skipped", [])
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
