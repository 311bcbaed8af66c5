"""Where the checkpoints are, and which key signs them: the one place that decides.

Used by the kernel, the ``durable-kernel`` command, the server extension, the
demo, the benchmarks and the tests, so that they all open the same store.

The folder: ``--dir`` (``explicit``) if given, else ``$DURABLE_KERNEL_DIR``,
else ``c.DurableKernel.checkpoint_dir`` (``configured``), else
``durable_kernel/`` under Jupyter's data dir.  Any of them may be a bucket URL
(``s3://bucket/prefix``, ``gs://``, ``az://``): the store is then a local cache
folder (``cache_dir``, default ``durable_kernel_cache/<bucket and prefix>`` under
Jupyter's data dir) whose checkpoints are uploaded there (``sync.py``).  The key:
``$DURABLE_KERNEL_KEY`` (the key itself, e.g. from a Kubernetes secret; never
written to disk), else the file ``key_file`` (``c.DurableKernel.key_file``,
``--key-file``), else ``durable_kernel_secret`` in Jupyter's data dir
(``$JUPYTER_DATA_DIR`` or ``jupyter --data-dir``).
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
from .signing import KEY_FILENAME, check_key, load_or_create_key, read_key
from .store import Store

DIR_VARIABLE = "DURABLE_KERNEL_DIR"
KEY_VARIABLE = "DURABLE_KERNEL_KEY"


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Jupyter's data dir for ``environ`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    if environ.get("JUPYTER_DATA_DIR"):
        return Path(environ["JUPYTER_DATA_DIR"]).expanduser()
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir())


def key_path(environ: Mapping[str, str] | None = None, key_file: str | os.PathLike[str] | None = None) -> Path:
    """Where this user's signing key file is: ``key_file`` if given, else ``durable_kernel_secret`` in
    Jupyter's data dir.  ``$DURABLE_KERNEL_KEY`` wins over any file (:func:`key_file_in_use`)."""
    if key_file:
        return Path(key_file).expanduser()
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


def key_file_in_use(
    environ: Mapping[str, str] | None = None, key_file: str | os.PathLike[str] | None = None
) -> Path | None:
    """The key file the key comes from; None when ``$DURABLE_KERNEL_KEY`` holds it (no file is used)."""
    environ = os.environ if environ is None else environ
    return None if KEY_VARIABLE in environ else key_path(environ, key_file)


def key_from_environment(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The key ``$DURABLE_KERNEL_KEY`` holds (surrounding whitespace stripped), None if it is not set.

    Set but empty or too short is a :class:`KeyProblem`, not a reason to fall back to a key
    file: the user meant this key, and checkpoints signed with another one would not load.
    """
    environ = os.environ if environ is None else environ
    if KEY_VARIABLE not in environ:
        return None
    return check_key(
        os.fsencode(environ[KEY_VARIABLE]),
        f"${KEY_VARIABLE}",
        "set it to the output of 'durable-kernel key export' on the machine that holds your key, "
        "or unset it to use the key file",
    )


def load_key(
    *,
    create: bool,
    key_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    warnings: list[str] | None = None,
) -> bytes | None:
    """This user's signing key: ``$DURABLE_KERNEL_KEY``, else the file :func:`key_path` names.

    ``create=True`` (a kernel) creates a missing key file, even a configured ``key_file``;
    ``create=False`` (reading tools) returns None for a missing default key file and raises
    :class:`KeyProblem` for a missing ``key_file``, which the user named on purpose.
    """
    key = key_from_environment(environ)
    if key is not None:
        return key  # never written anywhere: a key given this way stays where the user keeps it
    path = key_path(environ, key_file)
    if create:
        return load_or_create_key(path, warnings)
    key = read_key(path, warnings)
    if key is None and key_file:
        raise KeyProblem(
            f"the key file {path} does not exist; give the right path, or put the key there with "
            f"'durable-kernel key import --key-file {path}'"
        )
    return key


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
    key_file: str | os.PathLike[str] | None = None,
) -> Store:
    """The store, with this user's key (:func:`load_key`; ``key_file``: ``c.DurableKernel.key_file``, ``--key-file``).

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
    if create_key:
        created = load_key(create=True, key_file=key_file, environ=environ, warnings=warnings)
        assert created is not None  # for mypy: creating gives a key or raises
        return Store(root, created, remote=remote)
    problem = None
    try:
        key = load_key(create=False, key_file=key_file, environ=environ, warnings=warnings)
    except KeyProblem as exc:
        key, problem = None, str(exc)
    return Store(root, key if key is not None else secrets.token_hex(32).encode(), key_problem=problem, remote=remote)
