"""Commit and load: the save path's end and the restore path's start.

Save path: :func:`serialize.snapshot` then :meth:`NotebookStore.commit`, which
writes the blobs a checkpoint needs (``blobs.py``), then its signed manifest
(``manifest.py``) as the commit point, then prunes (``retention.py``).  Restore
path: :meth:`NotebookStore.load_latest_with_reasons`.  The files' layout,
locks and safety checks are ``folder.py``; the byte-level operations
``backend.py``.

Commit order, so that a crash at any instant leaves the newest committed
checkpoint loadable: each blob is written to a temp file in its folder,
fsynced and renamed to its digest; the folders are fsynced; then the manifest
is written the same way and its rename is the commit point.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import buffers_first, chunking, equivalence, mapping, retention, tracking
from . import manifest as manifest_format
from .blobs import BlobReader, BlobWriter, KnownStamps, digest, digests
from .errors import CheckpointError, CorruptCheckpoint, ReleasedTooEarly, SaveError, UnsafeStore
from .files import disk_usage
from .folder import NotebookFolder
from .manifest import Manifest, folder_name
from .serialize import Loader, Skipped, Snapshot, Variable

log = logging.getLogger(__name__)

#: Payloads up to this size live inside the manifest instead of a blob file.
INLINE_MAX_BYTES = 16 * 1024
#: Bytes of changed pickles a commit reads to tell whether they hold the same value as stored
#: (``equivalence.py``; about 0.3 s at most).
COMPARE_MAX_BYTES = 512 * 1024

__all__ = ["CommitResult", "NotebookStore", "Restored", "Store", "digest", "disk_usage", "folder_name"]


@dataclass
class CommitResult:
    """What a commit did: the manifest and how many bytes hit the disk."""

    manifest: Manifest
    bytes_written: int
    blobs_written: int
    seconds: float
    #: the writer of the checkpoint before this one, if another kernel wrote it
    other_writer: dict[str, Any] | None = None
    #: names whose stored copy was found damaged on disk and written again
    repaired: list[str] = field(default_factory=list)
    #: True if this kernel had already committed a newer state: nothing was written
    superseded: bool = False
    #: chunks this process may back by their blob files (``mapping.adoptable``, one item per buffer)
    adoptable: list[Any] = field(default_factory=list)
    #: bytes of out-of-band buffers read and hashed (chunks known unchanged are not)
    bytes_hashed: int = 0
    #: arrays backed by a chunk file someone changed in place: their values in memory changed with it
    backing_changed: list[str] = field(default_factory=list)


@dataclass
class Restored:
    """A loaded checkpoint: the values, what did not come back, what was tried."""

    manifest: Manifest
    values: dict[str, Any]
    not_restored: list[Skipped]
    #: one line per newer checkpoint that could not be loaded, and why
    fallbacks: list[str] = field(default_factory=list)
    #: variables whose stored data verified but could not be unpickled (a module
    #: missing, a class gone): name -> manifest entry, to carry forward unchanged
    unloaded: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: variables whose stored data is damaged: name -> reason
    damaged: dict[str, str] = field(default_factory=dict)


class Store:
    """All notebooks' checkpoints under one root folder, signed with one key."""

    def __init__(self, root: Path | str, key: bytes, key_problem: str | None = None, remote: str | None = None):
        self.root = Path(root)
        self.key = key
        #: why this user's key could not be read (then ``key`` verifies nothing)
        self.key_problem = key_problem
        #: the bucket URL this store's checkpoints are uploaded to (``sync.py``); ``root`` is then
        #: the local cache, where every checkpoint is committed first.  None for a plain folder.
        self.remote = remote

    def notebook(self, identity: str) -> NotebookStore:
        """The checkpoints of one notebook identity."""
        return NotebookStore(self, identity)

    def notebook_dirs(self) -> list[Path]:
        """Every notebook folder in the store."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        return sorted(
            Path(e.path)
            for e in entries
            if e.is_dir(follow_symlinks=False) and os.path.isdir(Path(e.path, "manifests"))
        )


class NotebookStore(NotebookFolder):
    """One notebook's checkpoints: commit, read, load."""

    def __init__(self, store: Store, identity: str, folder: Path | None = None):
        super().__init__(store.root, identity, folder)
        self.store = store

    # --- save path ------------------------------------------------------------

    def commit(
        self,
        snap: Snapshot | Callable[[], Snapshot],
        *,
        execution_count: int,
        cell: str = "",
        keep: int = 5,
        writer: dict[str, Any] | None = None,
        cells: list[dict[str, Any]] | None = None,
        release_buffers: bool = False,
        report_adoptable: bool = False,
        unwritten: tracking.Unwritten | None = None,
        committed: Callable[[CommitResult], None] | None = None,
    ) -> CommitResult:
        """Write ``snap`` as the newest generation, then prune to ``keep`` generations.

        ``committed(result)`` is called at the commit point, before pruning: a checkpoint
        child tells the kernel then (a failure to prune is then only logged).

        ``snap`` may be a function that takes the snapshot: it is then called under
        the notebook's lock, after the large buffers were let go of first (below).

        ``unwritten`` (in a checkpoint child of a kernel that tracks written pages,
        ``tracking.py``) names chunks whose pages nobody wrote since the last
        checkpoint: they are not read again, and every chunk's digest is noted in it.

        ``report_adoptable=True`` lists, in the result, the chunks this process may back by
        their files (``mapping.Adopter``); it costs a list entry per chunk, so only on request.

        ``release_buffers=True`` is for a forked child that exits after the commit:
        once every blob is written, before the flush, it lets go of the memory of
        the snapshot's buffers (``mapping.release``), so that what the parent
        writes meanwhile is no longer copied for it.  Never in a process that
        goes on using those buffers: their pages read as zeros afterwards.
        With ``unwritten`` too and ``snap`` a function, the memory of the large
        buffers the last checkpoint saw is let go of first, before the lock is
        taken (``buffers_first.py``); :class:`ReleasedTooEarly` then means that
        this commit had to read memory it had let go of: take it again without.

        Raises :class:`SaveError` (with the previous checkpoint untouched) on any
        failure, such as a full disk, and :class:`UnsafeStore` (nothing written)
        if other users own or can write into the store's folders.  If this
        kernel (``writer["id"]``) already committed a state taken later
        (``writer["seq"]``), nothing is written.
        """
        started = time.perf_counter()
        first = None
        try:
            if callable(snap) and release_buffers and unwritten is not None:
                # Before the lock and the manifests: every millisecond here, the kernel's writes are copied.
                first = buffers_first.give_up_first(unwritten, self)
            with self.locked():
                # Under the lock, so the folders checked are the ones written:
                # never write a checkpoint others could change before it loads.
                self.check_safe()
                # Leftovers of crashed commits first: on a small disk they are
                # what keeps this commit from fitting.
                retention.remove(retention.sweep_plan(self, None))
                result = self._commit_locked(
                    snap,
                    execution_count,
                    cell,
                    writer or {},
                    keep,
                    cells,
                    release_buffers,
                    report_adoptable,
                    unwritten,
                    first,
                    committed,
                    started,
                )
        except CheckpointError:
            raise
        except OSError as exc:
            raise SaveError(f"could not write the checkpoint: {exc.strerror or exc}") from exc
        finally:
            if first is not None:
                first.close()
        result.seconds = time.perf_counter() - started
        return result

    def _commit_locked(
        self,
        snap: Snapshot | Callable[[], Snapshot],
        execution_count: int,
        cell: str,
        writer: dict[str, Any],
        keep: int,
        cells: list[dict[str, Any]] | None,
        release_buffers: bool = False,
        report_adoptable: bool = False,
        unwritten: tracking.Unwritten | None = None,
        first: buffers_first.BuffersFirst | None = None,
        committed: Callable[[CommitResult], None] | None = None,
        started: float = 0.0,
    ) -> CommitResult:
        gens = self.checkpoint_ids()
        # Only the newest checkpoint that verifies is read before the commit point; the older ones
        # when a blob only they name is reused, else for pruning, after it.
        kept: dict[int, dict[str, Any] | None] = {}
        previous = None
        for gen in gens:
            kept[gen] = previous = retention.signed(self, self.store.key, gen)
            if previous is not None:
                break

        def read_older() -> list[dict[str, Any]]:
            for gen in gens:
                if gen not in kept:
                    kept[gen] = retention.signed(self, self.store.key, gen)
            return [data for gen, data in sorted(kept.items()) if data is not None]

        if previous is not None and _newer_from_same_writer(previous.get("writer"), writer):
            return CommitResult(Manifest(previous), 0, 0, 0.0, superseded=True)
        writing = BlobWriter(self, KnownStamps(previous, read_older))
        if first is not None:
            first.store(writing)
            writing.hashed += first.hashed
        if callable(snap):
            snap = snap()
        entries = []
        skipped = [{"name": s.name, "type": s.type, "reason": s.reason} for s in snap.skipped]
        before = {v.get("name"): v for v in previous.get("variables", [])} if previous is not None else {}
        compare = [COMPARE_MAX_BYTES]  # what is left to compare in this commit
        clean = mapping.CleanChunks()
        adoptable: list[Any] | None = [] if report_adoptable else None
        # In a child that exits after this, each variable's memory is let go as soon as nothing left to
        # save reads it (the kernel's writes to it are then no longer copied for the child), and those
        # holding the most buffer bytes are saved first.  The manifest lists them in their own order.
        order = sorted(range(len(snap.variables)), key=lambda i: -sum(b.nbytes for b in snap.variables[i].buffers))
        let_go = _last_readers([snap.variables[i] for i in order]) if release_buffers else {}
        per_variable: dict[int, dict[str, Any] | None] = {}
        try:
            for step, i in enumerate(order):
                per_variable[i] = self._entry(
                    snap.variables[i], writing, before, compare, clean, adoptable, unwritten, first
                )
                mapping.release(let_go.pop(step, []))
        finally:
            clean.close()
        for i, var in enumerate(snap.variables):
            entry = per_variable[i]
            if entry is None:
                skipped.append({"name": var.name, "type": var.type, "reason": "its saved data is damaged"})
            else:
                entries.append(entry)
        entries, broken = _whole_groups(entries)
        skipped += broken
        writing.make_durable()

        generation = (gens[0] + 1) if gens else 1
        newest = previous if gens and previous is not None and previous.get("generation") == gens[0] else None
        made: dict[str, Any] = {
            "execution_count": execution_count,
            "cell": cell,
            "made_by": writer.get("id"),
            "changes": _changes(previous, entries),
        }
        if newest is not None and _same_state(newest, entries, skipped):
            # Nothing changed since the newest generation: refresh it in place (time, writer,
            # file stamps) rather than push real history out.  It keeps what names the cell
            # that made the state (In [n], its text, its kernel) and what that cell changed.
            generation = gens[0]
            made = {key: newest[key] for key in made if key in newest}
            made.setdefault("made_by", (newest.get("writer") or {}).get("id"))
        data = {
            "schema": manifest_format.SCHEMA_VERSION,
            "generation": generation,
            "created": time.time(),
            "execution_count": made["execution_count"],
            "identity": self.identity,
            "cell": made.get("cell", ""),
            "writer": writer,
            "versions": _versions(snap),
            "variables": entries,
            "skipped": skipped,
        }
        if cells:
            data["cells"] = cells
        # Added in 0.3 (older checkpoints lack them): the kernel whose cell made the state, and
        # what it changed since the checkpoint it replaced (kept when that one is pruned).
        for key in ("made_by", "changes"):
            if made.get(key) is not None:
                data[key] = made[key]
        raw = manifest_format.encode(data, self.store.key)
        self.files.publish(self.manifest_key(generation), raw)  # the commit point
        written = writing.written + len(raw)
        kept[generation] = data
        other = previous.get("writer") if previous is not None else None
        if not isinstance(other, dict) or not other or other.get("id") == writer.get("id"):
            other = None
        self.damaged_digests -= writing.checked
        result = CommitResult(
            Manifest(data),
            written,
            writing.blobs,
            0.0,
            other,
            sorted(writing.repaired),
            adoptable=adoptable or [],
            bytes_hashed=writing.hashed,
            backing_changed=sorted(writing.backing_changed),
        )
        if committed is None:
            read_older()
            retention.prune(self, self.store.key, keep, kept)
            return result
        result.seconds = time.perf_counter() - started
        committed(result)
        try:  # committed: what is left is tidying, which the next commit does again if this one fails
            read_older()
            retention.prune(self, self.store.key, keep, kept)
        except (OSError, CheckpointError):
            log.warning("pruning after checkpoint %s failed", generation, exc_info=True)
        return result

    def _entry(
        self,
        var: Variable,
        writing: BlobWriter,
        before: dict[str, Any],
        compare: list[int],
        clean: mapping.CleanChunks,
        adoptable: list[Any] | None,
        unwritten: tracking.Unwritten | None = None,
        first: buffers_first.BuffersFirst | None = None,
    ) -> dict[str, Any] | None:
        """One variable's manifest entry, its blobs written; None if it is carried forward but its data is damaged."""
        if var.stored is not None:
            carried = writing.carry(var.stored)
            return None if carried is None else {**carried, "name": var.name}
        entry: dict[str, Any] = {"name": var.name, "type": var.type, "kind": var.kind, "size": var.size}
        if var.kind not in ("pickle", "member"):
            entry["target"] = var.target
            return entry
        if var.span is not None and var.part is not None:
            # Saved together with others: its place in the group's stream, and a digest of
            # its own part, so a diff can tell which member changed.
            entry["span"] = list(var.span)
            entry["part"] = digest(var.part)
        # Large buffers are stored as chunks (chunking.py); a chunk whose pages are untouched
        # since it was mapped from its blob (mapping.py) or since the last checkpoint
        # (tracking.py) is not even read.
        cuts = [chunking.buffer_cuts(buf.nbytes, mapping.address_of(buf)) for buf in var.buffers]
        chunk_digests = [
            _chunk_digests(buf, c, clean, writing, self.blob_path, var.name, unwritten, first)
            for buf, c in zip(var.buffers, cuts, strict=True)
        ]
        buffer_digests = [d for ds in chunk_digests for d in ds]
        if writing.repaired_chunks.intersection(buffer_digests):
            writing.repaired.add(var.name)
        if var.kind == "member":
            entry["target"] = var.target
        else:
            payload = var.payload
            entry["digest"] = digest(payload)
            if var.members:
                entry["members"] = var.members
            else:
                kept_as = self._same_value_as_stored(
                    before.get(var.name), payload, entry["digest"], buffer_digests, compare
                )
                if kept_as is not None:
                    # The same value as stored, pickled differently in this process: keep the stored
                    # bytes, so that the variable is not shown as changed nor written again.
                    payload = kept_as
                    entry["digest"] = digest(payload)
                    entry["size"] = len(payload) + sum(b.nbytes for b in var.buffers)
            if len(payload) <= INLINE_MAX_BYTES:
                entry["inline"] = base64.b64encode(payload).decode("ascii")
            elif len(payload) > chunking.STREAM_CHUNK_FROM:
                view = memoryview(payload)
                # The same bytes as stored (the whole pickle's digest says so): its stored cuts and
                # chunk digests hold, so neither the cuts nor the chunks are computed again.
                known = _stored_stream(before.get(var.name), entry["digest"], len(payload))
                stream, names = known if known is not None else (chunking.stream_cuts(payload), None)
                if names is None:
                    names = digests([view[a:b] for a, b in stream])
                entry["stream"] = writing.put_chunks(view, stream, names, var.name)
            else:
                entry["stamp"] = writing.put(entry["digest"], payload, var.name)
        if var.buffers:
            entry["buffers"] = [
                e
                for buf, c, ds in zip(var.buffers, cuts, chunk_digests, strict=True)
                for e in writing.put_chunks(buf, c, ds, var.name)
            ]
            if any(len(c) > 1 for c in cuts):
                entry["pieces"] = [len(c) for c in cuts]
            for buf, c, ds in zip(var.buffers, cuts, chunk_digests, strict=True):
                report = mapping.adoptable(mapping.address_of(buf), c, ds) if adoptable is not None else None
                if report is not None and adoptable is not None:
                    adoptable.append(report)
        return entry

    def _same_value_as_stored(
        self,
        stored: dict[str, Any] | None,
        payload: bytes,
        new_digest: str,
        buffer_digests: list[str],
        budget: list[int],
    ) -> bytes | None:
        """The stored pickle of this variable if ``payload`` holds the same value in other bytes (pickled
        by another process: ``equivalence.py``), else None.  ``budget[0]``: bytes left to compare."""
        try:
            return self._same_value(stored, payload, new_digest, buffer_digests, budget)
        except Exception:  # a saving aid: never a reason not to save
            log.exception("comparing %s with its stored value failed", (stored or {}).get("name"))
            return None

    def _same_value(
        self,
        stored: dict[str, Any] | None,
        payload: bytes,
        new_digest: str,
        buffer_digests: list[str],
        budget: list[int],
    ) -> bytes | None:
        if (
            stored is None
            or stored.get("kind") != "pickle"
            or "members" in stored  # its payload is a group's stream, not one variable's pickle
            or stored.get("digest") == new_digest
            or [b.get("digest") for b in stored.get("buffers", [])] != buffer_digests
            or len(payload) > min(equivalence.MAX_BYTES, budget[0])
        ):
            return None
        old = self._stored_payload(stored)
        if old is None:
            return None
        budget[0] -= len(old) + len(payload)
        return old if equivalence.same_value(old, payload) else None

    def _stored_payload(self, entry: dict[str, Any]) -> bytes | None:
        """A kept checkpoint's pickle of one variable, checked against its digest; None if it is not at hand."""
        if "stream" in entry:
            return None  # larger than anything compared
        try:
            if "inline" in entry:
                payload = base64.b64decode(entry["inline"], validate=True)
            else:
                payload = self.files.get(self.blob_key(entry["digest"]), equivalence.MAX_BYTES)
        except (OSError, ValueError, TypeError):
            return None
        return payload if digest(payload) == entry.get("digest") else None

    # --- restore path --------------------------------------------------------

    def read_manifest(self, generation: int) -> Manifest:
        """Read and verify one generation's manifest (nothing is unpickled)."""
        where = f"checkpoint {generation}"
        self.check_safe()
        try:
            raw = self.manifest_bytes(generation)
        except OSError as exc:
            raise CorruptCheckpoint(f"{where} cannot be read: {exc.strerror or exc}") from None
        return manifest_format.decode(raw, self.store.key, where, generation=generation, folder=self.dir.name)

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
        reading = BlobReader(self, where, verify_buffers)
        entries = {}
        damaged: dict[str, str] = {}
        by_name = {v["name"]: v for v in man.variables}
        groups: dict[str, list[str]] = {}
        for var in man.variables:
            if var["kind"] == "member":
                continue  # loaded with its group's first variable
            if var["kind"] != "pickle":
                entries[var["name"]] = (var["kind"], var["target"], _constant((b"", [])))
                continue
            members = [var["name"]]
            if "members" in var:
                members = [m for m in var["members"] if m in by_name]
                groups[var["name"]] = members
            # A group's stream holds every member's part: its size bound is theirs together.
            whole = {**var, "size": sum(by_name[m].get("size", 0) for m in members)} if len(members) > 1 else var
            try:
                payload = reading.payload(whole)
                buffers = [buf for m in members for buf in reading.buffers(by_name[m])]
            except CorruptCheckpoint as exc:
                # One stream: a damaged part costs every variable saved with it.
                for m in members:
                    damaged[m] = str(exc).removeprefix(f"{where}: ")
                continue
            entries[var["name"]] = ("pickle", "", _constant((payload, buffers)))
            for m in members[1:]:
                entries[m] = ("member", var["name"], _constant((b"", [])))
        types = {v["name"]: v.get("type", "?") for v in man.variables}
        versions = man.data.get("versions")
        written = versions.get("python") if isinstance(versions, dict) else None
        # A variable carried forward unloaded keeps the Python that pickled it.
        python: dict[str, str | None] = {
            v["name"]: v.get("python", written) for v in man.variables if v["kind"] in ("pickle", "member")
        }
        values, failed = Loader(entries, python, groups).load_all()
        not_restored = [Skipped(s.get("name", "?"), s.get("type", "?"), s.get("reason", "?")) for s in man.skipped]
        not_restored += [
            Skipped(name, types.get(name, "?"), f"its saved data is damaged ({reason})")
            for name, reason in damaged.items()
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
        for gen in self.checkpoint_ids():
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
        for gen in self.checkpoint_ids():
            if gen >= newer_than or len(found) == len(names):
                continue
            try:
                man = self.read_manifest(gen)
            except CheckpointError:
                continue
            prints = manifest_format.fingerprint(man.data)
            reading = BlobReader(self, f"checkpoint {gen}", True)
            by_name = {v["name"]: v for v in man.variables}
            for var in man.variables:
                name = var["name"]
                if name not in names or name in found or prints.get(name) == reference.get(name):
                    continue
                if var["kind"] == "member":
                    var = by_name.get(var["target"], var)  # intact if its group's stream is
                if var["kind"] != "pickle":
                    found[name] = gen
                    continue
                members = [by_name[m] for m in var.get("members", [var["name"]]) if m in by_name]
                with contextlib.suppress(CorruptCheckpoint):
                    reading.payload({**var, "size": sum(m.get("size", 0) for m in members)})
                    for member in members:
                        reading.buffers(member)
                    found[name] = gen
        return found


def _chunk_digests(
    buffer: Any,
    cuts: list[tuple[int, int]],
    clean: mapping.CleanChunks,
    writing: BlobWriter,
    blob_path: Any,
    name: str,
    unwritten: tracking.Unwritten | None = None,
    first: buffers_first.BuffersFirst | None = None,
) -> list[str]:
    """The digest of each chunk of ``buffer``: known when its pages are untouched or it was saved first,
    else hashed."""
    address = mapping.address_of(buffer) if len(cuts) > 1 else None
    at = mapping.where(buffer) if first is not None else None
    known = {}
    if at is not None and first is not None:
        for start, end in cuts:
            found = first.digest(at + start, end - start)
            if found is not None:
                known[start] = found
    vouched = []
    if address is not None:
        for start, end in cuts:
            if start in known:
                continue
            found = clean.digest_if_clean(address + start, end - start, blob_path)
            if found is None and unwritten is not None:
                found = unwritten.digest(address + start, end - start)
                if found is not None:
                    vouched.append((start, end))
            if found is not None:
                known[start] = found
    view = memoryview(buffer).cast("B")
    if vouched and unwritten is not None:
        # Defence in depth: one chunk that written-page tracking vouches for is hashed anyway.  A
        # mismatch means tracking cannot be believed here: nothing it vouched for is used.
        a, b = random.choice(vouched)
        if first is not None and address is not None:
            first.check_readable(address + a, b - a, name)
        writing.hashed += b - a
        if digest(view[a:b]) != known[a]:
            log.error("written-page tracking vouched for a chunk of %s that changed; hashing everything", name)
            unwritten.distrust()
            for start, _ in vouched:
                del known[start]
    todo = [(a, b) for a, b in cuts if a not in known]
    if first is not None and first.released:
        for a, b in todo:
            if at is None:
                raise ReleasedTooEarly(f"the memory of {name} may have been let go before it was saved")
            first.check_readable(at + a, b - a, name)
    writing.hashed += sum(b - a for a, b in todo)
    hashed = dict(zip((a for a, _ in todo), digests([view[a:b] for a, b in todo]), strict=True))
    if address is not None:
        for start, new in hashed.items():
            old = clean.suspect.get(address + start)
            if old is not None and old != new:
                # Untouched pages, yet other bytes: the file under them was written in place.
                writing.backing_changed.add(name)
    known.update(hashed)
    result = [known[a] for a, _ in cuts]
    if address is not None and unwritten is not None:
        unwritten.note(address, view.nbytes, cuts, result)
    return result


def _stored_stream(
    stored: dict[str, Any] | None, digest_hex: str, size: int
) -> tuple[list[tuple[int, int]], list[str]] | None:
    """The cuts and chunk digests of a stored chunked pickle, if it is exactly these bytes."""
    if not stored or stored.get("digest") != digest_hex or not isinstance(stored.get("stream"), list):
        return None
    cuts, names, at = [], [], 0
    for chunk in stored["stream"]:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("size"), int) or not chunk.get("digest"):
            return None
        cuts.append((at, at + chunk["size"]))
        names.append(chunk["digest"])
        at += chunk["size"]
    return (cuts, names) if at == size else None


def _last_readers(variables: list[Variable]) -> dict[int, list[Any]]:
    """Which buffers may be let go after each variable (by index) is saved: a buffer whose pages
    another variable's buffer shares (a view, an array inside another) waits for the last of them."""
    spans = []
    for i, var in enumerate(variables):
        for buf in var.buffers:
            address = mapping.address_of(buf)
            if address is None:
                # Read-only: where it lies is not known, so any other buffer may share its pages.
                # Let go of everything once all is saved (after the last variable).
                return {len(variables) - 1: [b for v in variables for b in v.buffers]} if variables else {}
            spans.append((address, address + memoryview(buf).nbytes, i, buf))
    spans.sort(key=lambda span: span[0])
    after: dict[int, list[Any]] = {}
    group: list[Any] = []
    group_end, last = -1, -1
    for start, end, i, buf in spans:
        if group and start >= group_end + mapping.PAGE:  # no page in common with the group before
            after.setdefault(last, []).extend(group)
            group, last = [], -1
        group.append(buf)
        group_end, last = max(group_end, end), max(last, i)
    if group:
        after.setdefault(last, []).extend(group)
    return after


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


def _whole_groups(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop groups carried forward unloaded that lost a member (its name was reassigned):
    their stream loads only whole, and a manifest naming a missing member would not load at all."""
    by_name = {e["name"]: e for e in entries}
    broken: dict[str, str] = {}
    for entry in entries:
        members = entry.get("members")
        if entry.get("kind") == "member" and by_name.get(entry.get("target"), {}).get("members") is None:
            broken[entry["name"]] = str(entry.get("target"))
        elif members and any(
            by_name.get(m, {}).get("kind") != "member" or by_name[m].get("target") != entry["name"] for m in members[1:]
        ):
            for m in members:
                mine = by_name.get(m, {}).get("kind") == "member" and by_name[m].get("target") == entry["name"]
                if m == entry["name"] or mine:
                    broken[m] = entry["name"]
    if not broken:
        return entries, []
    kept = [e for e in entries if e["name"] not in broken]
    dropped = [
        {
            "name": e["name"],
            "type": e.get("type", "?"),
            "reason": f"it was saved together with {broken[e['name']]}, which was reassigned before it loaded again",
        }
        for e in entries
        if e["name"] in broken
    ]
    return kept, dropped


def _changes(previous: dict[str, Any] | None, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """What a new checkpoint changed since ``previous`` (the newest kept one, which it replaces)."""
    added, removed, changed = manifest_format.diff(previous or {}, {"variables": entries})
    return {
        "from": previous.get("generation") if previous is not None else None,
        "added": added,
        "removed": removed,
        "changed": changed,
    }


def _constant(value: Any):
    return lambda: value


_static_versions: dict[str, str] | None = None


def _versions(snap: Snapshot) -> dict[str, Any]:
    global _static_versions
    if _static_versions is None:
        # The modules' own __version__, not importlib.metadata: that reads the installed packages' metadata
        # files again in every checkpoint child (2 ms each), since a child's cache dies with it.
        import dill

        package = sys.modules.get(__name__.rsplit(".", 2)[0])  # durable_kernel, whose part this module is
        _static_versions = {
            "python": sys.version.split()[0],
            "dill": getattr(dill, "__version__", "unknown"),
            "durable_kernel": getattr(package, "__version__", "unknown"),
        }
    packages = {}
    for var in snap.variables:
        root = var.type.split(".", 1)[0] if var.kind == "pickle" else var.target.split(".", 1)[0]
        module = sys.modules.get(root)
        version = getattr(module, "__version__", None)
        if isinstance(version, str):
            packages[root] = version
    return {**_static_versions, "packages": packages}
