"""durable_kernel.checkpoints: the snapshot format and the store.

A plain library, usable from any Python process: it never imports IPython,
ipykernel or zmq.  Save path: :func:`snapshot` (``serialize.py``) then
:meth:`NotebookStore.commit` (``store.py``).  Restore path:
:meth:`NotebookStore.load_latest_with_reasons`.  File format: ``manifest.py``
(signed JSON), ``folder.py`` (layout), ``blobs.py`` (content-addressed data),
and the names stored pickles reference (``serialize.py``).  Where the store
is: ``location.py``.
"""

from .errors import (
    CheckpointError,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    KeyProblem,
    SaveError,
    UnsafeStore,
    UntrustedCheckpoint,
)
from .manifest import SCHEMA_VERSION, Manifest, folder_name, printable
from .serialize import NotRestored, Skipped, Snapshot, Variable, snapshot
from .signing import load_or_create_key
from .store import CommitResult, NotebookStore, Restored, Store, disk_usage

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointError",
    "CommitResult",
    "CorruptCheckpoint",
    "IncompatibleCheckpoint",
    "KeyProblem",
    "Manifest",
    "NotRestored",
    "NotebookStore",
    "Restored",
    "SaveError",
    "Skipped",
    "Snapshot",
    "Store",
    "UnsafeStore",
    "UntrustedCheckpoint",
    "Variable",
    "disk_usage",
    "load_or_create_key",
    "printable",
    "snapshot",
    "folder_name",
]
