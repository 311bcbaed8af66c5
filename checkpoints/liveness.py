"""Is a process, or the kernel that wrote a checkpoint, still running?"""

from __future__ import annotations

import os
import socket
from typing import Any


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (exited, not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    # A process that has exited but whose parent has not reaped it yet (a
    # kernel whose client quit without waiting) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def writer_alive(writer: dict[str, Any]) -> bool:
    """Is the kernel a manifest's ``writer`` names still running?  One on another
    machine sharing the store is assumed to be."""
    if writer.get("host") != socket.gethostname() or not isinstance(writer.get("pid"), int):
        return True
    return pid_alive(writer["pid"])
