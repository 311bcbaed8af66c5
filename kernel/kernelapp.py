"""The launcher: ``python -m durable_kernel -f {connection_file}``."""

from __future__ import annotations

from ipykernel.kernelapp import IPKernelApp
from traitlets import Type, Unicode

from .kernel import DurableKernel


class DurableKernelApp(IPKernelApp):
    """IPKernelApp that runs a DurableKernel and restores its state at start."""

    name = Unicode("durable-kernel")
    kernel_class = Type(DurableKernel, klass="ipykernel.kernelbase.Kernel", config=True)

    def init_code(self) -> None:
        super().init_code()
        # After IPython's start-up code: names restored before it would be
        # hidden from %who by hide_initial_ns.  Still before any request is
        # served, so the first cell sees the restored namespace.
        self.kernel.start_durability()


main = DurableKernelApp.launch_instance
