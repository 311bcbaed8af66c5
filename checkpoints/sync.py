"""A bucket store's replication: upload after commit, download before restore, gc and clear.

The local store (the *cache*, a folder as for any store) stays the place every
checkpoint is committed first; this module copies checkpoints between it and a
:class:`~.bucket.Bucket`, which keeps the same layout.

Upload (:func:`upload_newest`), the remote commit protocol: the blobs the newest
local checkpoint needs and the bucket lacks go first (content addressing: a
blob already there is not sent again), then its manifest, written with a
conditional create (If-None-Match) as the remote commit point.  A manifest key
is written once and never replaced, so the newest remote manifest is always
whole and every blob it names was there before it.  When another machine took
that generation number first, the manifest is signed again as the next free
one: the newest commit wins and nothing is overwritten.  An upload cut short
leaves blobs only; the next round sends what is still missing.

Download (:func:`download_newest`): the newest remote checkpoint that verifies and
is newer than the cache's newest comes into the cache: blobs first (checked
against their digest before they are kept), then the manifest, under a
generation above every local one.  Restore then loads from the cache as ever.

Bucket gc (:func:`collect`) has no lock to take: it deletes only blobs that no
manifest names *and* that are older than a grace period, as restic's prune
does, so a writer on another machine that uploaded (or found) a blob for a
manifest it has not written yet never loses it.  A writer only counts on a blob
already in the bucket when a manifest names it or it is younger than
:data:`REUSE_YOUNG_SECONDS`; otherwise it sends it again, which makes it young.
Right before its commit point it checks those blobs are still there if another
machine changed the manifests meanwhile or it counted on a blob for its youth.

Nothing here is trusted that the key has not signed: manifests from the bucket
are verified before they are used, and blobs are hashed before they are kept.
Run as ``python -m durable_kernel.checkpoints.sync`` it is the kernel's sync
process (:func:`main`): obstore cannot run in a process that forks, and a
kernel forks for every checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import manifest as manifest_format
from .blobs import blob_entries, digest, file_digest
from .bucket import PARALLEL, Bucket, RemoteError
from .errors import CheckpointError, CorruptCheckpoint, SaveError
from .files import TMP_PREFIX, fsync_dir, make_private_dirs
from .folder import NotebookFolder
from .manifest import Manifest, referenced_blobs
from .store import NotebookStore, Store

log = logging.getLogger(__name__)

#: Blobs no kept manifest names are deleted from a bucket only once they are this old.
GRACE_SECONDS = 24 * 3600.0
#: Remote checkpoints kept per notebook (as many as locally, by default).
KEEP = 5
#: A writer counts on a blob already in the bucket that no manifest names only while it is this
#: young (gc keeps unreferenced blobs for its grace period, which should be longer).
REUSE_YOUNG_SECONDS = 3600.0
#: How long the sync process trusts a listing of the bucket (see ``_Listings``).
LISTING_SECONDS = 60.0
#: How long the sync process gathers upload requests before it uploads the newest state.
UPLOAD_SETTLE_SECONDS = 0.5
#: Manifest objects in a bucket larger than this are not read (no honest one comes close).
MAX_MANIFEST_GET = 64 * 1024 * 1024
#: The cache folder's record of what was uploaded (see :func:`read_record`).
RECORD = "uploads.json"
_MANIFEST_NAME = "manifests/"


@dataclass
class Transfer:
    """One upload or download: which checkpoint, and what crossed the network."""

    #: the local generation (in the cache)
    generation: int | None = None
    #: the generation in the bucket
    remote: int | None = None
    blobs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: one line per newer remote checkpoint that could not be used, and why
    notes: list[str] = field(default_factory=list)


def remote_folder(nb: NotebookFolder) -> str:
    """The notebook's folder in the bucket: the same name as in the cache."""
    return nb.dir.name


def manifest_ids(listing: dict[str, Any]) -> list[int]:
    """Generation ids of the manifests in a listing, newest first."""
    ids = []
    for key in listing:
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".manifest") and name[: -len(".manifest")].isdigit():
            ids.append(int(name[: -len(".manifest")]))
    return sorted(ids, reverse=True)


def _blob_digest(key: str) -> str:
    return key.rsplit("/", 1)[-1]


# --- the record of uploads ------------------------------------------------------------


def read_record(nb: NotebookFolder, url: str) -> dict[str, Any]:
    """What the cache knows of its uploads to ``url``: ``local`` (the generation last uploaded),
    ``remote`` (its generation in the bucket), ``digest`` (of its manifest file), ``fault``
    (the last failure, or None), ``at`` (when it was written)."""
    try:
        data = json.loads(nb.files.get(RECORD, 1 << 20))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("url") != url:
        return {}
    return data


def write_record(nb: NotebookFolder, url: str, **fields: Any) -> None:
    """Update the record (atomically; the kernel reads it for ``%checkpoint status``).

    Raises :class:`SaveError` if it cannot be written (a full disk): an upload that cannot be
    recorded would be taken for a new one and uploaded again and again."""
    record = {**read_record(nb, url), **fields, "url": url, "at": time.time()}
    try:
        nb.files.put(RECORD, [json.dumps(record).encode()])
    except OSError as exc:
        raise SaveError(f"cannot record uploads in {nb.dir} ({exc.strerror or exc})") from None


def waiting(nb: NotebookFolder, url: str) -> int:
    """How many of the cache's checkpoints are newer than the last one uploaded."""
    record = read_record(nb, url)
    ids = nb.checkpoint_ids()
    last = record.get("local")
    if isinstance(last, int) and last in ids and _manifest_digest(nb, last) == record.get("digest"):
        return sum(1 for g in ids if g > last)
    return len(ids)


def _manifest_digest(nb: NotebookFolder, generation: int) -> str | None:
    try:
        return digest(nb.manifest_bytes(generation))
    except (OSError, CheckpointError):
        return None


# --- upload -----------------------------------------------------------------------------


class _Named:
    """Which blobs each remote manifest names (unverified: only to decide what not to send
    again, or not to delete); manifests never change under one key, so each is read once."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str] | None] = {}

    def of(self, bucket: Bucket, key: str, size: int) -> set[str] | None:
        if key not in self._seen:
            if size > MAX_MANIFEST_GET:
                return None  # not an honest manifest: never read whole
            try:
                body = manifest_format.body_of(bucket.get(key))
                self._seen[key] = referenced_blobs(json.loads(body))
            except FileNotFoundError:
                return set()
            except RemoteError:
                raise
            except Exception:  # anything at all may sit in a bucket: unreadable, so cannot tell
                self._seen[key] = None
        return self._seen[key]


_named = _Named()
#: digests of the manifests this process uploaded
_uploaded: set[str] = set()


def upload_newest(nb: NotebookStore, bucket: Bucket, *, keep: int = KEEP) -> Transfer | None:
    """Upload the cache's newest checkpoint unless it is uploaded already; None if there was nothing to do.

    Raises :class:`RemoteError` when the bucket cannot be used (nothing is lost: the
    next call sends what is missing) and :class:`CheckpointError` for a local
    checkpoint that does not verify (it is never uploaded).
    """
    for _ in range(5):
        ids = nb.checkpoint_ids()
        if not ids:
            return None
        generation = ids[0]
        try:
            raw = nb.manifest_bytes(generation)
        except CorruptCheckpoint:
            continue  # pruned just now: a newer one exists
        record = read_record(nb, bucket.url)
        raw_digest = digest(raw)
        if record.get("digest") == raw_digest or raw_digest in _uploaded:
            return None
        man = manifest_format.decode(
            raw, nb.store.key, f"checkpoint {generation}", generation=generation, folder=nb.dir.name
        )
        try:
            done = _push(nb, bucket, man, raw, keep)
        except FileNotFoundError:
            continue  # a blob was pruned while it was read: the checkpoint it served is superseded
        # Remembered here too: if the record cannot be written (a full disk), this process must not
        # take the same checkpoint for a new one and upload it again and again.
        _uploaded.add(raw_digest)
        write_record(nb, bucket.url, local=generation, remote=done.remote, digest=raw_digest, fault=None)
        return done
    return None


class _Listings:
    """What the bucket holds for a notebook, its blobs listed at most :data:`LISTING_SECONDS` ago: the
    sync process uploads after every cell, and listing every blob each time would cost the server
    (and, on a small machine, the kernel beside it) more than the upload.  The manifests are listed
    every time (a handful of keys): when they are not what this process left, another machine has
    committed, pruned or cleared, and the blobs are listed again.  Forgotten after any failure."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[float, dict[str, dict[str, Any]], set[str]]] = {}

    def get(self, bucket: Bucket, folder: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """``(blobs, manifests)``: blob key -> {"size", "modified" (unix time)}; manifest key -> {"size", "age"}."""
        manifests = bucket.objects(f"{folder}/manifests")
        entry = self._cache.get((bucket.url, folder))
        if entry is None or entry[2] != set(manifests) or time.time() - entry[0] > LISTING_SECONDS:
            now = time.time()
            listed = bucket.objects(f"{folder}/blobs")
            blobs = {k: {"size": v["size"], "modified": now - v["age"]} for k, v in listed.items()}
            entry = (now, blobs, set(manifests))
            self._cache[(bucket.url, folder)] = entry
        return entry[1], manifests

    def left(self, bucket: Bucket, folder: str, manifests: dict[str, Any]) -> None:
        """The manifests as this process left them (after its commit and prune)."""
        entry = self._cache.get((bucket.url, folder))
        if entry is not None:
            self._cache[(bucket.url, folder)] = (entry[0], entry[1], set(manifests))

    def forget(self, bucket: Bucket, folder: str) -> None:
        self._cache.pop((bucket.url, folder), None)


_listings = _Listings()


def _named_by(bucket: Bucket, manifests: dict[str, dict[str, Any]]) -> set[str]:
    """Every blob the listed manifests name (unverified: only to decide what not to send or delete)."""
    named: set[str] = set()
    for key, meta in manifests.items():
        if manifest_ids({key: meta}):  # a numbered manifest, not whatever else sits there
            named |= _named.of(bucket, key, meta["size"]) or set()
    return named


def _push(nb: NotebookStore, bucket: Bucket, man: Manifest, raw: bytes, keep: int) -> Transfer:
    folder = remote_folder(nb)
    try:
        return _push_listed(nb, bucket, man, raw, keep)
    except BaseException:
        _listings.forget(bucket, folder)
        raise


def _push_listed(nb: NotebookStore, bucket: Bucket, man: Manifest, raw: bytes, keep: int) -> Transfer:
    started = time.monotonic()
    folder = remote_folder(nb)
    blobs, manifests = _listings.get(bucket, folder)
    named = _named_by(bucket, manifests)
    todo, reused, by_age = [], [], False
    now = time.time()
    for blob in sorted(man.blob_digests()):
        key = f"{folder}/{nb.blob_key(blob)}"
        source = nb.blob_path(blob)
        size = os.stat(source).st_size  # FileNotFoundError: pruned under us
        there = blobs.get(key)
        young = there is not None and now - there["modified"] < REUSE_YOUNG_SECONDS
        if there is not None and there["size"] == size and (blob in named or young):
            reused.append((key, source, size))
            by_age = by_age or blob not in named
            continue
        todo.append((key, source, size))

    def send(item: tuple[str, Path, int]) -> None:
        key, source, _ = item
        with open(source, "rb") as f:  # opened first: a prune after this point cannot cut it short
            bucket.upload(key, f)

    # Small blobs several at a time; a large one is itself sent as parallel parts.
    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(send, todo))
    for key, _, size in todo:
        blobs[key] = {"size": size, "modified": time.time()}
    # Right before the commit point: if other machines committed or pruned meanwhile, or a blob was
    # counted on only for being young, check that the blobs counted on are still there (a gc on
    # another machine may have deleted them) and send again any that are not.
    fresh = bucket.objects(f"{folder}/manifests")
    if reused and (by_age or set(fresh) != set(manifests)):
        present = bucket.objects(f"{folder}/blobs")
        gone = [item for item in reused if item[0] not in present]
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(send, gone))
        todo += gone
    target = _commit_manifest(nb, bucket, man, raw, manifest_ids(fresh))
    fresh[f"{folder}/{nb.manifest_key(target)}"] = {"size": len(raw), "age": 0.0}
    for old in manifest_ids(fresh)[max(keep, 1) :]:
        old_key = f"{folder}/{NotebookFolder.manifest_key(old)}"
        bucket.delete(old_key)  # its blobs go at the next gc
        fresh.pop(old_key, None)
    _listings.left(bucket, folder, fresh)
    return Transfer(
        generation=man.generation,
        remote=target,
        blobs=len(todo),
        bytes=sum(size for _, _, size in todo) + len(raw),
        seconds=time.monotonic() - started,
    )


def _commit_manifest(nb: NotebookStore, bucket: Bucket, man: Manifest, raw: bytes, remote_ids: list[int]) -> int:
    """Create the manifest in the bucket under a generation no one has used; returns it."""
    folder = remote_folder(nb)
    target = max(man.generation, (remote_ids[0] + 1) if remote_ids else 1)
    for _ in range(20):
        data = raw if target == man.generation else _signed_as(man, target, nb.store.key)
        if bucket.create(f"{folder}/{nb.manifest_key(target)}", data):
            return target
        # Another machine committed this generation first: ours is newer, so it goes above.
        _listings.forget(bucket, folder)
        target = max(target, (manifest_ids(bucket.objects(f"{folder}/manifests")) or [0])[0]) + 1
    raise RemoteError("busy", f"cannot commit to {bucket.url}: other writers took every generation tried")


def _signed_as(man: Manifest, generation: int, key: bytes) -> bytes:
    return manifest_format.encode({**man.data, "generation": generation}, key)


# --- download ---------------------------------------------------------------------------


def download_newest(nb: NotebookStore, bucket: Bucket, *, tries: int = KEEP + 1) -> Transfer:
    """Bring the newest remote checkpoint into the cache if it is newer than the cache's newest.

    ``Transfer.generation`` is the local generation it was written as, None if the
    cache was as new (or nothing remote could be used: ``notes`` say why).
    Raises :class:`RemoteError` if the bucket cannot be used.
    """
    started = time.monotonic()
    folder = remote_folder(nb)
    result = Transfer()
    manifests = bucket.objects(f"{folder}/manifests")
    local = _newest_local(nb)
    blobs: dict[str, dict[str, Any]] | None = None
    for remote in manifest_ids(manifests)[:tries]:
        key = f"{folder}/{nb.manifest_key(remote)}"
        where = f"checkpoint {remote} in {bucket.url}"
        try:
            if manifests[key]["size"] > MAX_MANIFEST_GET:
                raise CorruptCheckpoint(f"{where} is implausibly large; it was not read")
            raw = bucket.get(key)
            man = manifest_format.decode(raw, nb.store.key, where, generation=remote, folder=folder)
        except FileNotFoundError:
            continue  # pruned by its writer meanwhile
        except CheckpointError as exc:
            result.notes.append(str(exc))
            continue
        if local is not None and man.created <= local.created:
            break
        if blobs is None:
            blobs = bucket.objects(f"{folder}/blobs")
        nb.ensure_dirs()
        # Under the notebook's lock: a commit (of the previous kernel's last checkpoint, still
        # running) would sweep the temp files and prune the blobs no local manifest names yet.
        with nb.locked():
            try:
                count, size = _fetch_blobs(nb, bucket, man, blobs, where)
            except CorruptCheckpoint as exc:
                result.notes.append(str(exc))
                continue
            generation, written = _install_manifest(nb, man, raw)
        result.generation, result.remote, result.blobs, result.bytes = generation, remote, count, size + len(raw)
        write_record(nb, bucket.url, local=generation, remote=remote, digest=digest(written), fault=None)
        break
    result.seconds = time.monotonic() - started
    return result


def _newest_local(nb: NotebookStore) -> Manifest | None:
    for generation in nb.checkpoint_ids():
        try:
            return nb.read_manifest(generation)
        except CheckpointError:
            continue
    return None


def _fetch_blobs(
    nb: NotebookStore, bucket: Bucket, man: Manifest, listing: dict[str, dict[str, Any]], where: str
) -> tuple[int, int]:
    """Download the blobs ``man`` needs that the cache lacks, each checked against its digest."""
    folder = remote_folder(nb)
    declared = _declared_sizes(man)
    todo = []
    for blob in sorted(man.blob_digests()):
        key = f"{folder}/{nb.blob_key(blob)}"
        there = listing.get(key)
        if there is None:
            raise CorruptCheckpoint(f"{where} needs a blob the bucket does not have ({blob[:12]}…); it was not used")
        if there["size"] > declared.get(blob, there["size"]):
            # Never download more than the signed manifest says a blob holds (a planted giant).
            raise CorruptCheckpoint(f"{where}: a blob in the bucket is larger than it should be ({blob[:12]}…)")
        try:
            if os.stat(nb.blob_path(blob)).st_size == there["size"]:
                continue  # the loader checks its digest anyway
        except FileNotFoundError:
            pass
        todo.append((blob, key, there["size"]))

    def fetch(item: tuple[str, str, int]) -> None:
        blob, key, size = item
        final = nb.blob_path(blob)
        make_private_dirs(final.parent)
        tmp = final.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            try:
                bucket.download(key, size, tmp)
            except FileNotFoundError:
                raise CorruptCheckpoint(f"{where} needs a blob the bucket no longer has ({blob[:12]}…)") from None
            with open(tmp, "rb") as f:
                # The disk writes the bytes back while they are hashed (both let go of the GIL).
                with ThreadPoolExecutor(1) as flush:
                    flushed = flush.submit(os.fsync, f.fileno())
                    intact = file_digest(tmp, size) == blob
                    flushed.result()
            if not intact:
                raise CorruptCheckpoint(f"{where}: a blob in the bucket is damaged ({blob[:12]}…); it was not used")
            os.rename(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(fetch, [t for t in todo if t[2] < 64 << 20]))
    for item in [t for t in todo if t[2] >= 64 << 20]:
        fetch(item)  # one large blob at a time: each is already fetched in parallel ranges
    for folder_path in {nb.blob_path(b).parent for b, _, _ in todo}:
        fsync_dir(folder_path)
    return len(todo), sum(size for _, _, size in todo)


def _declared_sizes(man: Manifest) -> dict[str, int]:
    """The most bytes each blob of a checkpoint can hold, as its signed manifest says (a group's
    stream has no bound of its own: it is absent)."""
    sizes: dict[str, int] = {}
    for var in man.variables:
        for buf in blob_entries(var):
            sizes[buf["digest"]] = max(sizes.get(buf["digest"], 0), int(buf["size"]))
        if var.get("digest") and "members" not in var and "stream" not in var:
            sizes[var["digest"]] = max(sizes.get(var["digest"], 0), int(var.get("size", 0)))
    return sizes


def _install_manifest(nb: NotebookStore, man: Manifest, raw: bytes) -> tuple[int, bytes]:
    """Write a downloaded manifest into the cache above every local generation (the caller holds the
    notebook's lock); returns its generation and the bytes written."""
    local_ids = nb.checkpoint_ids()
    target = man.generation if not local_ids or man.generation > local_ids[0] else local_ids[0] + 1
    data = raw if target == man.generation else _signed_as(man, target, nb.store.key)
    nb.files.publish(nb.manifest_key(target), data)
    return target, data


# --- gc and clear -------------------------------------------------------------------------


@dataclass
class Collected:
    """What a bucket gc did for one notebook folder."""

    folder: str
    blobs_removed: int = 0
    freed: int = 0
    #: why blobs were all kept (a manifest that could not be read)
    kept_because: str = ""


def collect(bucket: Bucket, *, grace: float = GRACE_SECONDS, dry_run: bool = False) -> list[Collected]:
    """Delete the blobs no manifest names that are older than ``grace`` seconds, in every notebook
    folder of the bucket.  Manifests are left alone: each writer keeps its own number of them."""
    return [_collect_folder(bucket, folder, grace, dry_run) for folder in bucket.folders()]


def _collect_folder(bucket: Bucket, folder: str, grace: float, dry_run: bool) -> Collected:
    done = Collected(folder)
    first = bucket.objects(f"{folder}/manifests")
    blobs = bucket.objects(f"{folder}/blobs")
    candidates = {k: v for k, v in blobs.items() if v["age"] > grace}
    if not candidates:
        return done
    # The manifests again right before deleting: one committed meanwhile (by a writer on another
    # machine) protects its blobs too.
    manifests = {**first, **bucket.objects(f"{folder}/manifests")}
    named: set[str] = set()
    for key, meta in manifests.items():
        if not manifest_ids({key: meta}):
            continue  # not a numbered manifest: nothing a loader would read
        found = _named.of(bucket, key, meta["size"])
        if found is None:
            done.kept_because = f"{key.rsplit('/', 1)[-1]} cannot be read"
            return done
        named |= found
    for key, meta in candidates.items():
        if _blob_digest(key) in named:
            continue
        done.blobs_removed += 1
        done.freed += meta["size"]
        if not dry_run:
            bucket.delete(key)
    return done


def clear(bucket: Bucket, folder: str, dry_run: bool = False) -> int:
    """Remove one notebook's checkpoints from the bucket (manifests first); returns bytes freed."""
    objects = bucket.objects(folder)
    if not dry_run:
        order = sorted(objects, key=lambda k: _MANIFEST_NAME not in k)
        for key in order:
            bucket.delete(key)
    return sum(meta["size"] for meta in objects.values())


def mirror_manifests(bucket: Bucket, root: Path) -> dict[str, int]:
    """Copy every notebook's manifests (not blobs) into ``root``, laid out as a store, for the
    read-only commands (``list``, ``show``); returns each folder's size in the bucket."""
    sizes = {}
    for folder in bucket.folders():
        objects = bucket.objects(folder)
        sizes[folder] = sum(meta["size"] for meta in objects.values())
        nb = NotebookFolder(root, "", folder=root / folder)
        nb.ensure_dirs()
        for key in objects:
            if f"{folder}/{_MANIFEST_NAME}" in key:
                name = key.rsplit("/", 1)[-1]
                with contextlib.suppress(FileNotFoundError):
                    nb.files.put(f"manifests/{name}", [bucket.get(key)])
    return sizes


# --- the sync process -----------------------------------------------------------------------


@contextlib.contextmanager
def _uploading(nb: NotebookFolder) -> Iterator[None]:
    """One uploader per notebook at a time (a kernel's, and the one a restarted kernel left)."""
    nb.ensure_dirs()
    fd = os.open(nb.dir / "uploading", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _emit(event: dict[str, Any]) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def _serve(config: dict[str, Any], lines: queue.Queue[str | None]) -> None:
    """Upload after every request until the kernel closes our stdin; then finish what is waiting."""
    store = Store(config["root"], config["key"].encode())
    try:
        bucket = Bucket(config["url"])
    except RemoteError as exc:  # a URL or configuration that can never work: told once, then idle
        _emit({"event": "fault", "kind": exc.kind, "message": f"cannot upload: {exc}"})
        while lines.get() is not None:
            pass
        return
    keep = int(config.get("keep", KEEP))
    nb = NotebookStore(store, config["identity"], folder=Path(config["folder"]))
    wanted, closed, fault, delay, retry_until = True, False, "", 1.0, 0.0
    while True:
        if wanted:
            wanted = False
            try:
                with _uploading(nb):
                    if closed:
                        nb.wait_for_savers(timeout=600)  # the checkpoint of the kernel's last cell
                    while (done := upload_newest(nb, bucket, keep=keep)) is not None:
                        _emit({"event": "uploaded", **asdict(done)})
                if fault:
                    _emit({"event": "resumed"})
                fault, delay = "", 1.0
            except RemoteError as exc:
                with contextlib.suppress(SaveError):
                    write_record(nb, bucket.url, fault={"kind": exc.kind, "message": str(exc), "since": time.time()})
                if exc.kind != fault:
                    _emit({"event": "fault", "kind": exc.kind, "message": f"cannot upload to {exc}"})
                fault, wanted = exc.kind, True
                retry_until = retry_until or (time.monotonic() + 600 if closed else 0.0)
            except Exception as exc:  # our bug or a local problem: told, and the next request tries again
                log.exception("upload failed")
                why = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
                _emit({"event": "fault", "kind": "local", "message": f"uploading to {bucket.url} failed: {why}"})
        if closed and (not wanted or (retry_until and time.monotonic() > retry_until)):
            return
        try:
            line = lines.get(timeout=delay if wanted else None)
        except queue.Empty:
            delay = min(delay * 2, 60.0)
            continue
        if line is None:
            closed, wanted = True, True
            retry_until = 0.0
            continue
        nb = _requested(store, line, nb)
        wanted = True
        # Let a burst of cells settle: one upload, of the newest state, half a second later (each
        # upload costs the server and this process CPU that the kernel's next cell would wait for).
        settle_until = time.monotonic() + UPLOAD_SETTLE_SECONDS
        while not fault and (left := settle_until - time.monotonic()) > 0:
            try:
                more = lines.get(timeout=left)
            except queue.Empty:
                break
            if more is None:
                closed = True
                break
            nb = _requested(store, more, nb)


def _requested(store: Store, line: str, nb: NotebookStore) -> NotebookStore:
    """The notebook an upload request names (it changes when the notebook is renamed)."""
    request = json.loads(line)
    if request.get("folder"):
        return NotebookStore(store, request.get("identity", ""), folder=Path(request["folder"]))
    return nb


def _download(config: dict[str, Any]) -> dict[str, Any]:
    store = Store(config["root"], config["key"].encode())
    nb = NotebookStore(store, config["identity"], folder=Path(config["folder"]))
    try:
        return {"ok": True, **asdict(download_newest(nb, Bucket(config["url"])))}
    except RemoteError as exc:
        return {"ok": False, "kind": exc.kind, "message": f"cannot read {exc}"}
    except (OSError, CheckpointError) as exc:  # this machine's side: the cache
        return {"ok": False, "kind": "local", "message": f"could not copy the bucket's checkpoint into {nb.dir}: {exc}"}


def _clear_one(config: dict[str, Any]) -> dict[str, Any]:
    nb = NotebookFolder(Path(config["root"]), config["identity"], folder=Path(config["folder"]))
    try:
        with _uploading(nb):  # not while this notebook's upload process commits the state being cleared
            freed = clear(Bucket(config["url"]), nb.dir.name)
    except RemoteError as exc:
        return {"ok": False, "kind": exc.kind, "message": f"could not clear {exc}"}
    return {"ok": True, "freed": freed}


def main(argv: list[str] | None = None) -> int:
    """The sync process: ``download`` or ``clear`` (one JSON request on stdin, one JSON answer on
    stdout) or ``serve`` (a JSON config line, then one line per upload request; JSON events out)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="[durable-kernel sync %(levelname)s] %(message)s")
    config = json.loads(sys.stdin.readline())
    if argv[:1] == ["download"]:
        _emit(_download(config))
        return 0
    if argv[:1] == ["clear"]:
        _emit(_clear_one(config))
        return 0
    # Background work: on a small machine the kernel's next cell goes first, and the kernel is not
    # what the OOM killer takes if this process ever grows.
    with contextlib.suppress(OSError):
        os.nice(10)
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            if line.strip():
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    _serve(config, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
