"""The store's exception types.

Every failure the store can meet is one of these, each with a message a user
can read; the kernel turns them into one line of output and logs the details.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class: something about saving or loading a checkpoint went wrong."""


class SaveError(CheckpointError):
    """A checkpoint could not be written; the previous one is untouched."""


class ReleasedTooEarly(SaveError):
    """A checkpoint child let go of memory it then had to read (``buffers_first.py``): nothing was
    saved from it; the kernel takes the checkpoint again without letting go early."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint is damaged: truncated, missing a blob, or failing its digest."""


class UntrustedCheckpoint(CorruptCheckpoint):
    """A manifest's signature does not match this user's key: it is never unpickled."""


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint was written by a schema version this code cannot read."""


class UnsafeStore(CheckpointError):
    """The store's folders or files can be written by other users: refuse to load."""


class KeyProblem(CheckpointError):
    """The signing key can be neither read nor created; the message says how to fix it."""
