"""The per-user secret that signs manifests, as Jupyter signs notebooks.

A manifest names every blob by its BLAKE3 digest, so one HMAC-SHA256 over the
manifest vouches for every byte of the checkpoint: nothing whose signature or
digest fails is ever unpickled.

Whoever holds the key can make checkpoints this user's kernels will load, so
it must stay private: it is created 0600, a key other users can read is made
private again (with a warning), and one owned by another user is refused.
Moving state to another machine or user means moving the key too
(``durable-kernel key export`` / ``key import``, or ``$DURABLE_KERNEL_KEY``; see
the README).  :func:`key_id` names a key without revealing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .errors import KeyProblem
from .files import fsync_dir, make_private_dirs

KEY_FILENAME = "durable_kernel_secret"
#: Shortest key accepted from the user (the environment, ``key import``): ours are 64 hex characters,
#: and a short one is a mistake (an empty variable, a truncated paste), not a key.
MIN_KEY_CHARS = 32
#: Longest key: :func:`read_key` reads this much of a key file, so a longer one would not survive a round trip.
MAX_KEY_BYTES = 4096
_KEY_ID_PREFIX = b"durable-kernel key id\n"


def key_id(key: bytes) -> str:
    """A short, non-secret name of ``key`` (8 hex characters), written into each manifest as ``key_id``:
    it tells which key signed a checkpoint, so a user can tell a wrong key from a damaged file."""
    return hashlib.sha256(_KEY_ID_PREFIX + key).hexdigest()[:8]


def check_key(key: bytes, source: str, fix: str) -> bytes:
    """``key`` with surrounding whitespace removed, if it is long enough to be one of our keys;
    else :class:`KeyProblem` naming ``source`` (never the key itself) and saying ``fix``."""
    key = key.strip()
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_BYTES:
        size = "empty" if not key else f"{len(key)} characters long"
        raise KeyProblem(
            f"{source} is {size}, which is not a signing key (keys are {MIN_KEY_CHARS} to {MAX_KEY_BYTES} "
            f"characters; durable-kernel makes 64 hex characters); {fix}"
        )
    return key


def load_or_create_key(path: Path, warnings: list[str] | None = None) -> bytes:
    """Read the signing key at ``path``, creating it (mode 0600) on first use.

    Where the key lives is ``location.key_path`` (the one place that decides).

    Raises :class:`KeyProblem` with a message that says how to fix it when the
    key can be neither read nor created (a read-only data dir, a folder in its
    place, another user's file).  ``warnings`` collects what the user should
    know although the key is usable (it was readable by others).
    """
    path = Path(path)
    key = read_key(path, warnings)
    if key is not None:
        return key
    try:
        make_private_dirs(path.parent)
        return _create_key(path, warnings)
    except OSError as exc:
        raise KeyProblem(
            f"cannot create the signing key {path} ({exc.strerror or exc}); make {path.parent} writable, "
            "or point JUPYTER_DATA_DIR at a writable folder"
        ) from None


def read_key(path: Path, warnings: list[str] | None = None) -> bytes | None:
    """The key stored at ``path``; None if there is none yet (or only an empty file,
    which a full disk can leave behind and which never signed anything)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None  # not created yet (creating it says what stands in the way)
    except OSError as exc:
        raise KeyProblem(f"cannot read the signing key {path} ({exc.strerror or exc}); {_fix(path)}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise KeyProblem(f"the signing key {path} is not a regular file; {_fix(path)}")
    with open(fd, "rb") as f:
        if info.st_uid != os.geteuid():
            raise KeyProblem(
                f"the signing key {path} belongs to another user (uid {info.st_uid}), who could forge "
                f"checkpoints with it; {_fix(path)}"
            )
        key = f.read(4096).strip()
        if key and info.st_mode & 0o077:
            os.fchmod(f.fileno(), 0o600)
            if warnings is not None:
                warnings.append(
                    f"the signing key {path} was readable by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                    "it is private (0600) now. Anyone who copied it meanwhile could forge checkpoints: to be "
                    "safe, delete it and restart (existing checkpoints will then no longer load)."
                )
    if not key:
        with contextlib.suppress(OSError):
            path.unlink()  # an empty key is a failed first start, not a secret
        return None
    return key


def _fix(path: Path) -> str:
    return f"remove or fix it (rm -r '{path}'), or point JUPYTER_DATA_DIR at another folder"


def _create_key(path: Path, warnings: list[str] | None) -> bytes:
    # Written to a temp file and linked into place: the key file never exists
    # half-written (a full disk at the first start once left an empty one that
    # stopped every later start), and link() fails if another kernel won the race.
    key = secrets.token_hex(32).encode()
    try:
        write_key(path, key)
    except FileExistsError:  # another kernel created it first: use theirs
        theirs = read_key(path, warnings)
        if theirs is None:
            raise
        return theirs
    return key


def write_key(path: Path, key: bytes, *, replace: bool = False) -> None:
    """Store ``key`` at ``path`` (mode 0600, its folders 0700), atomically: a reader sees the old key
    or the new one, never part of one.  Without ``replace``, an existing file is left alone and
    ``FileExistsError`` raised (the caller decides whether a key may be replaced)."""
    path = Path(path)
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file exists, even if it appeared just now
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def sign(key: bytes, data: bytes) -> str:
    """Hex HMAC-SHA256 of ``data``."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def verify(key: bytes, data: bytes, signature: bytes | str) -> bool:
    """Constant-time check of a signature made by :func:`sign`."""
    # As bytes: compare_digest raises TypeError for a str with non-ASCII
    # characters, and a damaged signature line may hold any byte at all.
    if isinstance(signature, str):
        signature = signature.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(sign(key, data).encode("ascii"), signature)
