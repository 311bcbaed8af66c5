"""The kernel's side of a bucket store: download before restore, upload after every commit.

The kernel never waits for the network on a cell, and never talks to the bucket
itself: obstore's runtime does not survive the ``fork()`` of every checkpoint, so
a separate process does it (``python -m durable_kernel.checkpoints.sync``):

- at start, a short-lived ``download`` process brings the bucket's newest checkpoint
  into the local cache if it is newer (a fresh machine), then the kernel restores from
  the cache as it always does;
- meanwhile a long-lived ``serve`` process uploads the cache's newest checkpoint
  whenever the kernel says one was committed.  It lives in a session of its own, like
  a checkpoint child: when the kernel exits it waits for the last checkpoint, uploads
  it and exits.

The key reaches both on their stdin, never on a command line or in a file.
Faults are told once per kind ("cannot upload …"), and once more when uploads work again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from durable_kernel.checkpoints import NotebookStore, Store

from . import humanize

log = logging.getLogger(__name__)

_SYNC = [sys.executable, "-m", "durable_kernel.checkpoints.sync"]


def _config(store: Store, nb: NotebookStore, **extra: Any) -> bytes:
    config = {
        "url": store.remote,
        "root": str(store.root),
        "key": store.key.decode(),
        "identity": nb.identity,
        "folder": str(nb.dir),
        **extra,
    }
    return (json.dumps(config) + "\n").encode()


def download(store: Store, nb: NotebookStore, timeout: float) -> tuple[list[str], bool]:
    """Bring the bucket's newest checkpoint into the cache when it is newer.

    Returns the lines to tell and whether the bucket could be read (if not, the lines say
    why, and the caller says what it restored from the cache instead)."""
    url = store.remote
    try:
        done = subprocess.run(
            [*_SYNC, "download"],
            input=_config(store, nb),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [f"{url} did not answer within {humanize.duration(timeout)}"], False
    except OSError as exc:
        log.warning("cannot start the download from %s: %s", url, exc)
        return [f"could not read {url} (details in the kernel log)"], False
    try:
        answer = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        log.warning("download from %s failed (exit %s): %s", url, done.returncode, done.stderr.decode()[-2000:])
        return [f"could not read {url} (details in the kernel log)"], False
    if not answer.get("ok"):
        log.warning("download from %s: %s", url, answer.get("message"))
        return [str(answer.get("message"))], False
    lines = [f"not taken from {url}: {note}" for note in answer.get("notes", [])]
    if answer.get("generation") is not None:
        lines.append(
            f"downloaded checkpoint {answer['remote']} from {url} "
            f"({humanize.size(answer['bytes'])} in {humanize.duration(answer['seconds'])})."
        )
    return lines, True


def clear(store: Store, nb: NotebookStore, timeout: float = 120.0) -> str:
    """Delete the notebook's checkpoints in the bucket; "" when done, else why not (one line)."""
    try:
        done = subprocess.run(
            [*_SYNC, "clear"], input=_config(store, nb), capture_output=True, timeout=timeout, check=False
        )
        answer = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as exc:
        log.warning("clear in %s failed: %s", store.remote, exc)
        return f"could not clear {store.remote} (details in the kernel log)"
    return "" if answer.get("ok") else str(answer.get("message"))


class Uploads:
    """The sync process that uploads this kernel's checkpoints, and what it reports."""

    def __init__(self, store: Store, keep: int, tell: Callable[[str, str], None]):
        #: ``tell(key, line)``: say ``line`` to the user once per ``key``
        self.store = store
        self.keep = keep
        self.tell = tell
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        #: the last fault reported ("" when uploads work)
        self.fault = ""
        self.last: dict[str, Any] | None = None

    def request(self, nb: NotebookStore) -> None:
        """Upload the newest checkpoint of ``nb`` soon (never blocks; requests coalesce)."""
        line = (json.dumps({"op": "upload", "folder": str(nb.dir), "identity": nb.identity}) + "\n").encode()
        with self._lock:
            for _ in range(2):
                process = self._process
                if process is None or process.poll() is not None:
                    process = self._start(nb)
                    if process is None:
                        return
                try:
                    assert process.stdin is not None
                    process.stdin.write(line)
                    process.stdin.flush()
                    return
                except (OSError, ValueError):
                    self._process = None  # it died: start another

    def _start(self, nb: NotebookStore) -> subprocess.Popen[bytes] | None:
        try:
            process = subprocess.Popen(
                [*_SYNC, "serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # outlives the kernel to upload its last checkpoint
                close_fds=True,
            )
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(_config(self.store, nb, keep=self.keep))
            process.stdin.flush()
        except OSError as exc:
            log.exception("cannot start the upload process")
            self.tell("upload-start", f"cannot start uploading to {self.store.remote}: {exc}")
            return None
        self._process = process
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True, name="durable-uploads").start()
        return process

    def _read(self, stdout: IO[bytes]) -> None:
        for raw in stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            self._note(event)

    def _note(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        url = self.store.remote
        if kind == "uploaded":
            self.last = event
            log.info(
                "uploaded checkpoint %s to %s as %s: %s blobs, %s in %.2f s",
                event.get("generation"),
                url,
                event.get("remote"),
                event.get("blobs"),
                humanize.size(event.get("bytes", 0)),
                event.get("seconds", 0.0),
            )
        elif kind == "fault":
            log.warning("upload to %s: %s", url, event.get("message"))
            if event.get("kind") != self.fault:
                self.fault = str(event.get("kind"))
                self.tell(
                    f"upload {self.fault}",
                    f"{event.get('message')}. Checkpoints are kept on this machine meanwhile "
                    "and uploaded when it works again ('%checkpoint status' shows how many wait).",
                )
        elif kind == "resumed":
            if self.fault:
                self.tell("upload resumed", f"uploading to {url} works again; waiting checkpoints are uploaded.")
            self.fault = ""

    def close(self) -> None:
        """Let the sync process finish on its own: it uploads the last checkpoint, then exits."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None and process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()

    def status(self, nb: NotebookStore) -> str:
        """One line for ``%checkpoint status``: uploaded, or how many wait, and the fault if any."""
        from durable_kernel.checkpoints.sync import read_record, waiting

        url = self.store.remote or ""
        count = waiting(nb, url)
        record = read_record(nb, url)
        fault = record.get("fault") or {}
        if count == 0:
            line = f"uploaded to {url}" + (f" (checkpoint {record['remote']} there)" if record.get("remote") else "")
        else:
            line = f"{humanize.plural(count, 'checkpoint')} waiting to upload to {url}"
        if fault and count:
            line += f" (last try: {fault.get('message')})"
        return line
