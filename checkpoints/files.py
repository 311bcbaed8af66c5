"""File-system helpers for the store: private folders, atomic writes, safe opens.

Everything the store writes is private to the user (folders 0700, files 0600,
whatever the umask), and everything it reads must be the user's own and not
writable by others: a file another user could write may change under a
copy-on-write mapping after it was verified.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UnsafeStore

#: Temp files (a write in progress, or a crash's leftover) start with this.
TMP_PREFIX = ".tmp-"
#: For files the store reads: a symlink is refused rather than followed, and a
#: FIFO planted under a file's name opens at once instead of waiting forever
#: for a writer (the caller then refuses it: it is not a regular file).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_CHUNK = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents, each 0700 whatever the umask
    (``Path.mkdir(parents=True)`` gives parents the umask's mode: 0777 under umask 0)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final: Path, chunks: Iterable[Any], durable: bool = True) -> int:
    """Write ``chunks`` to a temp file beside ``final``, fsync, rename. Returns bytes written.

    With ``durable=False`` the fsync is left to the caller, who must call
    :func:`sync_filesystem` before anything that names the file is committed:
    a commit of thousands of chunk blobs then pays one flush, not one per file.
    """
    tmp = final.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
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
        if durable:
            os.fsync(fd)
        elif _libc is not None and hasattr(_libc, "sync_file_range"):
            # Start writing it out now (without waiting): thousands of files left to the flusher
            # otherwise stall every writer on dirty-page limits, at a third of the disk's speed.
            _libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), _SYNC_FILE_RANGE_WRITE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, final)
    return written


def sync_filesystem(folder: Path) -> None:
    """Make every write on ``folder``'s file system durable (``syncfs``; ``sync`` where it is missing)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc is not None and _libc.syncfs(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syncfs.argtypes = [ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()


def foreign(info: os.stat_result) -> str | None:
    """Why a file or folder with this ``stat`` cannot be trusted, or None if it is the user's own.

    Root's files are trusted too (root can change anything anyway).
    """
    if info.st_uid not in (os.geteuid(), 0):
        return f"belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "can be written by other users"
    return None


def check_private(path: Path, what: str = "") -> None:
    """Raise :class:`UnsafeStore` if ``path`` (a folder of the store) is another user's or writable by others."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        info = path.stat()
    problem = foreign(info)
    if problem:
        fix = f"chmod go-w {path}" if "written" in problem else f"remove it or use another folder ({path})"
        raise UnsafeStore(f"{what or path} {problem}, so its checkpoints cannot be trusted; fix it with: {fix}")


def disk_usage(path: Path) -> int:
    """Bytes used by the files under ``path``."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total
