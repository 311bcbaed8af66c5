"""The manifest: a signed JSON file that describes one checkpoint.

File layout (``<generation>.manifest``)::

    durable-kernel-manifest\\n
    <hex HMAC-SHA256 of the JSON bytes>\\n
    <JSON bytes>

The signature is checked before the JSON is even parsed.  The JSON holds::

    schema            SCHEMA_VERSION
    generation        int, increasing per notebook
    created           unix time (float)
    execution_count   the cell count when the state was taken
    identity          the notebook as the user knows it (path or session name)
    cell              first line of the cell that produced this state
    writer            {"pid", "host", "id"} of the kernel that wrote it
    versions          {"python", "dill", "durable_kernel", "packages": {...}}
    variables         [{name, type, kind, size, digest?, inline?, buffers?, target?}]
    skipped           [{name, type, reason}]

A variable of kind ``pickle`` has its payload either ``inline`` (base64, for
small ones) or in the blob ``digest``; ``buffers`` lists the digests and sizes
of its out-of-band buffers, in pickle order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import signing
from .errors import CorruptCheckpoint, IncompatibleCheckpoint, UntrustedCheckpoint

SCHEMA_VERSION = 1
MAGIC = b"durable-kernel-manifest\n"
#: Manifests larger than this are refused unread: no honest one comes close.
MAX_MANIFEST_BYTES = 1 << 30
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Manifest:
    """A parsed, verified manifest; ``data`` is the JSON object."""

    data: dict[str, Any]

    @property
    def generation(self) -> int:
        return self.data["generation"]

    @property
    def created(self) -> float:
        return self.data["created"]

    @property
    def execution_count(self) -> int:
        return self.data["execution_count"]

    @property
    def identity(self) -> str:
        return self.data["identity"]

    @property
    def variables(self) -> list[dict[str, Any]]:
        return self.data["variables"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self.data["skipped"]

    def blob_digests(self) -> set[str]:
        """Every blob this checkpoint needs."""
        return referenced_blobs(self.data)


def fingerprint(data: dict[str, Any]) -> dict[str, tuple]:
    """Per variable, what identifies its stored value: equal fingerprints, equal values."""
    return {
        var["name"]: (
            var.get("kind"),
            var.get("digest") or var.get("target"),
            tuple(b.get("digest") for b in var.get("buffers", [])),
        )
        for var in data.get("variables", [])
    }


def diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """``(added, removed, changed)`` variable names from manifest ``old`` to ``new``."""
    before, after = fingerprint(old), fingerprint(new)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(name for name in set(before) & set(after) if before[name] != after[name])
    return added, removed, changed


def referenced_blobs(data: dict[str, Any]) -> set[str]:
    """Blob digests named by a manifest's JSON object."""
    found: set[str] = set()
    for var in data.get("variables", []):
        if var.get("digest") and "inline" not in var:
            found.add(var["digest"])
        for buf in var.get("buffers", []):
            found.add(buf["digest"])
    return found


def encode(data: dict[str, Any], key: bytes) -> bytes:
    """Serialize and sign a manifest's JSON object."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return MAGIC + signing.sign(key, body).encode() + b"\n" + body


def decode(raw: bytes, key: bytes, where: str) -> Manifest:
    """Verify and parse a manifest file's bytes; ``where`` names it in errors."""
    if not raw.startswith(MAGIC):
        raise CorruptCheckpoint(f"{where} is not a durable-kernel manifest")
    rest = raw[len(MAGIC):]
    signature, sep, body = rest.partition(b"\n")
    if not sep:
        raise CorruptCheckpoint(f"{where} is truncated")
    if not signing.verify(key, body, signature):
        raise UntrustedCheckpoint(
            f"{where} is not signed with this user's key (changed or copied from elsewhere); it was not loaded"
        )
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise CorruptCheckpoint(f"{where} is not valid JSON: {exc}") from None
    _validate(data, where)
    return Manifest(data)


def _validate(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{where}: manifest is not a JSON object")
    schema = data.get("schema")
    if not isinstance(schema, int):
        raise CorruptCheckpoint(f"{where}: manifest has no schema version")
    if schema > SCHEMA_VERSION:
        raise IncompatibleCheckpoint(
            f"{where} was written by a newer durable-kernel (schema {schema}, this one reads "
            f"{SCHEMA_VERSION}); upgrade durable-kernel to load it"
        )
    if schema < SCHEMA_VERSION:
        raise IncompatibleCheckpoint(f"{where} uses old schema {schema}, which this version cannot read")
    expected = {
        "generation": int,
        "created": (int, float),
        "execution_count": int,
        "identity": str,
        "variables": list,
        "skipped": list,
    }
    for name, kind in expected.items():
        if not isinstance(data.get(name), kind):
            raise CorruptCheckpoint(f"{where}: manifest field {name!r} is missing or malformed")
    for item in data["skipped"]:
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("name", "type", "reason"))):
            raise CorruptCheckpoint(f"{where}: manifest entry {str(item)[:80]!r} is malformed")
    for var in data["variables"]:
        ok = isinstance(var, dict) and isinstance(var.get("name"), str) and isinstance(var.get("type", ""), str)
        ok = ok and isinstance(var.get("size", 0), int) and var.get("kind") in (
            "pickle",
            "module",
            "alias",
        )
        if ok and var["kind"] == "pickle":
            ok = isinstance(var.get("digest"), str) and bool(_DIGEST.match(var["digest"]))
            ok = ok and isinstance(var.get("inline", ""), str) and isinstance(var.get("buffers", []), list)
            ok = ok and all(
                isinstance(b, dict) and isinstance(b.get("digest"), str) and _DIGEST.match(b["digest"])
                and isinstance(b.get("size"), int) and b["size"] >= 0
                for b in var.get("buffers", [])
            )
        elif ok:
            ok = isinstance(var.get("target"), str)
        if not ok:
            raise CorruptCheckpoint(f"{where}: manifest entry {str(var)[:80]!r} is malformed")
