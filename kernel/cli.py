"""The ``durable-kernel`` command: install the kernelspec, run the demo."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {"install", "demo"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="durable-kernel",
        description="A Jupyter Python kernel whose variables survive restarts, crashes and kill -9.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``durable-kernel`` command; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "install":
            return _install(args)
        if args.command == "demo":
            from .demo import run

            return run()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, not our traceback
        print(f"durable-kernel {args.command}: {exc}", file=sys.stderr)
        return 1
    return 2


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
