"""The launcher: ``python -m durable_kernel -f {connection_file}``."""

from __future__ import annotations

from ipykernel.kernelapp import IPKernelApp
from traitlets import Type, Unicode, default
from traitlets.config.application import Application

from .kernel import DurableKernel


class DurableKernelApp(IPKernelApp):
    """IPKernelApp that runs a DurableKernel and restores its state at start."""

    name = Unicode("durable-kernel")
    kernel_class = Type(DurableKernel, klass="ipykernel.kernelbase.Kernel", config=True)

    @default("config_file_name")
    def _config_file_name_default(self) -> str:
        # The file ipykernel reads, not one named after this app
        # ("durable_kernel_config.py"), which nobody would think of writing.
        return "ipython_kernel_config.py"

    def load_config_file(self, *args, **kwargs) -> None:
        """Read ``jupyter_config.py`` and ``ipython_kernel_config.py`` from Jupyter's config
        dirs too (``~/.jupyter``, ``$JUPYTER_CONFIG_DIR``...), where users put
        ``c.DurableKernel`` options; the IPython profile's files are read last and win."""
        from jupyter_core.paths import jupyter_config_path

        paths = jupyter_config_path()
        for name in ("jupyter_config", "ipython_kernel_config"):
            try:
                Application.load_config_file(self, name, path=paths)
            except Exception:  # a broken file must not stop the kernel: say so in the log
                self.log.warning("error loading %s from %s", name, paths, exc_info=True)
        super().load_config_file(*args, **kwargs)

    def init_code(self) -> None:
        super().init_code()
        # After IPython's start-up code: names restored before it would be
        # hidden from %who by hide_initial_ns.  Still before any request is
        # served, so the first cell sees the restored namespace.
        self.kernel.start_durability()
