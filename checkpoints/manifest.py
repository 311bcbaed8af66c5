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
    writer            {"pid", "host", "id", "kernel"?, "seq"?} of the kernel that wrote it
                      ("kernel": its connection file's name, which survives a restart;
                      "seq": which of that kernel's checkpoints this is)
    versions          {"python", "dill", "durable_kernel", "packages": {...}}
    variables         [{name, type, kind, size, digest?, inline?, stamp?, stream?, buffers?, pieces?,
                        target?, python?, members?, span?, part?}]
    skipped           [{name, type, reason}]
    cells?            [{execution_count, source, reads, binds, ok, seconds}]: the cells run, as the
                      kernel records them (to say which cell made a variable, and to run it again)
    key_id?           8 hex characters naming the key that signed it (``signing.key_id``; 0.3+, older
                      manifests lack it): a manifest that fails its signature is reported as signed with
                      another key, and which, only when this (unverified) id differs from ours

A variable of kind ``pickle`` has its payload either ``inline`` (base64, for
small ones) or in the blob ``digest``; ``buffers`` lists the digests and sizes
of its out-of-band buffers, in pickle order.  ``stamp`` (on a variable for its
payload blob, on each buffer for its own) is ``[inode, ctime_ns]`` of the blob
file as committed: a file whose stamp is unchanged has not been written since,
so it can be reused or mapped without hashing it again; any other is checked.
Variables that share objects (``fig`` and its ``ax``) are saved together, as
one pickle stream that loads them in turn with one memo: the first one is of
kind ``pickle`` and lists ``members`` (itself first), holding the stream;
each other is of kind ``member`` with ``target`` naming the first.  Each has
its own ``buffers`` (the stream takes them in member order), its ``span``
``[start, end]`` in the stream and ``part``, the digest of that slice (what a
diff compares).  Schema 2 added groups; schema 1 manifests load unchanged.

Chunks (schema 3, ``chunking.py``): a payload over 1 MiB is not one blob but
``stream``, a list of ``{digest, size, stamp}`` chunks to concatenate (its
``digest`` still names the whole pickle, which is checked after joining); a
buffer over 512 KiB is several consecutive ``buffers`` entries, and
``pieces`` says how many entries each buffer takes, in order (absent: one
each).  Schema 2 manifests load unchanged.
``python`` (on a variable carried forward unloaded from an older checkpoint)
is the version of the Python that pickled it, and wins over
``versions.python``: notebook code (bytecode) loads only on that minor version.

The signature binds the checkpoint to its place: a manifest whose
``generation`` differs from its file name, or whose ``identity`` does not hash
to the notebook folder it sits in, is refused (a copy from another notebook,
or an old checkpoint renamed as the newest).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from . import signing
from .errors import CorruptCheckpoint, IncompatibleCheckpoint, UntrustedCheckpoint

SCHEMA_VERSION = 3
#: The oldest schema this version still loads (1: 0.1 and 0.2, before groups; 2: 0.3 and 0.4, before chunks).
OLDEST_SCHEMA = 1
MAGIC = b"durable-kernel-manifest\n"
#: Manifests larger than this are refused unread: no honest one comes close.
MAX_MANIFEST_BYTES = 1 << 30
#: Latest plausible ``created`` time (the year 9999): later, NaN or negative is malformed.
_MAX_TIME = 253402300799.0
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"[0-9a-f]{8}")


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
            "pickle" if var.get("kind") == "member" else var.get("kind"),
            var.get("part") or var.get("digest") or var.get("target"),
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
        if var.get("digest") and "inline" not in var and "stream" not in var:
            found.add(var["digest"])
        for key in ("stream", "buffers"):
            for buf in var.get(key, []):
                found.add(buf["digest"])
    return found


def encode(data: dict[str, Any], key: bytes) -> bytes:
    """Serialize and sign a manifest's JSON object; sets its ``key_id`` to the signing key's."""
    # Set on the caller's dict too, so that what it keeps in memory is what was written.
    data["key_id"] = signing.key_id(key)
    # ASCII: identities and cell text may hold lone surrogates (a path or a
    # session name that is not UTF-8), which JSON escapes but UTF-8 cannot encode.
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return MAGIC + signing.sign(key, body).encode() + b"\n" + body


def body_of(raw: bytes) -> bytes:
    """The JSON part of a manifest file's bytes, unverified (b"" if there is none)."""
    parts = raw.split(b"\n", 2)
    return parts[2] if len(parts) == 3 else b""


def decode(
    raw: bytes,
    key: bytes,
    where: str,
    *,
    generation: int | None = None,
    folder: str | None = None,
) -> Manifest:
    """Verify and parse a manifest file's bytes; ``where`` names it in errors.

    ``generation`` (the number in its file name) and ``folder`` (the name of
    the notebook folder it sits in) must match what the signed JSON says.
    """
    data = signed_data(raw, key, where, generation=generation, folder=folder)
    _validate(data, where)
    return Manifest(data)


def signed_data(
    raw: bytes,
    key: bytes,
    where: str,
    *,
    generation: int | None = None,
    folder: str | None = None,
) -> dict[str, Any]:
    """The JSON object of a manifest signed with ``key``, of this schema, in its place.

    Checks everything :func:`decode` does except the shape of each entry, so
    retention can tell cheaply which checkpoints are this user's own.
    """
    if not raw.startswith(MAGIC):
        raise CorruptCheckpoint(f"{where} is not a durable-kernel manifest")
    rest = raw[len(MAGIC) :]
    signature, sep, body = rest.partition(b"\n")
    if not sep:
        raise CorruptCheckpoint(f"{where} is truncated")
    if not signing.verify(key, body, signature):
        raise UntrustedCheckpoint(_not_signed(where, body, key))
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise CorruptCheckpoint(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{where}: manifest is not a JSON object")
    schema = data.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise CorruptCheckpoint(f"{where}: manifest has no schema version")
    if schema > SCHEMA_VERSION:
        raise IncompatibleCheckpoint(
            f"{where} was written by a newer durable-kernel (schema {schema}, this one reads "
            f"{SCHEMA_VERSION}); upgrade durable-kernel to load it"
        )
    if schema < OLDEST_SCHEMA:
        raise IncompatibleCheckpoint(f"{where} uses old schema {schema}, which this version cannot read")
    found_gen, identity = data.get("generation"), data.get("identity")
    if generation is not None and found_gen != generation:
        raise UntrustedCheckpoint(
            f"{where} says it is checkpoint {found_gen}: an older checkpoint renamed or copied "
            "over a newer one; it was not loaded"
        )
    if folder is not None and (not isinstance(identity, str) or folder_name(identity) != folder):
        raise UntrustedCheckpoint(
            f"{where} belongs to another notebook ({printable(str(identity))}) and was copied here; it was not loaded"
        )
    return data


def _not_signed(where: str, body: bytes, key: bytes) -> str:
    """Why a manifest whose signature fails was not loaded, and how to bring the key that signed it.

    Its ``key_id`` is read from the unverified JSON for this message only (anyone can write
    it, so it decides nothing), and only if it looks like one.
    """
    ours = signing.key_id(key)
    try:
        theirs = json.loads(body).get("key_id")
    except (ValueError, AttributeError, RecursionError):
        theirs = None
    if not (isinstance(theirs, str) and _KEY_ID.fullmatch(theirs)):
        theirs = None
    if theirs is not None and theirs != ours:
        return (
            f"{where} is not signed with this user's key but with another one (key {theirs}; the key here is "
            f"{ours}): to load it, run 'durable-kernel key export' on the machine that wrote it, and here "
            "'durable-kernel key import' or set DURABLE_KERNEL_KEY to that key; it was not loaded"
        )
    if theirs == ours:  # the right key, so the bytes changed after signing
        return (
            f"{where} is not signed with this user's key: it names this key ({ours}) but was changed after it "
            "was signed (damaged or edited); it was not loaded"
        )
    return (
        f"{where} is not signed with this user's key (the key changed, or it was copied from elsewhere); "
        "it was not loaded"
    )


def folder_name(identity: str) -> str:
    """The folder name for a notebook identity: a hash, never the path itself."""
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to print on one line: control characters, escape codes and
    undecodable bytes shown as escapes, long text cut."""
    out = "".join(ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else repr(ch)[1:-1] for ch in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _validate(data: dict[str, Any], where: str) -> None:
    expected: dict[str, type | tuple[type, ...]] = {
        "generation": int,
        "created": (int, float),
        "execution_count": int,
        "identity": str,
        "variables": list,
        "skipped": list,
    }
    for name, kind in expected.items():
        if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
            raise CorruptCheckpoint(f"{where}: manifest field {name!r} is missing or malformed")
    if not (math.isfinite(data["created"]) and 0 <= data["created"] <= _MAX_TIME):
        raise CorruptCheckpoint(f"{where}: manifest field 'created' is not a plausible time")
    for item in data["skipped"]:
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("name", "type", "reason"))):
            raise CorruptCheckpoint(f"{where}: manifest entry {str(item)[:80]!r} is malformed")
    for var in data["variables"]:
        ok = isinstance(var, dict) and isinstance(var.get("name"), str) and isinstance(var.get("type", ""), str)
        ok = ok and isinstance(var.get("size", 0), int) and var.get("kind") in ("pickle", "member", "module", "alias")
        if ok and var["kind"] in ("pickle", "member"):
            if var["kind"] == "pickle":
                ok = isinstance(var.get("digest"), str) and bool(_DIGEST.match(var["digest"]))
                ok = ok and isinstance(var.get("inline", ""), str) and _stamp_ok(var.get("stamp"))
            else:
                ok = isinstance(var.get("target"), str)
            ok = ok and all(_blob_list_ok(var.get(key, [])) for key in ("buffers", "stream"))
            if ok and "stream" in var:
                ok = var["kind"] == "pickle" and "inline" not in var and "stamp" not in var and bool(var["stream"])
            if ok and "pieces" in var:
                pieces = var["pieces"]
                ok = (
                    isinstance(pieces, list)
                    and all(type(p) is int and p > 0 for p in pieces)
                    and sum(pieces) == len(var.get("buffers", []))
                )
        elif ok:
            ok = isinstance(var.get("target"), str)
        if not ok:
            raise CorruptCheckpoint(f"{where}: manifest entry {str(var)[:80]!r} is malformed")
    _validate_groups(data["variables"], where)


def _validate_groups(variables: list[dict[str, Any]], where: str) -> None:
    """Every group's first variable lists its members, each of which names it back, once."""
    by_name = {var["name"]: var for var in variables}
    claimed: set[str] = set()
    for var in variables:
        members = var.get("members")
        if members is None:
            continue
        ok = (
            var["kind"] == "pickle"
            and isinstance(members, list)
            and len(members) > 1
            and members[0] == var["name"]
            and all(isinstance(m, str) for m in members)
            and len(set(members)) == len(members)
        )
        ok = ok and all(
            by_name.get(m, {}).get("kind") == "member" and by_name[m].get("target") == var["name"] for m in members[1:]
        )
        if not ok or claimed & set(members):
            raise CorruptCheckpoint(f"{where}: the group of {printable(var['name'])} is malformed")
        claimed.update(members)
    for var in variables:
        if var["kind"] == "member" and var["name"] not in claimed:
            raise CorruptCheckpoint(f"{where}: {printable(var['name'])} belongs to no group")


def _blob_list_ok(entries: Any) -> bool:
    return isinstance(entries, list) and all(
        isinstance(b, dict)
        and isinstance(b.get("digest"), str)
        and _DIGEST.match(b["digest"])
        and isinstance(b.get("size"), int)
        and b["size"] >= 0
        and _stamp_ok(b.get("stamp"))
        for b in entries
    )


def _stamp_ok(stamp: Any) -> bool:
    return stamp is None or (isinstance(stamp, list) and len(stamp) == 2 and all(type(x) is int for x in stamp))
