"""One notebook's folder in the store: its layout, its locks, and what may be trusted in it.

Layout under the store's root (folders 0700, files 0600, all the user's own)::

    <root>/<folder>/              one folder per notebook; folder = manifest.folder_name(identity)
        lock                      flock'd while committing, pruning, clearing or moving
        saving                    flock'd (shared) by every checkpoint process while it lives
        settings.json             remembered per-notebook settings (excluded names)
        manifests/<id>.manifest   one per kept checkpoint, id as 12 digits (see manifest.py)
        blobs/<d[:2]>/<d>         pickles and raw buffers, named by BLAKE3 digest d
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import manifest as manifest_format
from .backend import LocalFolder, NotARegularFile, NotOwned, TooLarge
from .errors import CorruptCheckpoint, UnsafeStore, UntrustedCheckpoint
from .files import TMP_PREFIX, check_private, disk_usage, make_private_dirs
from .manifest import folder_name

log = logging.getLogger(__name__)

_CHECKPOINT_FILE = re.compile(r"^([0-9]{1,18})\.manifest$")


class NotebookFolder:
    """The files of one notebook: where each lives, who may touch them, and when."""

    def __init__(self, root: Path, identity: str, folder: Path | None = None):
        self.root = root
        self.identity = identity
        self.dir = folder if folder is not None else root / folder_name(identity)
        self.manifests_dir = self.dir / "manifests"
        self.blobs_dir = self.dir / "blobs"
        self.files = LocalFolder(self.dir)
        #: digests of blobs found damaged while loading: the next commit checks
        #: their bytes even if their file looks unchanged
        self.damaged_digests: set[str] = set()

    # --- layout -------------------------------------------------------------

    @staticmethod
    def blob_key(digest_hex: str) -> str:
        return f"blobs/{digest_hex[:2]}/{digest_hex}"

    @staticmethod
    def manifest_key(checkpoint_id: int) -> str:
        return f"manifests/{checkpoint_id:012d}.manifest"

    def blob_path(self, digest_hex: str) -> Path:
        """Where the blob named ``digest_hex`` lives."""
        return self.files.path(self.blob_key(digest_hex))

    def blob_file(self, digest_hex: str) -> str:
        """:meth:`blob_path` as a string, made without pathlib (a commit asks for thousands)."""
        return f"{self.blobs_dir}{os.sep}{digest_hex[:2]}{os.sep}{digest_hex}"

    def manifest_path(self, checkpoint_id: int) -> Path:
        """Where checkpoint ``checkpoint_id``'s manifest lives."""
        return self.files.path(self.manifest_key(checkpoint_id))

    def ensure_dirs(self) -> None:
        make_private_dirs(self.root)
        for path in (self.dir, self.manifests_dir, self.blobs_dir):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)

    def checkpoint_ids(self) -> list[int]:
        """Committed checkpoint ids, newest first."""
        names = self.files.list("manifests")
        return sorted((int(m.group(1)) for m in map(_CHECKPOINT_FILE.match, names) if m), reverse=True)

    def blob_folders(self) -> list[Path]:
        """The ``blobs/<2 hex>`` folders."""
        try:
            return [Path(e.path) for e in os.scandir(self.blobs_dir) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return []

    def blob_names(self) -> set[str]:
        """The names of every stored blob (temp files left out)."""
        return {name for folder in self.blob_folders() for name in self.files.list(f"blobs/{folder.name}")}

    # --- locks ----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, wait: bool = True, create: bool = True) -> Iterator[bool]:
        """Hold this notebook's lock: one committer, pruner, clearer or mover at a time.

        With ``wait=False`` it yields False at once if someone else holds it.
        With ``create=False`` (clearing, collecting) a notebook folder that is
        gone is not made again: FileNotFoundError.
        """
        fd = self._acquire_lock(wait, create)
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            os.close(fd)

    def _acquire_lock(self, wait: bool, create: bool) -> int | None:
        """flock the ``lock`` file that is there now; its fd, or None if busy and ``wait`` is False."""
        path = self.dir / "lock"
        while True:
            if create:
                self.ensure_dirs()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = os.fstat(fd)
                try:
                    now: os.stat_result | None = os.stat(path)
                except FileNotFoundError:
                    now = None
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            # The lock file was deleted or replaced while we waited for it (by
            # an older version's clear, or a user's rm -r): whoever opened the
            # new file may hold it right now, so the lock we got excludes
            # nobody.  Lock the file that is there now instead.
            os.close(fd)

    def hold_saving(self) -> int | None:
        """Open and share-lock this notebook's ``saving`` file; returns the fd (or None).

        A checkpoint process keeps the fd for its whole life (it is inherited
        across fork), so :meth:`wait_for_savers` can wait until every
        checkpoint that was started has finished, even after its kernel exited.
        """
        try:
            try:  # once per cell: the folders exist nearly always, so do not make sure first
                fd = os.open(self.dir / "saving", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                self.ensure_dirs()
                fd = os.open(self.dir / "saving", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        with contextlib.suppress(OSError):  # someone waits for the savers this instant: the commit lock still orders us
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
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
            deadline = time.monotonic() + timeout
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True if waited else None
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        return False
                waited = True
                time.sleep(0.05)
        except OSError:
            return None
        finally:
            os.close(fd)  # releases the lock at once: savers that start later share it again

    # --- reading, guarded -------------------------------------------------------

    def manifest_bytes(self, checkpoint_id: int) -> bytes:
        """A manifest's raw bytes, unverified (the one guarded reader of manifests).

        CorruptCheckpoint for one that can never load (gone, a symlink, not a
        regular file, too big), UntrustedCheckpoint for another user's; OSError
        for one that cannot be read just now.  A FIFO planted as a manifest is
        refused at once, never waited on.
        """
        where = f"checkpoint {checkpoint_id}"
        try:
            return self.files.get(self.manifest_key(checkpoint_id), manifest_format.MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{where} no longer exists") from None
        except NotARegularFile as exc:
            detail = " (a symlink)" if "symlink" in str(exc) else ""
            raise CorruptCheckpoint(f"{where}: manifest is not a regular file{detail}") from None
        except NotOwned as exc:
            raise UntrustedCheckpoint(f"{where}: its manifest {exc.strerror}; it was not loaded") from None
        except TooLarge:
            raise CorruptCheckpoint(f"{where}: manifest is implausibly large") from None

    def read_settings(self) -> dict[str, Any]:
        """This notebook's remembered settings (such as excluded names); {} if none."""
        try:
            data = json.loads(self.files.get("settings.json", 1 << 20))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_settings(self, settings: dict[str, Any]) -> None:
        """Replace this notebook's settings, atomically."""
        self.ensure_dirs()
        self.files.put("settings.json", [json.dumps(settings, indent=1).encode()])

    # --- trust ------------------------------------------------------------------

    def check_safe(self) -> None:
        """Refuse a store whose folders other users own or could write into."""
        for folder in (self.root, self.dir, self.manifests_dir, self.blobs_dir):
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
        be the wrong one, and other checkpoints may need the blob.

        Only under the lock, so that no commit is deciding meanwhile that the
        blob is already stored.  If the lock is busy the blob is left where it
        is; the next commit checks it anyway (it is remembered as damaged).
        """
        self.damaged_digests.add(digest_hex)
        try:
            with self.locked(wait=False) as held:
                if held:
                    self.set_aside_locked(digest_hex, found)
        except OSError as exc:
            log.warning("could not set aside damaged blob %s: %s", digest_hex[:12], exc)

    def set_aside_locked(self, digest_hex: str, found: os.stat_result) -> None:
        """:meth:`set_aside`, for a caller holding the lock."""
        # Renamed to a temp name, which the next sweep removes; and only if it
        # is still the file found damaged, never a good one written since.
        path = self.blob_path(digest_hex)
        try:
            now = path.lstat()
            if (now.st_dev, now.st_ino) != (found.st_dev, found.st_ino):
                return
            aside = path.with_name(f"{TMP_PREFIX}damaged-{secrets.token_hex(4)}")
            os.rename(path, aside)
            if stat.S_ISDIR(now.st_mode):
                shutil.rmtree(aside, ignore_errors=True)  # the sweep deletes files only
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not set aside damaged blob %s: %s", digest_hex[:12], exc)

    def clear(self) -> int:
        """Delete every checkpoint of this notebook (its manifests, then its blobs); returns bytes freed.

        Call under :meth:`locked`, after :meth:`check_safe_to_delete`.  The
        folder stays, with its ``lock`` and ``saving`` files (a process waiting
        for either would otherwise hold the deleted file while the next one
        holds its replacement, both "alone") and its settings (names the user
        excluded on purpose).  Temp files beside the settings are gc's: they
        are written without the lock, so their writer may still be at work.
        """
        # Manifests first: a crash half-way leaves blobs that no manifest
        # names (gc removes them), never a manifest whose blobs are gone.
        return _empty(self.manifests_dir) + _empty(self.blobs_dir)


def _empty(folder: Path) -> int:
    """Delete everything inside ``folder`` (never following a symlink), keeping the folder; returns bytes freed."""
    freed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            if entry.is_dir(follow_symlinks=False):
                freed += disk_usage(Path(entry.path))
                shutil.rmtree(entry.path)
            else:
                size = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
                freed += size
        except FileNotFoundError:
            continue
    return freed
