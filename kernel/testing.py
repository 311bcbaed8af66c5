"""Test support, public so other projects can test with it: a real durable kernel process
driven through jupyter_client (used by the demo, the tests and the benchmarks).

``KernelProcess(env=...)`` starts ``durable-python3``; ``execute`` runs a cell and
collects its output; ``kill`` is SIGKILL, ``shutdown`` and ``restart`` are what
clients do.  The store a kernel will use for an environment is
``durable_kernel.checkpoints.location.open_store(environ=env)``.
"""

from __future__ import annotations

import os
import queue
import signal
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class Output:
    """What one execute request produced."""

    stdout: str = ""
    stderr: str = ""
    #: ``ename: evalue`` of an error (error_name: ``ename`` alone)
    error: str = ""
    error_name: str = ""
    result: str = ""
    status: str = ""
    execution_count: int | None = None
    #: the execute_reply's content
    reply: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    msg_id: str = ""


def collect(
    kc: Any, msg_id: str, timeout: float = 120, what: str = "", others: dict[str, list[Any]] | None = None
) -> Output:
    """What the request ``msg_id`` produced: its IOPub output until the kernel is idle, then its reply.

    IOPub messages answering other (earlier) requests go to ``others`` by their request's id:
    news that arrives after its cell ended (a background checkpoint's) is sent as that cell's.
    """
    out = Output(msg_id=msg_id)
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no idle after {timeout} s running {what[:60]!r}") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            if others is not None:
                others.setdefault(msg["parent_header"].get("msg_id", ""), []).append(msg)
            continue
        out.messages.append(msg)
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                out.stdout += content["text"]
            else:
                out.stderr += content["text"]
        elif kind == "error":
            out.error_name = content["ename"]
            out.error = f"{content['ename']}: {content['evalue']}"
        elif kind == "execute_result":
            out.result = content["data"].get("text/plain", "")
        elif kind == "status" and content["execution_state"] == "idle":
            break
    while True:
        reply = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            out.reply = reply["content"]
            out.status = reply["content"]["status"]
            out.execution_count = reply["content"].get("execution_count")
            return out


class KernelProcess:
    """A real kernel process started through jupyter_client."""

    def __init__(
        self,
        kernel_name: str = "durable-python3",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        extra_arguments: list[str] | None = None,
        startup_timeout: float = 60,
        log_file: str | None = None,
        connection_file: str | None = None,
        **start_kwargs: Any,
    ):
        self.km = KernelManager(kernel_name=kernel_name)
        if connection_file:  # its name is the kernel's id (else jupyter_client picks a unique one)
            self.km.connection_file = connection_file
        full_env = {**os.environ, **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        # The kernel's own log (its stderr) goes to log_file, or nowhere.
        self._log = open(log_file or os.devnull, "ab")  # noqa: SIM115 - closed in close()
        self.km.start_kernel(
            env=full_env,
            cwd=cwd,
            extra_arguments=extra_arguments or [],
            stderr=self._log,
            stdout=self._log,
            **start_kwargs,
        )
        self.kc = self.km.client()
        #: IOPub messages answering requests already collected, by request id
        self.late: dict[str, list[Any]] = {}
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=startup_timeout)
        self.info = self._kernel_info()

    def _kernel_info(self) -> dict[str, Any]:
        msg_id = self.kc.kernel_info()
        while True:
            reply = self.kc.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]

    @property
    def banner(self) -> str:
        return self.info.get("banner", "")

    @property
    def pid(self) -> int:
        return self.km.provisioner.pid  # type: ignore[union-attr]

    def execute(self, code: str, timeout: float = 120, **kwargs: Any) -> Output:
        """Run ``code`` and collect its output until the kernel is idle again."""
        return collect(self.kc, self.kc.execute(code, **kwargs), timeout, code, self.late)

    def stderr_of(self, out: Output) -> str:
        """Everything a request wrote to stderr: during its cell, and after it (late news sent as its cell's).
        Messages that have arrived by now count: run a request first (``wait_saved``) to receive them."""
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                break
            self.late.setdefault(msg["parent_header"].get("msg_id", ""), []).append(msg)
        late = [
            m["content"]["text"]
            for m in self.late.get(out.msg_id, [])
            if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
        ]
        return out.stderr + "".join(late)

    def value(self, expression: str) -> str:
        """``repr`` of an expression evaluated in the kernel (raises if it fails)."""
        out = self.execute(f"print(repr({expression}))")
        if out.error:
            raise RuntimeError(out.error)
        return out.stdout.strip()

    def kill(self) -> None:
        """SIGKILL the kernel process: no shutdown, no last save."""
        os.kill(self.pid, signal.SIGKILL)
        self.km.provisioner.process.wait(timeout=30)  # type: ignore[union-attr]
        self.close()

    def restart(self) -> None:
        """Kernel -> Restart as JupyterLab and jupyter_client do it: a shutdown request, the
        client's default wait (then its signals), a new kernel on the same ports."""
        self.km.restart_kernel(now=False)
        self.kc.wait_for_ready(timeout=120)
        self.info = self._kernel_info()

    def shutdown(self) -> None:
        """A clean shutdown, as a client's restart or close does."""
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
        self._log.close()

    def close(self) -> None:
        self._log.close()
        self.kc.stop_channels()
        try:
            self.km.shutdown_kernel(now=True)
        except Exception:
            pass

    def __enter__(self) -> KernelProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.km.is_alive():
            self.close()
