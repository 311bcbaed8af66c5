"""The per-user secret that signs manifests, as Jupyter signs notebooks.

A manifest names every blob by its BLAKE3 digest, so one HMAC-SHA256 over the
manifest vouches for every byte of the checkpoint: nothing whose signature or
digest fails is ever unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILENAME = "durable_kernel_secret"


def default_key_path() -> Path:
    """``durable_kernel_secret`` in Jupyter's data dir, beside ``notebook_secret``."""
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / KEY_FILENAME


def load_or_create_key(path: Path | None = None) -> bytes:
    """Read the signing key, creating it (mode 0600) on first use."""
    path = Path(path) if path is not None else default_key_path()
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another kernel created it first: use theirs
        return _read_key(path)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def _read_key(path: Path) -> bytes:
    key = path.read_bytes().strip()
    if not key:
        raise FileNotFoundError(path)
    return key


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
