"""Which of this process's threads are the kernel's own (and never write the user's arrays).

Backing arrays by files (``adoption.py``) and trusting written-page tracking
(``checkpoints/tracking.py``) both rely on nothing writing the user's memory
between two steps on the main thread; a thread the user started, or a
subshell running cells, could.
"""

from __future__ import annotations

import threading

#: Where the threads ipykernel, IPython and this package start come from.
#: (``zmq.``: pyzmq's garbage collector thread for zero-copy messages, started at the first large one.)
_KERNEL_MODULES = ("ipykernel.", "IPython.", "durable_kernel.", "jupyter_client.", "zmq.")


class KernelThreads:
    """Tells the kernel's threads (those alive when it was made, or started by kernel modules) from others."""

    def __init__(self) -> None:
        self._own = set(threading.enumerate())

    def foreign(self) -> list[str]:
        """Names of the live threads that may run the user's code."""
        return [t.name for t in threading.enumerate() if t.is_alive() and not self._kernels(t)]

    def _kernels(self, thread: threading.Thread) -> bool:
        if type(thread).__name__ == "SubshellThread":
            return False  # runs the user's cells
        if thread in self._own:
            return True
        if type(thread) is threading.Thread:
            module = getattr(getattr(thread, "_target", None), "__module__", None) or ""
        else:
            module = type(thread).__module__
        return module.startswith(_KERNEL_MODULES)
