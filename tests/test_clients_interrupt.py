"""Interrupts, as a client sends them: ``KernelManager.interrupt_kernel()``.

durable-python3's kernelspec has ``interrupt_mode: signal``, so jupyter_client
sends SIGINT to the kernel's whole process group -- the forked child writing a
checkpoint included.  After an interrupted cell the kernel lives, the
checkpoint after it holds the namespace as the cell left it, and a restart
restores that.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from durable_kernel.testing import collect
from jupyter_client.manager import KernelManager

LOOP = (
    "import time\nprint('looping', flush=True)\nfor step in range(10 ** 9):\n    progress = step\n    time.sleep(0.005)"
)


class Session:
    """A durable-python3 kernel driven with jupyter_client alone."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path):
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.km = KernelManager(kernel_name="durable-python3")
        self.km.start_kernel(env=env, cwd=str(cwd), stdout=self._log, stderr=self._log)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return self.km.provisioner.pid

    def send(self, code: str, **options) -> str:
        return self.kc.execute(code, **options)

    def collect(self, msg_id: str, timeout: float = 60) -> dict:
        got = collect(self.kc, msg_id, timeout)
        return {
            "stdout": got.stdout,
            "stderr": got.stderr,
            "error": got.error_name or None,
            "result": got.result or None,
            "status": got.status,
        }

    def run(self, code: str, **options) -> dict:
        return self.collect(self.send(code, **options))

    def wait_saved(self) -> None:
        out = self.run("get_ipython().kernel.wait_for_checkpoint(60)", silent=True)
        assert out["status"] == "ok", out

    def checkpoint_children(self) -> list[int]:
        """Processes the kernel forked (the background checkpoint writer)."""
        children = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                children += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return children

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=True)
        self._log.close()


@pytest.fixture
def sessions(tmp_path: Path, jupyter_dirs: dict[str, str]):
    env = {
        name: value for name, value in os.environ.items() if name not in ("JPY_SESSION_NAME", "DURABLE_KERNEL_SESSION")
    }
    env.update(jupyter_dirs)
    env.update({"IPYTHONDIR": str(tmp_path / "ipython"), "DURABLE_KERNEL_SESSION": "interrupted.ipynb"})
    started: list[Session] = []

    def start() -> Session:
        session = Session(env, tmp_path, tmp_path / f"kernel-{len(started)}.log")
        started.append(session)
        return session

    yield start
    for session in started:
        session.close()


def wait_looping(session: Session, msg_id: str, timeout: float = 30) -> None:
    """Wait until the cell prints that it runs (ipykernel ignores SIGINT between cells)."""
    while True:
        msg = session.kc.get_iopub_msg(timeout=timeout)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "stream"
            and "looping" in msg["content"]["text"]
        ):
            break


@pytest.mark.slow
def test_interrupted_cell_leaves_a_live_kernel_and_its_namespace_is_what_comes_back(sessions):
    kernel = sessions()
    assert kernel.run("before = 'set before the loop'")["status"] == "ok"
    msg_id = kernel.send(LOOP)
    wait_looping(kernel, msg_id)
    time.sleep(0.5)  # "progress" moves on meanwhile
    kernel.km.interrupt_kernel()
    interrupted = kernel.collect(msg_id)
    assert interrupted["status"] == "error" and interrupted["error"] == "KeyboardInterrupt", interrupted

    assert kernel.km.is_alive()
    after = kernel.run("print(progress, step)")
    assert after["status"] == "ok", after
    progress = int(after["stdout"].split()[0])
    assert progress > 10 and after["stdout"] == f"{progress} {progress}\n"
    assert "durable-kernel" not in after["stderr"] + interrupted["stderr"]
    kernel.wait_saved()

    # Restart as a client does (shutdown_request restart=True, new process).
    kernel.km.restart_kernel(now=False)
    kernel.kc.wait_for_ready(timeout=60)
    back = kernel.run("print(progress, step, before)")
    assert back["stdout"] == f"{progress} {progress} set before the loop\n", back
    assert re.match(
        r"durable-kernel: restored 4 variables for interrupted\.ipynb, .*: before, progress, step, time", back["stderr"]
    ), back["stderr"]


@pytest.mark.slow
def test_interrupt_while_a_checkpoint_is_being_written_loses_neither(sessions):
    """SIGINT reaches the process group: the checkpoint child in flight must carry on."""
    kernel = sessions()
    # About a second to pickle and write: still in flight when the next cell is interrupted.
    assert kernel.run("blob = [{'i': i, 's': str(i)} for i in range(1_000_000)]")["status"] == "ok"
    deadline = time.monotonic() + 5
    while not (writing := kernel.checkpoint_children()) and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel forks just after sending the reply
    msg_id = kernel.send(LOOP)
    wait_looping(kernel, msg_id)
    time.sleep(0.2)
    kernel.km.interrupt_kernel()
    assert writing and set(writing) & set(kernel.checkpoint_children()), "no checkpoint was in flight"
    interrupted = kernel.collect(msg_id)
    assert interrupted["error"] == "KeyboardInterrupt", interrupted

    after = kernel.run("print(progress)")
    assert after["status"] == "ok", after
    progress = int(after["stdout"])
    kernel.wait_saved()
    notes = kernel.run("pass")["stderr"] + after["stderr"]
    assert "checkpoint not saved" not in notes and "killed" not in notes, notes
    assert kernel.run("print(get_ipython().kernel.last_outcome.ok)")["stdout"] == "True\n"

    os.kill(kernel.pid, signal.SIGKILL)  # no last save: what comes back is what was committed
    kernel.km.provisioner.process.wait(timeout=30)
    kernel.close()
    again = sessions()
    back = again.run("print(len(blob), blob[-1], progress)")
    assert back["stdout"] == f"1000000 {{'i': 999999, 's': '999999'}} {progress}\n", back
