"""``python -m durable_kernel``: the kernel itself, or the CLI when given a command."""

import sys


def _main() -> None:
    from .cli import COMMANDS

    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS | {"-h", "--help"}:
        from .cli import main

        sys.exit(main())
    from .kernelapp import DurableKernelApp

    DurableKernelApp.launch_instance()


if __name__ == "__main__":
    _main()
