"""Object storage (S3, GCS, Azure) by URL, through obstore: the network half of a bucket store.

A bucket store keeps the same layout as a local store folder, under the URL's prefix::

    <url>/<folder>/manifests/<id>.manifest
    <url>/<folder>/blobs/<d[:2]>/<d>

Credentials, region and endpoint come from where each cloud's own tools read
them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP=true`` for a plain-http endpoint such as
a self-hosted MinIO, Ceph or SeaweedFS; ``GOOGLE_*``; ``AZURE_*``; instance and
pod identity), as obstore reads them.

obstore runs a Rust async runtime that does not survive ``fork()``: a kernel
forks a checkpoint child per cell, so a kernel never imports this module.  It
talks to the bucket through a separate process (``sync.py``'s ``main``).

Every failure becomes a :class:`RemoteError` whose ``kind`` says what went wrong in
words a user acts on (unreachable, credentials, denied, no bucket, quota, throttled).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError

log = logging.getLogger(__name__)

#: URL schemes that name object storage rather than a folder.
SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "azure://", "abfs://", "abfss://")
#: Blobs at least this large are fetched as parallel ranged GETs.
RANGED_GET_BYTES = 128 * 1024 * 1024
#: Bytes per ranged GET: large, because each range costs a request and a seek (on this
#: project's 2-core benchmark machine 8 MiB ranges took twice as long as 64 MiB ones).
RANGE_BYTES = 64 * 1024 * 1024
#: Ranged GETs in flight at once for one blob.
RANGES_IN_FLIGHT = 4
#: Bytes per multipart upload part.
PART_BYTES = 8 * 1024 * 1024
#: Requests in flight at once, per transfer.
PARALLEL = 8


class RemoteError(CheckpointError):
    """The bucket could not be used just now; ``kind`` names why, the message says what to do."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def is_url(location: str | os.PathLike[str] | None) -> bool:
    """Does ``location`` (``DURABLE_KERNEL_DIR``, ``--dir``, ``checkpoint_dir``) name object storage?"""
    return isinstance(location, str) and location.lower().startswith(SCHEMES)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class Bucket:
    """A bucket store's objects, by key relative to the URL's prefix."""

    def __init__(self, url: str, environ: Mapping[str, str] | None = None):
        from obstore.store import from_url

        self.url = url.rstrip("/")
        environ = os.environ if environ is None else environ
        # Short connect timeouts and few retries: a kernel's uploads are retried by the sync
        # process anyway, and a restore must fall back to the local cache quickly when the
        # bucket is unreachable (obstore's default retries for three minutes).
        client = {"connect_timeout": "5s", "timeout": "300s"}
        if _flag(environ.get("AWS_ALLOW_HTTP")) or _flag(environ.get("ALLOW_HTTP")):
            client["allow_http"] = "true"  # obstore drops the variable's value once client options are given
        retry = {
            "max_retries": 3,
            "retry_timeout": datetime.timedelta(seconds=20),
            "backoff": {
                "init_backoff": datetime.timedelta(milliseconds=200),
                "max_backoff": datetime.timedelta(seconds=5),
                "base": 2.0,
            },
        }
        config: dict[str, Any] = {}
        endpoint = environ.get("AWS_ENDPOINT_URL") or environ.get("AWS_ENDPOINT")
        lowered = self.url.lower()
        if endpoint and lowered.startswith(("s3://", "s3a://")):
            config["endpoint"] = endpoint
            # Self-hosted S3 servers address buckets by path, not by DNS name.
            config.setdefault("virtual_hosted_style_request", False)
        try:
            options: dict[str, Any] = {"client_options": client, "retry_config": retry}
            if config:
                options["config"] = config
            self._store = from_url(self.url, **options)
        except Exception as exc:  # obstore raises its own types (or ValueError) for a bad URL or config
            raise RemoteError("config", f"cannot use {self.url}: {_first_line(exc)}") from None

    def __repr__(self) -> str:
        return f"Bucket({self.url!r})"

    # --- reading --------------------------------------------------------------

    def objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every object under ``prefix`` (recursive): key -> {"size", "age"} (age in seconds)."""
        import obstore

        now = datetime.datetime.now(datetime.timezone.utc)
        found: dict[str, dict[str, Any]] = {}
        with _translated(self.url):
            for batch in obstore.list(self._store, prefix.rstrip("/") + "/"):
                for meta in batch:
                    age = (now - meta["last_modified"]).total_seconds()
                    found[meta["path"]] = {"size": meta["size"], "age": max(0.0, age)}
        return found

    def folders(self) -> list[str]:
        """The notebook folders directly under the URL."""
        import obstore

        with _translated(self.url):
            listing = obstore.list_with_delimiter(self._store, None)
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"])

    def get(self, key: str) -> bytes:
        """An object's bytes; FileNotFoundError if it is absent."""
        import obstore

        with _translated(self.url):
            return bytes(obstore.get(self._store, key).bytes())

    def download(self, key: str, size: int, dest: Path) -> None:
        """Write an object of ``size`` bytes into the file ``dest``; large ones as parallel ranged GETs."""
        import obstore

        with _translated(self.url):
            if size < RANGED_GET_BYTES:
                data = obstore.get(self._store, key).bytes()
                if len(data) != size:
                    raise RemoteError("changed", f"{self.url}: {key} changed while it was read")
                dest.write_bytes(data)
                return
            starts = list(range(0, size, RANGE_BYTES))
            ends = [min(s + RANGE_BYTES, size) for s in starts]
            with open(dest, "wb") as out:
                out.truncate(size)

                # One request per range, several at a time: get_ranges would coalesce
                # neighbouring ranges into one serial GET.
                def fetch(i: int) -> None:
                    piece = obstore.get_range(self._store, key, start=starts[i], end=ends[i])
                    os.pwrite(out.fileno(), memoryview(piece), starts[i])

                with ThreadPoolExecutor(RANGES_IN_FLIGHT) as pool:
                    list(pool.map(fetch, range(len(starts))))

    # --- writing --------------------------------------------------------------

    def upload(self, key: str, source: BinaryIO) -> None:
        """Store the open file ``source`` at ``key`` (large ones as a parallel multipart upload)."""
        import obstore

        with _translated(self.url):
            obstore.put(self._store, key, source, chunk_size=PART_BYTES, max_concurrency=PARALLEL)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if nothing is there yet (If-None-Match): the commit point.
        False if another writer created it first."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            with _translated(self.url, passthrough=(AlreadyExistsError, PreconditionError)):
                obstore.put(self._store, key, data, mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    def delete(self, key: str) -> None:
        """Remove an object; no error if it is already gone."""
        import obstore

        with _translated(self.url):
            try:
                obstore.delete(self._store, key)
            except FileNotFoundError:
                pass


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextlib.contextmanager
def _translated(where: str, passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn obstore's exceptions into :class:`RemoteError` (FileNotFoundError passes through)."""
    try:
        yield
    except Exception as exc:  # obstore's own types, and the OSErrors of its transport
        if isinstance(exc, (FileNotFoundError, RemoteError, *passthrough)):
            raise
        raise classify(exc, where) from None


def classify(exc: BaseException, where: str) -> RemoteError:
    """One :class:`RemoteError` for an obstore failure: a short reason and what to do (the whole
    error goes to the log)."""
    from obstore import exceptions as ox

    text = str(exc)
    low = text.lower()
    log.warning("%s: %s", where, " ".join(text.split("Debug source:")[0].split()))
    status = re.search(r"status code: (\d{3}) ([A-Za-z ]+)", text)
    answered = f"the server answered {status.group(1)} {status.group(2).strip()}" if status else ""
    if isinstance(exc, ox.UnauthenticatedError) or any(
        s in low for s in ("expiredtoken", "invalidaccesskeyid", "signaturedoesnotmatch", "401 unauthorized")
    ):
        return RemoteError(
            "credentials",
            f"{where}: the credentials were refused or have expired; renew them (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or your cloud's login)",
        )
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return RemoteError("no-bucket", f"{where}: the bucket does not exist; create it, or fix the URL")
    if any(s in low for s in ("quotaexceeded", "quota exceeded", "insufficient storage", "status code: 507")):
        return RemoteError("quota", f"{where}: the storage quota is exceeded; free space in the bucket")
    if any(s in low for s in ("slowdown", "status code: 503", "status code: 429", "toomanyrequests")):
        return RemoteError("throttled", f"{where}: the server asks to slow down ({answered or 'throttled'})")
    if isinstance(exc, ox.PermissionDeniedError) or "accessdenied" in low or "status code: 403" in low:
        return RemoteError(
            "denied", f"{where}: access denied (the bucket may not exist, or these credentials may not use it)"
        )
    if status and status.group(1).startswith("5"):
        return RemoteError("unreachable", f"{where}: the server is failing ({answered})")
    if any(s in low for s in ("error sending request", "connection refused", "dns error", "timed out", "connect")):
        return RemoteError("unreachable", f"{where}: the server cannot be reached")
    return RemoteError("other", f"{where}: {answered or _first_line(exc)}")
