"""The byte-level file operations the store makes by key, on a local folder.

A store names its files by a key, a ``/``-separated path under the notebook's
folder (``manifests/000000000007.manifest``, ``blobs/ab/ab12...``).
:class:`LocalFolder` gets, puts, lists and deletes them: atomic replacement
(temp file, fsync, rename), private files, guarded reads (a symlink is never
followed, a FIFO never waited on, another user's file never trusted).
:class:`Backend` names those operations.  It is not a complete seam for
another kind of storage: commit and load also work on the local files
directly (``stat`` stamps, hard links, folder fsyncs, copy-on-write maps of
blobs, ``flock``), so object storage would need more than another class here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from .files import READ_FLAGS, TMP_PREFIX, foreign, fsync_dir, make_private_dirs, write_atomically


class NotARegularFile(OSError):
    """A key names a symlink, folder, FIFO or device: never read, never followed."""


class NotOwned(OSError):
    """A key names a file another user owns or can write: never trusted."""


class TooLarge(OSError):
    """A key names a file larger than the reader allows: refused unread."""


class Backend(Protocol):
    """The operations the store makes by key (see the module docstring for what it is not)."""

    def get(self, key: str, limit: int) -> bytes:
        """The object's bytes; :class:`TooLarge` past ``limit``, FileNotFoundError if absent."""

    def put(self, key: str, chunks: Iterable[Any], durable: bool = True) -> int:
        """Create or replace the object (readers see the old or the new one whole); returns bytes written.
        ``durable=False``: the caller makes it durable later (``files.sync_filesystem``)."""

    def publish(self, key: str, data: bytes) -> None:
        """:meth:`put`, made durable before returning: a checkpoint's commit point."""

    def list(self, prefix: str) -> list[str]:
        """Keys directly under ``prefix`` (a folder), temp files left out."""

    def delete(self, key: str) -> None:
        """Remove the object; no error if it is already gone."""


class LocalFolder:
    """A :class:`Backend` on a folder: atomic writes (temp file, fsync, rename), private files, guarded reads."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def open_regular(self, key: str) -> tuple[int, os.stat_result]:
        """Open a file for reading: ``(fd, its fstat)``, checked on the open file so nothing can be
        swapped in between.  Raises FileNotFoundError, :class:`NotARegularFile` (a symlink is refused,
        not followed; a FIFO opens at once instead of waiting for a writer) or :class:`NotOwned`."""
        try:
            # A string, not self.path(key): a restore opens thousands of chunks, and pathlib costs 20 us each.
            fd = os.open(f"{self.root}{os.sep}{key}", READ_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # what O_NOFOLLOW says of a symlink
                raise NotARegularFile(errno.ELOOP, "is a symlink") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFile(errno.EINVAL, "is not a regular file")
            problem = foreign(info)
            if problem:
                raise NotOwned(errno.EPERM, problem)
        except BaseException:
            os.close(fd)
            raise
        return fd, info

    def get(self, key: str, limit: int) -> bytes:
        fd, info = self.open_regular(key)
        with open(fd, "rb") as f:
            if info.st_size > limit:
                raise TooLarge(errno.EFBIG, f"has {info.st_size} bytes, more than {limit}")
            return f.read(limit + 1)

    def put(self, key: str, chunks: Iterable[Any], durable: bool = True) -> int:
        path = self.path(key)
        make_private_dirs(path.parent)
        return write_atomically(path, chunks, durable)

    def publish(self, key: str, data: bytes) -> None:
        path = self.path(key)
        make_private_dirs(path.parent)
        write_atomically(path, [data])
        fsync_dir(path.parent)

    def list(self, prefix: str) -> list[str]:
        try:
            names = os.listdir(self.path(prefix))
        except OSError:
            return []
        return sorted(name for name in names if not name.startswith(TMP_PREFIX))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))
