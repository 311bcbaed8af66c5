"""Blobs: pickles and raw buffers named by their BLAKE3 digest, written once and checked when in doubt.

A blob already stored is reused without reading it only if its file is the
user's own and unchanged since a checkpoint recorded it: the manifest keeps
each blob file's ``stamp``, ``[inode, ctime_ns]``, which any write, replace or
re-link changes.  Otherwise its bytes are hashed; a damaged one is written
again from memory (the commit says so).  When loading, a buffer whose stamp
is unchanged may skip hashing (``verify_on_restore=False``); one that changed
never does.
"""

from __future__ import annotations

import base64
import mmap
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from . import chunking, mapping
from .backend import NotARegularFile, NotOwned
from .errors import CorruptCheckpoint
from .files import READ_FLAGS, foreign, fsync_dir, make_private_dirs, sync_filesystem

if TYPE_CHECKING:
    from .folder import NotebookFolder

#: Hash big buffers on all cores; below this the thread start-up costs more.
_PARALLEL_HASH_BYTES = 8 << 20

_hash_threads = blake3.blake3.AUTO
#: Chunk files a commit fsyncs one by one; above this it flushes the file system once.
_FSYNC_EACH_UP_TO = 32


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


def digests(views: list[Any]) -> list[str]:
    """BLAKE3 of each chunk, on every core when there is much to hash (blake3 releases the GIL)."""
    total = sum(memoryview(v).nbytes for v in views)
    workers = min(os.cpu_count() or 1, 8)
    if workers < 2 or len(views) < 2 or total < _PARALLEL_HASH_BYTES:
        return [digest(v) for v in views]
    workers = min(workers, len(views))
    # One task per worker, each every workers-th chunk (chunks of a buffer are of a size): a future per
    # chunk cost more than hashing it (a restore of 4 GiB checks 5,000 chunks).
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(_digests_here, [views[w::workers] for w in range(workers)]))
    found: list[str] = [""] * len(views)
    for w, part in enumerate(parts):
        found[w::workers] = part
    return found


def _digests_here(views: list[Any]) -> list[str]:
    return [digest(v) for v in views]


def blob_entries(var: dict[str, Any]) -> list[dict[str, Any]]:
    """The blob entries (``digest``, ``size``, ``stamp``) of a manifest variable: its stream's chunks, then its
    buffers' (a whole stream stored as one blob is named by the variable's own ``digest``, not listed here)."""
    return [*var.get("stream", []), *var.get("buffers", [])]


def pieces_of(var: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """A variable's out-of-band buffers, each as the list of its chunk entries (one entry if not chunked)."""
    entries = var.get("buffers", [])
    counts = var.get("pieces") or [1] * len(entries)
    out, at = [], 0
    for count in counts:
        out.append(entries[at : at + count])
        at += count
    return out


def stamp(info: os.stat_result) -> list[int]:
    """What changes whenever a file is written, replaced or re-linked."""
    return [info.st_ino, info.st_ctime_ns]


def file_digest(path: Path, size: int) -> str | None:
    """BLAKE3 of a file's bytes, read through a private map; None if it cannot be read or has another size."""
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


def stamps_named_by(data: dict[str, Any]) -> dict[str, list[int]]:
    """digest -> stamp, for every blob a manifest's JSON records a stamp of."""
    found = {}
    for var in data.get("variables", []):
        if "stamp" in var and "inline" not in var:
            found[var["digest"]] = var["stamp"]
        for buf in blob_entries(var):
            if "stamp" in buf:
                found[buf["digest"]] = buf["stamp"]
    return found


class KnownStamps:
    """digest -> the stamp a kept checkpoint recorded for the blob's file.

    The newest checkpoint's stamps at once; the older checkpoints' only when a
    blob only they name is reused (a variable set back to an older value):
    reading a manifest of 4 GiB of chunks costs about 20 ms, in every commit.
    """

    def __init__(self, newest: dict[str, Any] | None, older: Callable[[], list[dict[str, Any]]]):
        self._stamps = stamps_named_by(newest) if newest is not None else {}
        self._older: Callable[[], list[dict[str, Any]]] | None = older

    def get(self, digest_hex: str) -> list[int] | None:
        found = self._stamps.get(digest_hex)
        if found is None and self._older is not None:
            older, self._older = self._older, None
            merged: dict[str, list[int]] = {}
            for data in older():  # oldest first: newer ones win
                merged.update(stamps_named_by(data))
            self._stamps = {**merged, **self._stamps}
            found = self._stamps.get(digest_hex)
        return found


class BlobWriter:
    """Puts one commit's blobs (under the notebook's lock): writes what is missing, checks what it reuses."""

    def __init__(self, nb: NotebookFolder, known: KnownStamps):
        self.nb = nb
        #: digest -> stamp of its file as a kept checkpoint recorded it
        self.known = known
        self.touched: set[Path] = set()
        self.written = 0
        self.blobs = 0
        #: bytes of buffers hashed for this commit (the store counts them)
        self.hashed = 0
        #: names of arrays backed by a chunk file that was changed in place: their memory changed with it
        self.backing_changed: set[str] = set()
        #: digests whose stored bytes were read back and checked
        self.checked: set[str] = set()
        #: names whose stored copy was damaged and has been written again
        self.repaired: set[str] = set()
        #: digests of chunks put without a name whose stored copy was damaged and has been written again
        self.repaired_chunks: set[str] = set()
        self._stamps: dict[str, list[int]] = {}
        #: blob files written without their own fsync (chunks): made durable together by :meth:`make_durable`
        self._unsynced: list[Path] = []

    def put_chunks(
        self, data: Any, cuts: list[tuple[int, int]], chunk_digests: list[str], name: str
    ) -> list[dict[str, Any]]:
        """Store ``data`` as the chunks ``cuts`` (named ``chunk_digests``); returns their manifest entries."""
        view = memoryview(data).cast("B")
        return [
            {"digest": d, "size": end - start, "stamp": self.put(d, view[start:end], name, durable=False)}
            for (start, end), d in zip(cuts, chunk_digests, strict=True)
        ]

    def put(self, digest_hex: str, data: Any, name: str, durable: bool = True) -> list[int]:
        """Make sure blob ``digest_hex`` holds ``data``; returns its file's stamp.

        ``durable=False`` leaves the file's flush to :meth:`make_durable`, which
        the commit calls before its manifest."""
        size = memoryview(data).nbytes
        found = self.reuse(digest_hex, size, name)
        if found is not None:
            return found
        try:
            info: os.stat_result | None = os.lstat(self.nb.blob_file(digest_hex))
        except FileNotFoundError:
            info = None
        path = self.nb.blob_path(digest_hex)
        if info is not None and stat.S_ISDIR(info.st_mode):
            self.nb.set_aside_locked(digest_hex, info)  # a rename cannot replace a directory
        make_private_dirs(path.parent)
        self.touched.add(path.parent)
        # a rename replaces a bad file
        self.written += self.nb.files.put(self.nb.blob_key(digest_hex), [data], durable=durable)
        self.blobs += 1
        if not durable:
            self._unsynced.append(path)
        found = stamp(path.lstat())
        self._stamps[digest_hex] = found
        return found

    def reuse(self, digest_hex: str, size: int, name: str) -> list[int] | None:
        """The stamp of blob ``digest_hex`` if it is stored intact already (its file is read only when in
        doubt), else None: then :meth:`put` writes it."""
        if digest_hex in self._stamps:  # the same buffer twice in this commit
            return self._stamps[digest_hex]
        try:
            info = os.lstat(self.nb.blob_file(digest_hex))
        except FileNotFoundError:
            return None
        if not self._trusted(digest_hex, info, size, name):
            return None
        self._stamps[digest_hex] = found = stamp(info)
        return found

    def make_durable(self) -> None:
        """Flush what this commit wrote (files, then their folders' entries), before the manifest names it."""
        if len(self._unsynced) > _FSYNC_EACH_UP_TO:
            # One flush of the file system beats thousands of fsyncs (each a journal commit).
            sync_filesystem(self.nb.blobs_dir)
        else:
            for path in self._unsynced:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for folder in self.touched:
                fsync_dir(folder)
            if self.touched:
                fsync_dir(self.nb.blobs_dir)
        self._unsynced.clear()

    def _trusted(self, digest_hex: str, info: os.stat_result, size: int, name: str) -> bool:
        """Can the file already there be reused as the blob ``digest_hex``?"""
        if not stat.S_ISREG(info.st_mode) or info.st_size != size or foreign(info):
            return False
        if self._intact(digest_hex, info, self.known.get(digest_hex)):
            return True
        if name:
            self.repaired.add(name)
        else:  # a chunk saved by address (buffers_first.py): named once a variable's buffer holds it
            self.repaired_chunks.add(digest_hex)
        return False

    def _intact(self, digest_hex: str, info: os.stat_result, recorded: Any) -> bool:
        """Does this regular file hold the bytes ``digest_hex`` names? Read only when in doubt."""
        if recorded == stamp(info) and digest_hex not in self.nb.damaged_digests:
            return True  # unchanged since a checkpoint recorded it
        self.checked.add(digest_hex)
        return file_digest(self.nb.blob_path(digest_hex), info.st_size) == digest_hex

    def carry(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """A manifest entry of an earlier checkpoint, kept as it was (its blobs still there and intact)."""
        out = dict(entry)
        if entry.get("kind") not in ("pickle", "member"):  # a module or an alias: a name, no data
            return out
        # A member's stream is its group's first variable's; a group's stream holds every member's part.
        has_stream = entry.get("kind") == "pickle" and "inline" not in entry and "stream" not in entry
        bound = 1 << 62 if "members" in entry else entry.get("size", 0)
        named = [(entry["digest"], bound, out)] if has_stream else []
        for key in ("stream", "buffers"):
            if key in entry:
                out[key] = [dict(b) for b in entry[key]]
                named += [(b["digest"], b["size"], b) for b in out[key]]
        for digest_hex, size, holder in named:
            try:
                info = self.nb.blob_path(digest_hex).lstat()
            except OSError:
                return None
            # A payload blob's size is at most the variable's; a buffer's is exact.
            fits = info.st_size <= size if holder is out else info.st_size == size
            recorded = holder.get("stamp") or self.known.get(digest_hex)
            if not (
                stat.S_ISREG(info.st_mode) and fits and not foreign(info) and self._intact(digest_hex, info, recorded)
            ):
                return None
            holder["stamp"] = stamp(info)
        return out


class BlobReader:
    """Reads and verifies one checkpoint's blobs for a load; never hands over a byte that failed."""

    def __init__(self, nb: NotebookFolder, where: str, verify_buffers: bool):
        self.nb = nb
        self.where = where
        self.verify_buffers = verify_buffers
        self._folders_checked: set[str] = set()

    def payload(self, var: dict[str, Any]) -> bytes:
        """A variable's pickle (inline, from its blob or from its chunks), checked against its digest."""
        found = None
        if "inline" in var:
            try:
                payload = base64.b64decode(var["inline"], validate=True)
            except (ValueError, TypeError):
                raise CorruptCheckpoint(f"{self.where}: variable {var['name']!r} is damaged") from None
        elif "stream" in var:
            payload = b"".join(self._chunk(entry) for entry in var["stream"])
        else:
            payload, found = self._read_blob(var)
        if digest(payload) != var["digest"]:
            if found is not None:
                self.nb.set_aside(var["digest"], found)
            raise CorruptCheckpoint(f"{self.where}: variable {var['name']!r} does not match its digest")
        return payload

    def _chunk(self, entry: dict[str, Any]) -> bytes:
        """One chunk of a stream, read and checked (its recorded size is exact)."""
        fd, info = self._open(entry["digest"])
        with open(fd, "rb") as f:
            if info.st_size != entry["size"]:
                raise CorruptCheckpoint(
                    f"{self.where}: blob {entry['digest'][:12]} has {info.st_size} bytes, expected {entry['size']}"
                )
            try:
                data = f.read(info.st_size + 1)
            except OSError as exc:
                raise CorruptCheckpoint(
                    f"{self.where}: blob {entry['digest'][:12]} cannot be read: {exc.strerror or exc}"
                ) from None
        if digest(data) != entry["digest"]:
            self.nb.set_aside(entry["digest"], info)
            raise CorruptCheckpoint(f"{self.where}: blob {entry['digest'][:12]} does not match its digest")
        return data

    def buffers(self, var: dict[str, Any]) -> list[Any]:
        """A variable's out-of-band buffers, each whole (a chunked one assembled from its chunks)."""
        return [self.buffer(p[0]) if len(p) == 1 else self.chunked(p) for p in pieces_of(var)]

    def chunked(self, entries: list[dict[str, Any]]) -> Any:
        """A buffer stored as chunks: their files mapped side by side (``mapping.assemble``), each checked."""
        opened: list[tuple[int, os.stat_result, dict[str, Any]]] = []
        try:
            for entry in entries:
                fd, info = self._open(entry["digest"])
                opened.append((fd, info, entry))
                if info.st_size != entry["size"]:
                    raise CorruptCheckpoint(
                        f"{self.where}: blob {entry['digest'][:12]} has {info.st_size} bytes, "
                        f"expected {entry['size']} (truncated?)"
                    )
            try:
                region = mapping.assemble(
                    [(fd, e["size"], e["digest"], info) for fd, info, e in opened],
                    chunking.page_offset([e["size"] for e in entries]),
                    may_map=mapping.local_filesystem(self.nb.blobs_dir),
                )
            except OSError as exc:
                raise CorruptCheckpoint(
                    f"{self.where}: a buffer's chunks cannot be read: {exc.strerror or exc}"
                ) from None
        finally:
            for fd, _, _ in opened:
                os.close(fd)
        view = memoryview(region)
        check, at = [], 0
        for _, info, entry in opened:
            unchanged = entry.get("stamp") == stamp(info) and entry["digest"] not in self.nb.damaged_digests
            if self.verify_buffers or not unchanged:
                check.append((view[at : at + entry["size"]], info, entry))
            at += entry["size"]
        for (_, info, entry), found in zip(check, digests([v for v, _, _ in check]), strict=True):
            if found != entry["digest"]:
                self.nb.set_aside(entry["digest"], info)
                raise CorruptCheckpoint(f"{self.where}: blob {entry['digest'][:12]} does not match its digest")
        return region

    def _read_blob(self, var: dict[str, Any]) -> tuple[bytes, os.stat_result]:
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
        """An out-of-band buffer as a private copy-on-write map of its blob (checked when in doubt)."""
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
            raise CorruptCheckpoint(
                f"{self.where}: blob {buf['digest'][:12]} cannot be read: {exc.strerror or exc}"
            ) from None
        finally:
            os.close(fd)
        unchanged = buf.get("stamp") == stamp(info) and buf["digest"] not in self.nb.damaged_digests
        if (self.verify_buffers or not unchanged) and digest(data) != buf["digest"]:
            self.nb.set_aside(buf["digest"], info)
            raise CorruptCheckpoint(f"{self.where}: blob {buf['digest'][:12]} does not match its digest")
        return data

    def _open(self, digest_hex: str) -> tuple[int, os.stat_result]:
        """Open a blob for reading: ``(fd, its fstat)``; CorruptCheckpoint unless a regular file of the user's."""
        path = self.nb.blob_file(digest_hex)
        name = f"{self.where}: blob {digest_hex[:12]}"
        folder = os.path.dirname(path)
        if folder not in self._folders_checked:
            try:
                problem = foreign(os.lstat(folder))
            except OSError:
                problem = None  # the open below says what is wrong
            if problem:
                raise CorruptCheckpoint(f"{name}: its folder {problem}")
            self._folders_checked.add(folder)
        try:
            return self.nb.files.open_regular(self.nb.blob_key(digest_hex))
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{name} is missing") from None
        except (NotARegularFile, NotOwned) as exc:
            try:
                self.nb.set_aside(digest_hex, os.lstat(path))
            except OSError:
                pass
            raise CorruptCheckpoint(f"{name} {exc.strerror}") from None
        except OSError as exc:
            raise CorruptCheckpoint(f"{name} cannot be read: {exc.strerror or exc}") from None
