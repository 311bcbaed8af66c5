"""``python -m durable_kernel``: the kernel itself, or the CLI when given a command."""

import sys


def _main() -> None:
    from .cli import COMMANDS

    first = sys.argv[1] if len(sys.argv) > 1 else ""
    if first in COMMANDS | {"-h", "--help", "--version", "--dir"} or first.startswith("--dir="):
        from .cli import main

        sys.exit(main())
    from .kernelapp import DurableKernelApp

    DurableKernelApp.launch_instance()


if __name__ == "__main__":
    _main()
