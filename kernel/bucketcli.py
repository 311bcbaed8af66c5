"""The ``durable-kernel`` store commands on a bucket store (``--dir s3://bucket/prefix``).

``list`` and ``show`` read the bucket's manifests (verified with this user's
key, never unpickling anything) through a throw-away copy laid out as a store,
so they print exactly what they print for a folder.  ``gc`` and ``clear``
delete in the bucket itself (``checkpoints/sync.py``); ``clear`` also clears
this machine's cache of those notebooks (a kernel would restore from there,
and upload them again).  ``du`` and ``mv`` work on folders only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from durable_kernel.checkpoints import NotebookStore, Store, inventory, maintenance, sync
from durable_kernel.checkpoints.bucket import Bucket

from . import humanize


def run(store: Store, args: argparse.Namespace) -> int:
    """Run a store command on the bucket ``store.remote``; returns the exit status."""
    from .cli import _CommandError, _list, _show

    assert store.remote is not None
    if args.command in ("du", "mv"):
        raise _CommandError(f"'{args.command}' works on a folder store; for a bucket use 'list', 'gc' or 'clear'")
    bucket = Bucket(store.remote)
    with tempfile.TemporaryDirectory(prefix="durable-kernel-view-") as tmp:
        sizes = sync.mirror_manifests(bucket, Path(tmp))
        view = Store(tmp, store.key, key_problem=store.key_problem, remote=store.remote)
        if args.command in ("list", "show"):
            args.bucket_sizes = sizes
            result = {"list": _list, "show": _show}[args.command](view, args)
        elif args.command == "gc":
            result = _gc(bucket, args)
        else:
            result = _clear(store, view, bucket, sizes, args)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _gc(bucket: Bucket, args: argparse.Namespace) -> Any:
    grace = inventory.parse_age(args.grace) if args.grace else sync.GRACE_SECONDS
    if grace < 2 * sync.REUSE_YOUNG_SECONDS:
        print(
            f"warning: with --grace under {humanize.duration(2 * sync.REUSE_YOUNG_SECONDS)}, a kernel uploading to "
            "this bucket right now may lose a blob it is about to commit",
            file=sys.stderr,
        )
    results = sync.collect(bucket, grace=grace, dry_run=args.dry_run)
    blobs = sum(r.blobs_removed for r in results)
    freed = sum(r.freed for r in results)
    if args.json:
        return {
            "store": bucket.url,
            "dry_run": args.dry_run,
            "grace_seconds": grace,
            "notebooks": [vars(r) for r in results],
            "blobs_removed": blobs,
            "freed": freed,
        }
    verb = "Would remove" if args.dry_run else "Removed"
    print(
        f"{verb} {humanize.plural(blobs, 'blob')} no checkpoint needs, "
        f"{'would free' if args.dry_run else 'freed'} {humanize.size(freed)} "
        f"({humanize.plural(len(results), 'notebook')} checked in {bucket.url}; unreferenced blobs younger than "
        f"{humanize.duration(grace)} are kept for writers on other machines)."
    )
    for r in results:
        if r.kept_because:
            print(f"warning: folder {r.folder}: kept all its data because {r.kept_because}", file=sys.stderr)
    return None


def _clear(store: Store, view: Store, bucket: Bucket, sizes: dict[str, int], args: argparse.Namespace) -> Any:
    from .cli import _CommandError, _Parser

    given = [args.notebook is not None, args.all, args.older_than is not None]
    if sum(given) != 1:
        _Parser(prog="durable-kernel clear").error("give exactly one of NOTEBOOK, --all or --older-than AGE")
    if args.notebook is not None:
        targets = [inventory.find(view, args.notebook)]
    elif args.all:
        targets = inventory.notebooks(view)
    else:
        targets = inventory.unused_since(view, inventory.parse_age(args.older_than))
    if args.notebook is not None and not targets[0].generations:
        raise _CommandError(f"{targets[0].label} has no checkpoints to clear")
    verb = "Would remove" if args.dry_run else "Removed"
    results = []
    for info in targets:
        freed = sync.clear(bucket, info.key, dry_run=args.dry_run)
        cached = store.root / info.key
        if not args.dry_run and (cached / "manifests").is_dir():
            # This machine's cache too: else the next kernel would restore it, and upload it again.
            maintenance.clear_notebook(NotebookStore(store, info.identity or "", folder=cached))
        results.append({**info.to_json(), "size": sizes.get(info.key, 0), "freed": freed})
        if not args.json:
            print(
                f"{verb} {humanize.plural(len(info.generations), 'checkpoint')} ({humanize.size(freed)}) "
                f"for {info.label} from {bucket.url}."
            )
    if args.json:
        return {
            "store": bucket.url,
            "dry_run": args.dry_run,
            "cleared": results,
            "freed": sum(r["freed"] for r in results),
        }
    if not targets:
        print(f"No matching notebooks in {bucket.url}; nothing removed.")
    return None
