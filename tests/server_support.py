"""A real ``jupyter server`` on 127.0.0.1 for tests (not a test module).

Random port and token, its own root folder and runtime dir; the REST API is
called as JupyterLab calls it, and a kernel the server started is reached
through its connection file (what JupyterLab's websocket would relay).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client import BlockingKernelClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterServer:
    """``jupyter server`` serving ``root``, with the environment ``env`` (store, key, runtime dir)."""

    def __init__(self, root: Path, env: dict[str, str], log: Path, extra_args: list[str] | None = None):
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime = Path(env["JUPYTER_RUNTIME_DIR"])
        argv = [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
        ]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        argv += extra_args or []
        self._log = open(log, "ab")  # closed in stop()
        self.process = subprocess.Popen(
            argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, f"jupyter server exited ({self.process.returncode}); see {log}"
            try:
                self.call("GET", "status")
                break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"jupyter server did not answer within 60 s; see {log}"
            time.sleep(0.2)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        """One REST call, authenticated with the token; returns the JSON reply (or None)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read()
        return json.loads(text) if text else None

    def request(self, method: str, path: str, body: Any = None, token: bool = True, timeout: float = 120) -> tuple:
        """One REST call that may be refused: ``(status, JSON reply or None)``; ``token=False`` sends no
        credentials at all (no token, no cookie)."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"token {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/api/{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                status, text = reply.status, reply.read()
        except urllib.error.HTTPError as refused:
            status, text = refused.code, refused.read()
        try:
            return status, (json.loads(text) if text else None)
        except ValueError:  # not JSON (a page): the text, for the assertion message
            return status, text.decode(errors="replace")

    def new_notebook(self, path: str) -> None:
        """Create an empty notebook file through the contents API."""
        nb = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        self.call("PUT", f"contents/{path}", {"type": "notebook", "format": "json", "content": nb})

    def open_notebook(self, path: str, kernel: str = "durable-python3") -> dict[str, Any]:
        """Start a session for ``path`` as JupyterLab does when a notebook is opened."""
        return self.call(
            "POST",
            "sessions",
            {
                "path": path,
                "name": os.path.basename(path),
                "type": "notebook",
                "kernel": {"name": kernel},
            },
        )

    def rename(self, session: dict[str, Any] | None, old: str, new: str) -> None:
        """Rename a notebook as JupyterLab does: the file, then its open session's path."""
        self.call("PATCH", f"contents/{old}", {"path": new})
        if session is not None:
            self.call(
                "PATCH",
                f"sessions/{session['id']}",
                {
                    "path": new,
                    "name": os.path.basename(new),
                    "type": "notebook",
                },
            )

    def restart(self, kernel_id: str) -> None:
        """Kernel -> Restart: the server shuts the kernel down and starts it again, same id."""
        self.call("POST", f"kernels/{kernel_id}/restart", {}, timeout=120)

    def close(self, session: dict[str, Any]) -> None:
        """Close the notebook and shut its kernel down."""
        self.call("DELETE", f"sessions/{session['id']}", timeout=120)

    def client(self, kernel_id: str) -> Client:
        """A client of a kernel this server started."""
        return Client(self.runtime / f"kernel-{kernel_id}.json")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Client:
    """A blocking client on a server-started kernel, for running cells."""

    def __init__(self, connection_file: Path):
        self.kc = BlockingKernelClient(connection_file=str(connection_file))
        self.kc.load_connection_file()
        self.kc.start_channels()
        self.wait_for_ready()

    def wait_for_ready(self, timeout: float = 90) -> None:
        """Wait until the kernel answers kernel_info and its iopub is connected, then flush iopub.

        jupyter_client's own wait_for_ready, for a kernel it did not start, calls the kernel
        dead once one heartbeat (1 s) goes unanswered. A kernel the server has just started or
        restarted may still be importing then on a busy 2-core machine; here only the timeout counts.
        """
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the kernel did not answer kernel_info in {timeout:.0f} s (see the server log)")
            self.kc.kernel_info()
            try:
                reply = self.kc.get_shell_msg(timeout=1)
            except Empty:
                continue
            if reply["msg_type"] != "kernel_info_reply":
                continue
            try:
                self.kc.get_iopub_msg(timeout=0.2)
            except Empty:
                continue  # iopub not connected yet: ask again
            break
        while True:
            try:
                self.kc.get_iopub_msg(timeout=0.2)
            except Empty:
                return

    def run(self, code: str, timeout: float = 60) -> dict[str, str]:
        """Run a cell: {'stdout', 'stderr', 'error'}."""
        out = {"stdout": "", "stderr": "", "error": ""}

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
            elif kind == "error":
                out["error"] = f"{content['ename']}: {content['evalue']}"

        self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return out

    def close(self) -> None:
        self.kc.stop_channels()
