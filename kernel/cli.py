"""The ``durable-kernel`` command: install the kernelspec, run the demo, manage the store.

``list``, ``show``, ``clear``, ``gc``, ``du`` and ``mv`` work on the checkpoint
store from a terminal, without a kernel: they read manifests only (``mv``
signs them again for the new name) and never unpickle anything.  The store
is the one the kernel uses: ``--dir``, else ``$DURABLE_KERNEL_DIR``, else
``durable_kernel/`` under Jupyter's data dir.  ``key export``, ``key import`` and
``key id`` move the signing key between machines (``location.load_key`` decides
which key is this user's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any, NoReturn

from . import humanize

COMMANDS = {"install", "demo", "list", "show", "clear", "gc", "du", "mv", "key"}

_STORE_EPILOG = (
    "The store is --dir if given, else $DURABLE_KERNEL_DIR, else durable_kernel/ under Jupyter's data dir. "
    "It may be a bucket (s3://bucket/prefix, gs://..., az://...), reached with the usual credentials "
    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true for http)."
)
_NOTEBOOK_EPILOG = (
    "NOTEBOOK is the notebook's path as you know it (relative or absolute) or its identity as "
    "'durable-kernel list' shows it."
)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Wrap each line of a description or epilog on its own, keeping the line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            lead = indent + line[: len(line) - len(line.lstrip())]
            lines.append(textwrap.fill(line.strip(), width, initial_indent=lead, subsequent_indent=lead))
        return "\n".join(lines)


class _CommandError(Exception):
    """A failure to report as one line, with exit status 1."""


def _generation(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a checkpoint id (a number; 'durable-kernel show NOTEBOOK' lists the kept ones)"
        )
    return int(text)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="durable-kernel",
        description="A Jupyter Python kernel whose variables survive restarts, crashes and kill -9.",
    )
    parser.add_argument("--version", action="version", version=f"durable-kernel {__version__}")
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="the checkpoint store, a folder or a bucket URL such as s3://bucket/prefix "
        "(default: $DURABLE_KERNEL_DIR, else durable_kernel/ under Jupyter's data dir)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    inst = sub.add_parser(
        "install",
        help="install the kernelspec so Jupyter lists 'Python 3 (durable)'",
        description="Install the durable-python3 kernelspec for this Python, like 'python -m ipykernel install'.",
    )
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python's prefix (venv, conda env)")
    where.add_argument("--prefix", metavar="P", help="install under prefix P (P/share/jupyter/kernels)")
    inst.add_argument("--name", default=None, help="kernelspec name (default: durable-python3)")
    inst.add_argument("--display-name", default=None, help="name shown in kernel pickers (default: Python 3 (durable))")

    sub.add_parser(
        "demo",
        help="start a kernel, set variables, kill -9 it, restart it, show what came back",
        description="Shows durability end to end with a real kernel and a throw-away store.",
    )

    # Options every store command takes, after the command too (SUPPRESS: never
    # overwrite a --dir given before the command).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="the checkpoint store, a folder or a bucket URL such as s3://bucket/prefix "
        "(default: $DURABLE_KERNEL_DIR, else durable_kernel/ under Jupyter's data dir)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts (sizes in bytes, unix times)")
    common.add_argument("--key-file", metavar="FILE", help=_KEY_FILE_HELP)

    def store_command(name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
        epilog = _STORE_EPILOG + ("\n" + _NOTEBOOK_EPILOG if name in ("show", "clear", "mv") else "")
        return sub.add_parser(
            name,
            help=help,
            description=description,
            parents=[common],
            epilog=f"{epilog}\n\nExample:\n  {example}",
            formatter_class=_Formatter,
        )

    store_command(
        "list",
        "every stored notebook, most recently used first",
        "Every notebook with checkpoints: when it was last saved, how many checkpoints are kept, "
        "how many variables the newest one holds and the space it takes on disk; most recently used first.",
        "durable-kernel list",
    )

    show = store_command(
        "show",
        "one notebook's variables (type, size) and what was not saved",
        "The variables of a notebook's newest checkpoint (or of --generation ID) with type and size, and what "
        "was not saved and why. Read from the signed manifest only: nothing is unpickled.",
        "durable-kernel show analysis.ipynb --generation 12",
    )
    show.add_argument("notebook", metavar="NOTEBOOK", help="notebook path or stored identity")
    show.add_argument(
        "--generation",
        "-g",
        metavar="ID",
        type=_generation,
        help="the checkpoint to show (default: the newest readable one)",
    )

    clear = store_command(
        "clear",
        "delete the checkpoints of one notebook, all, or those unused for a while",
        "Delete checkpoints: of one NOTEBOOK, of every notebook (--all), or of notebooks not used for "
        "an age such as 30d (--older-than). The names each notebook excludes from saving are remembered. "
        "A kernel still running on a cleared notebook saves it again after its next cell.",
        "durable-kernel clear --older-than 30d --dry-run",
    )
    clear.add_argument("notebook", metavar="NOTEBOOK", nargs="?", help="notebook path or stored identity")
    clear.add_argument("--all", action="store_true", help="every notebook in the store")
    clear.add_argument(
        "--older-than", metavar="AGE", help="notebooks whose last checkpoint is older than AGE: 30d, 12h, 90m, 2w"
    )
    clear.add_argument("--dry-run", "-n", action="store_true", help="say what would be removed; remove nothing")

    gc = store_command(
        "gc",
        "remove data no checkpoint needs and leftovers of crashes",
        "Remove blobs that no kept checkpoint references and temp files left by crashes; report the "
        "space freed. Each notebook is locked while it is collected, so a kernel saving at the same time "
        "is safe. A blob any kept manifest names is never removed.",
        "durable-kernel gc",
    )
    gc.add_argument("--dry-run", "-n", action="store_true", help="say what would be removed; remove nothing")
    gc.add_argument(
        "--grace",
        metavar="AGE",
        help="bucket stores: keep unreferenced blobs younger than AGE (default 1d), which a kernel on another "
        "machine may be about to commit",
    )

    mv = store_command(
        "mv",
        "move a notebook's checkpoints to its new path (after moving or renaming the notebook)",
        "Give the checkpoints stored for OLD to NEW, as after 'mv OLD NEW' of the notebook file: a kernel "
        "started for NEW then restores them. They become NEW's newest checkpoints (NEW's own, if any, stay as "
        "older ones). Checkpoints this user's key cannot verify stay under OLD.",
        "durable-kernel mv ~/work/Untitled.ipynb ~/work/analysis.ipynb",
    )
    mv.add_argument(
        "old", metavar="OLD", help="the notebook's old path (or identity, as 'durable-kernel list' shows it)"
    )
    mv.add_argument(
        "new",
        metavar="NEW",
        help="its new path (relative to the current folder); for state stored under a session name "
        "(DURABLE_KERNEL_SESSION) rather than a path, the new name as given",
    )

    store_command(
        "du",
        "disk use by notebook",
        "Disk use of each notebook (manifests and data blobs), biggest first, what 'durable-kernel gc' "
        "would free, and the space left on the disk.",
        "durable-kernel du --json",
    )
    _key_commands(sub)
    parser.commands = sub.choices  # type: ignore[attr-defined]
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``durable-kernel`` command; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra:  # name the command in the message, as its own parser would
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "install":
            return _install(args)
        if args.command == "key":
            return _key_command(args)
        if args.command == "demo":
            from .demo import run

            return run()
        return _store_command(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `durable-kernel list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # one clear line, not our traceback
        print(f"durable-kernel {args.command}: {exc}", file=sys.stderr)
        return 1


def _install(args: argparse.Namespace) -> int:
    from .kernelspec import DISPLAY_NAME, KERNEL_NAME, install

    prefix = sys.prefix if args.sys_prefix else args.prefix
    dest = install(
        user=args.user,
        prefix=prefix,
        name=args.name or KERNEL_NAME,
        display_name=args.display_name or DISPLAY_NAME,
    )
    print(f"Installed kernelspec {args.name or KERNEL_NAME} in {dest}")
    return 0


# --- store commands ------------------------------------------------------------------


def _store_command(args: argparse.Namespace) -> int:
    from durable_kernel.checkpoints.location import open_store

    store = open_store(args.dir, create_key=False, key_file=args.key_file)
    if store.key_problem and store.remote:
        print(f"warning: {store.key_problem}; no checkpoint can be verified", file=sys.stderr)
    if store.remote:
        from .bucketcli import run

        return run(store, args)
    if store.root.exists() and not store.root.is_dir():
        raise _CommandError(f"{store.root} is not a folder")
    if args.dir and not store.root.exists():
        raise _CommandError(f"{store.root} does not exist")
    if store.key_problem:
        print(f"warning: {store.key_problem}; no checkpoint can be verified", file=sys.stderr)
    handler = {"list": _list, "show": _show, "clear": _clear, "gc": _gc, "du": _du, "mv": _mv}[args.command]
    result = handler(store, args)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _list(store, args: argparse.Namespace) -> Any:
    from durable_kernel.checkpoints import inventory

    found = inventory.notebooks(store)
    for info in found:  # a bucket's: the size there, not of the manifests copied to read them
        info.size = getattr(args, "bucket_sizes", {}).get(info.key, info.size)
    where = store.remote or store.root
    if args.json:
        listed = [info.to_json() for info in found]
        if store.remote:
            listed = [{**item, "folder": f"{store.remote}/{item['key']}"} for item in listed]
        return {"store": str(where), "notebooks": listed}
    if not found:
        print(f"No checkpoints in {where}.")
        return None
    rows = [("last saved", "checkpoints", "variables", "size", "notebook")]
    for info in found:
        variables = "?" if info.variables is None else str(info.variables)
        rows.append(
            (humanize.ago(info.last_used), str(len(info.generations)), variables, humanize.size(info.size), info.label)
        )
    print("\n".join(humanize.table(rows, right={1, 2, 3})))
    total = sum(info.size for info in found)
    print(f"\n{humanize.plural(len(found), 'notebook')}, {humanize.size(total)} in {where}")
    for info in found:
        for problem in info.problems if info.newest is not None else info.problems[:1]:
            print(f"warning: {info.label}: {problem}", file=sys.stderr)
    return None


def _show(store, args: argparse.Namespace) -> Any:
    from durable_kernel.checkpoints import inventory

    info = inventory.find(store, args.notebook)
    nb = inventory.notebook_at(store, info.folder, info.identity)
    if not info.generations:
        raise _CommandError(f"{info.label} has no checkpoints (they were cleared)")
    kept = ", ".join(str(g) for g in info.generations)
    problems: list[str] = []
    if args.generation is not None:
        if args.generation not in info.generations:
            raise _CommandError(f"no checkpoint {args.generation} for {info.label}; kept: {kept}")
        man = nb.read_manifest(args.generation)  # verified; a failure is the one-line error
    else:
        if info.newest is None:
            raise _CommandError(f"no readable checkpoint for {info.label}: {info.problems[0]}")
        man, problems = info.newest, info.problems
    variables = sorted(man.variables, key=lambda v: v["name"].lower())
    if args.json:
        return {
            **inventory.checkpoint_json(man),
            "folder": str(info.folder),
            "generations": info.generations,
            "problems": problems,
        }
    versions = man.data.get("versions") or {}
    writer = man.data.get("writer") or {}
    made_by = ", ".join(
        f"{label} {versions[key]}"
        for key, label in (("python", "Python"), ("durable_kernel", "durable-kernel"), ("dill", "dill"))
        if key in versions
    )
    if writer.get("pid"):
        made_by += f" (pid {writer['pid']}{' on ' + str(writer['host']) if writer.get('host') else ''})"
    lines = [
        f"Notebook:    {man.identity}",
        f"Store:       {f'{store.remote}/{info.key}' if store.remote else info.folder}",
        f"Checkpoint:  {man.generation}, saved {humanize.when(man.created)}, as of In [{man.execution_count}]",
        f"Kept:        {kept}",
    ]
    cell = man.data.get("cell", "")
    if cell:
        lines.append(f"Cell:        {cell if len(cell) <= 70 else cell[:69] + '…'}")
    if made_by:
        lines.append(f"Written by:  {made_by}")
    packages = versions.get("packages") or {}
    if packages:
        lines.append("Packages:    " + humanize.names([f"{k} {v}" for k, v in sorted(packages.items())]))
    lines.append("")
    if variables:
        rows = [("name", "type", "size")]
        for var in variables:
            if var["kind"] == "module":
                rows.append((var["name"], f"module {var.get('target', '')}", "-"))
            elif var["kind"] == "alias":
                rows.append((var["name"], f"same object as {var.get('target', '')}", "-"))
            else:
                rows.append((var["name"], var.get("type", "?"), humanize.size(var.get("size", 0))))
        lines += humanize.table(rows, right={2})
        total = sum(v.get("size", 0) for v in man.variables)
        lines.append(f"\n{humanize.plural(len(variables), 'variable')}, {humanize.size(total)}")
    else:
        lines.append("No variables.")
    if man.skipped:
        lines.append("\nNot saved:")
        lines += [f"  {s.get('name')} ({s.get('type')}): {s.get('reason')}" for s in man.skipped]
    print("\n".join(lines))
    for problem in problems:
        print(f"warning: newer checkpoint skipped: {problem}", file=sys.stderr)
    return None


def _clear(store, args: argparse.Namespace) -> Any:
    from durable_kernel.checkpoints import inventory, maintenance

    chosen = [
        flag
        for flag, given in (
            ("NOTEBOOK", args.notebook is not None),
            ("--all", args.all),
            ("--older-than", args.older_than is not None),
        )
        if given
    ]
    if len(chosen) != 1:
        what = (
            "one of NOTEBOOK, --all or --older-than AGE is required"
            if not chosen
            else (f"give only one of {', '.join(chosen)}")
        )
        _Parser(prog="durable-kernel clear").error(what)
    if args.notebook is not None:
        targets = [inventory.find(store, args.notebook)]
        if not targets[0].generations:
            raise _CommandError(f"{targets[0].label} has no checkpoints to clear")
    elif args.all:
        targets = inventory.notebooks(store)
    else:
        try:
            age = inventory.parse_age(args.older_than)
        except ValueError as exc:
            _Parser(prog="durable-kernel clear").error(f"argument --older-than: {exc}")
        targets = inventory.unused_since(store, age)
    results = []
    verb = "Would remove" if args.dry_run else "Removed"
    for info in targets:
        freed = info.size if args.dry_run else maintenance.clear(store, info)
        results.append({**info.to_json(), "freed": freed})
        if not args.json:
            print(
                f"{verb} {humanize.plural(len(info.generations), 'checkpoint')} ({humanize.size(freed)}) "
                f"for {info.label}"
                f"{', last saved ' + humanize.ago(info.last_used) if args.older_than else ''}."
            )
    total = sum(r["freed"] for r in results)
    if args.json:
        return {"store": str(store.root), "dry_run": args.dry_run, "cleared": results, "freed": total}
    if not targets:
        scope = f"unused for {args.older_than}" if args.older_than else "with checkpoints"
        print(f"No notebooks {scope} in {store.root}; nothing removed.")
    elif len(targets) > 1:
        print(
            f"{'Would free' if args.dry_run else 'Freed'} {humanize.size(total)} "
            f"in {humanize.plural(len(targets), 'notebook')}."
        )
    return None


def _gc(store, args: argparse.Namespace) -> Any:
    from durable_kernel.checkpoints import inventory, maintenance

    if args.dry_run:
        results = []
        for folder in store.notebook_dirs():
            info = inventory.describe(store, folder)
            found, unreadable = inventory.garbage(inventory.notebook_at(store, folder, info.identity))
            results.append(maintenance.Collected(info, len(found), sum(s for _, s in found), unreadable))
    else:
        results = maintenance.collect_all(store)
    files = sum(r.files for r in results)
    freed = sum(r.freed for r in results)
    if args.json:
        return {
            "store": str(store.root),
            "dry_run": args.dry_run,
            "notebooks": [r.to_json() for r in results],
            "files_removed": files,
            "freed": freed,
        }
    verb = "Would remove" if args.dry_run else "Removed"
    for r in results:
        if r.files:
            print(f"  {r.info.label}: {humanize.plural(r.files, 'file')}, {humanize.size(r.freed)}")
    print(
        f"{verb} {humanize.plural(files, 'file')}, {'would free' if args.dry_run else 'freed'} {humanize.size(freed)} "
        f"({humanize.plural(len(results), 'notebook')} checked in {store.root})."
    )
    for r in results:
        if r.error:
            print(f"warning: {r.info.label} left alone: {r.error}", file=sys.stderr)
        for reason in r.kept_because:
            print(f"warning: {r.info.label}: kept all its data because {reason}", file=sys.stderr)
    return None


def _du(store, args: argparse.Namespace) -> Any:
    from durable_kernel.checkpoints import inventory

    rows_data = inventory.usage(store)
    total = sum(u.info.size for u in rows_data)
    reclaimable = sum(u.reclaimable for u in rows_data)
    free = inventory.free_space(store.root)
    if args.json:
        return {
            "store": str(store.root),
            "notebooks": [u.to_json() for u in rows_data],
            "size": total,
            "reclaimable": reclaimable,
            "free": free,
        }
    if not rows_data:
        print(f"No checkpoints in {store.root}.")
        return None
    rows = [("size", "checkpoints", "blobs", "reclaimable", "notebook")]
    for u in rows_data:
        rows.append(
            (
                humanize.size(u.info.size),
                str(len(u.info.generations)),
                str(u.blob_count),
                humanize.size(u.reclaimable),
                u.info.label,
            )
        )
    print("\n".join(humanize.table(rows, right={0, 1, 2, 3})))
    print(
        f"\nTotal {humanize.size(total)} in {humanize.plural(len(rows_data), 'notebook')} at {store.root}"
        + (f"; {humanize.size(free)} free on that disk" if free is not None else "")
        + "."
    )
    if reclaimable:
        print(f"'durable-kernel gc' would free {humanize.size(reclaimable)}.")
    return None


def _mv(store, args: argparse.Namespace) -> Any:
    from durable_kernel.checkpoints import inventory, maintenance, printable

    info = inventory.find(store, args.old)
    source = inventory.notebook_at(store, info.folder, info.identity)
    moved = maintenance.move(store, source, new_identity(info.identity, args.new))
    if args.json:
        return {
            "store": str(store.root),
            "from": moved.source,
            "to": moved.target,
            "checkpoints": moved.generations,
            "left_behind": moved.left_behind,
        }
    print(
        f"Moved {humanize.plural(len(moved.generations), 'checkpoint')} from {printable(moved.source)} to "
        f"{printable(moved.target)}."
    )
    if moved.left_behind:
        print(
            f"{humanize.plural(moved.left_behind, 'checkpoint')} this user's key cannot verify stayed under "
            f"{printable(moved.source)}.",
            file=sys.stderr,
        )
    return None


# --- the signing key -------------------------------------------------------------------

_KEY_FILE_HELP = (
    "the signing key file (default: durable_kernel_secret under Jupyter's data dir); $DURABLE_KERNEL_KEY, "
    "when set, holds the key itself and wins"
)
_KEY_EPILOG = (
    "Checkpoints are signed with this key: a kernel loads only checkpoints its key verifies. The key is "
    "$DURABLE_KERNEL_KEY if set (the key itself, e.g. from a Kubernetes secret), else --key-file (a kernel's "
    "c.DurableKernel.key_file), else durable_kernel_secret under Jupyter's data dir.\n"
    "Whoever holds the key can make checkpoints your kernels will load: keep it private."
)


def _key_commands(sub: Any) -> None:
    """``durable-kernel key export|import|id``: move the signing key between machines, safely."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--key-file", metavar="FILE", help=_KEY_FILE_HELP)
    key = sub.add_parser(
        "key",
        help="export, import or identify the key that signs checkpoints (to move state between machines)",
        description="The key that signs checkpoints. To load checkpoints on another machine, container or "
        "user, that side needs the same key: 'durable-kernel key export' here, then 'durable-kernel key import' "
        "there (or set DURABLE_KERNEL_KEY there to the exported key).",
        epilog=f"{_KEY_EPILOG}\n\nExample:\n  durable-kernel key export | ssh other-host durable-kernel key import",
        formatter_class=_Formatter,
    )
    actions = key.add_subparsers(dest="key_action", metavar="ACTION", parser_class=_Parser)
    actions.required = True

    export = actions.add_parser(
        "export",
        help="print the key (or write it to a private file with --output)",
        description="Print the signing key on stdout, as the key file holds it, for 'durable-kernel key import' "
        "or DURABLE_KERNEL_KEY elsewhere. With --output, write it to a new file readable only by you (0600).",
        parents=[options],
        epilog=f"{_KEY_EPILOG}\n\nExamples:\n  durable-kernel key export --output /media/usb/durable-key\n"
        "  kubectl create secret generic durable-key --from-literal=DURABLE_KERNEL_KEY=$(durable-kernel key export)",
        formatter_class=_Formatter,
    )
    export.add_argument("--output", "-o", metavar="FILE", help="write the key to FILE (0600; FILE must not exist)")

    imp = actions.add_parser(
        "import",
        help="store a key exported elsewhere as this user's key",
        description="Store the key in FILE (or on stdin: '-', the default) as this user's signing key: the key "
        "file (--key-file, else durable_kernel_secret under Jupyter's data dir), written atomically, readable only "
        "by you (0600). If that file holds another key, nothing is changed unless --force is given: checkpoints "
        "signed with the key it replaces will then no longer load (export it first to keep them).",
        parents=[options],
        epilog=f"{_KEY_EPILOG}\n\nExample:\n  durable-kernel key import /media/usb/durable-key",
        formatter_class=_Formatter,
    )
    imp.add_argument("file", metavar="FILE", nargs="?", default="-", help="the exported key ('-' or none: stdin)")
    imp.add_argument(
        "--force",
        action="store_true",
        help="replace a different key already there (checkpoints signed with it will no longer load)",
    )

    actions.add_parser(
        "id",
        help="print the key's id, which manifests record (not secret)",
        description="Print the id of this user's signing key: 8 hex characters that name the key without "
        "revealing it. Each checkpoint records the id of the key that signed it, and a checkpoint signed with "
        "another key is reported with both ids; compare the ids on two machines to see if they share a key.",
        parents=[options],
        epilog=_KEY_EPILOG,
        formatter_class=_Formatter,
    )


def _key_command(args: argparse.Namespace) -> int:
    from durable_kernel.checkpoints import location, signing

    if args.key_action == "import":
        return _key_import(args)
    key = location.load_key(create=False, key_file=args.key_file)
    if key is None:
        raise _CommandError(
            f"there is no signing key at {location.key_path(key_file=args.key_file)} yet: a kernel makes one at its "
            "first start, or 'durable-kernel key import' stores one exported elsewhere"
        )
    if args.key_action == "id":
        print(signing.key_id(key))
        return 0
    if args.output:
        try:
            signing.write_key(os.path.expanduser(args.output), key)
        except FileExistsError:
            raise _CommandError(f"{args.output} exists; remove it or name a new file") from None
        print(f"Wrote key {signing.key_id(key)} to {args.output} (readable only by you).", file=sys.stderr)
        return 0
    print(key.decode("ascii", "surrogateescape"))
    return 0


def _key_import(args: argparse.Namespace) -> int:
    from durable_kernel.checkpoints import location, signing

    if args.file == "-":
        if sys.stdin.isatty():
            print("Paste the key from 'durable-kernel key export', then press Ctrl-D:", file=sys.stderr)
        raw, source = sys.stdin.buffer.read(signing.MAX_KEY_BYTES + 1), "the key on stdin"
    else:
        with open(os.path.expanduser(args.file), "rb") as f:
            raw, source = f.read(signing.MAX_KEY_BYTES + 1), args.file
    key = signing.check_key(raw, source, "give the output of 'durable-kernel key export'")
    target = location.key_path(key_file=args.key_file)
    new_id = signing.key_id(key)
    old = signing.read_key(target)
    if old == key:
        print(f"{target} already holds key {new_id}; nothing to do.")
    elif old is not None and not args.force:
        raise _CommandError(
            f"{target} holds another key ({signing.key_id(old)}), not {new_id}; replacing it means checkpoints "
            f"signed with key {signing.key_id(old)} no longer load. To keep them, save it first "
            "('durable-kernel key export --output FILE'); to replace it, run again with --force"
        )
    else:
        try:
            signing.write_key(target, key, replace=old is not None)
        except FileExistsError:  # a kernel created a key meanwhile: look again rather than overwrite it
            raise _CommandError(f"{target} was created meanwhile (by a kernel starting?); run again") from None
        print(f"Imported key {new_id} into {target}{' (replacing key ' + signing.key_id(old) + ')' if old else ''}.")
    if location.KEY_VARIABLE in os.environ:
        print(
            f"warning: DURABLE_KERNEL_KEY is set, and wins over {target} while it is (unset it to use this key)",
            file=sys.stderr,
        )
    return 0


def new_identity(old_identity: str | None, new: str) -> str:
    """The identity a kernel for the moved notebook will have, from NEW as the user typed it.

    Of the same kind as the old one: a kernel names its notebook by absolute path
    (jupyter_server, VS Code, the working folder), so a path NEW is made absolute
    against the current folder; a notebook stored under a session name
    (``DURABLE_KERNEL_SESSION``, taken as given) gets NEW as given, whatever files
    the current folder holds.  An unknown old identity counts as a path.
    """
    if old_identity is not None and not os.path.isabs(old_identity):
        return new
    return os.path.abspath(os.path.expanduser(new))
