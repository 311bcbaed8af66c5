"""Where the checkpoints are, and which key signs them: the one place that decides.

Used by the kernel, the ``durable-kernel`` command, the server extension, the
demo, the benchmarks and the tests, so that they all open the same store.

The folder: ``--dir`` (``explicit``) if given, else ``$DURABLE_KERNEL_DIR``,
else ``c.DurableKernel.checkpoint_dir`` (``configured``), else
``durable_kernel/`` under Jupyter's data dir.  Any of them may be a bucket URL
(``s3://bucket/prefix``, ``gs://``, ``az://``): the store is then a local cache
folder (``cache_dir``, default ``durable_kernel_cache/<bucket and prefix>`` under
Jupyter's data dir) whose checkpoints are uploaded there (``sync.py``).  The key: ``durable_kernel_secret``
in Jupyter's data dir (``$JUPYTER_DATA_DIR`` or ``jupyter --data-dir``).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from .bucket import is_url
from .errors import KeyProblem
from .signing import KEY_FILENAME, load_or_create_key, read_key
from .store import Store

DIR_VARIABLE = "DURABLE_KERNEL_DIR"


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Jupyter's data dir for ``environ`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    if environ.get("JUPYTER_DATA_DIR"):
        return Path(environ["JUPYTER_DATA_DIR"]).expanduser()
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir())


def key_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where this user's signing key lives."""
    return data_dir(environ) / KEY_FILENAME


def store_location(
    explicit: str | os.PathLike[str] | None = None,
    configured: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Where the store is, as the user gave it (a folder or a bucket URL): ``explicit`` (a ``--dir``),
    else ``$DURABLE_KERNEL_DIR``, else ``configured`` (``c.DurableKernel.checkpoint_dir``), else
    ``durable_kernel/`` under Jupyter's data dir."""
    environ = os.environ if environ is None else environ
    for choice in (explicit, environ.get(DIR_VARIABLE), configured):
        if choice:
            return os.fspath(choice)
    return str(data_dir(environ) / "durable_kernel")


def store_root(
    explicit: str | os.PathLike[str] | None = None,
    configured: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The local store folder: the one named (see :func:`store_location`), or a bucket's cache."""
    location = store_location(explicit, configured, environ)
    if is_url(location):
        return cache_root(location, cache_dir, environ)
    return Path(location).expanduser()


def cache_root(
    url: str, cache_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The local cache of a bucket store: ``cache_dir`` if given, else one folder per bucket URL
    under ``durable_kernel_cache/`` in Jupyter's data dir (named so a person can tell which)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[:80]
    tag = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:8]
    return data_dir(environ) / "durable_kernel_cache" / f"{url.split('://', 1)[0]}-{readable}-{tag}"


def open_store(
    explicit: str | os.PathLike[str] | None = None,
    configured: str | os.PathLike[str] | None = None,
    *,
    create_key: bool = True,
    environ: Mapping[str, str] | None = None,
    warnings: list[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Store:
    """The store, with this user's key.

    ``create_key=True`` (a kernel) creates the key on first use and raises
    :class:`KeyProblem` if it can be neither read nor created.  With
    ``create_key=False`` (reading tools) nothing is created: a missing or
    unreadable key gives a store whose key verifies nothing, and the reason
    in ``Store.key_problem``.  ``environ`` stands for the environment a kernel
    would get (tests and benchmarks prepare stores for their kernels this way).
    """
    location = store_location(explicit, configured, environ)
    remote = location.rstrip("/") if is_url(location) else None
    root = store_root(explicit, configured, environ, cache_dir)
    path = key_path(environ)
    if create_key:
        return Store(root, load_or_create_key(path, warnings), remote=remote)
    problem = None
    try:
        key = read_key(path, warnings)
    except KeyProblem as exc:
        key, problem = None, str(exc)
    return Store(root, key if key is not None else secrets.token_hex(32).encode(), key_problem=problem, remote=remote)
