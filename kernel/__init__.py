"""durable_kernel: a Jupyter Python kernel whose variables survive restarts and kill -9."""

__version__ = "0.8.2"
