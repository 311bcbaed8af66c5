"""jupyter console, driven in a pseudo-terminal as a user types into it.

``jupyter console --kernel durable-python3 --simple-prompt`` in a folder: assign
variables, quit, start it again in the same folder.  The banner tells what came
back and the values are there; a console in another folder starts empty.
jupyter console gives the kernel no notebook name, so the folder is the identity.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
from conftest import parse_checkpoint_list
from durable_kernel.magics import EARLIER_KERNEL

pexpect = pytest.importorskip("pexpect")

PROMPT = r"(?:^|\n)In \[\d+\]: "  # at a line start: the banner has "as of In [4]: ..."
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def console_env(tmp_path: Path, jupyter_dirs: dict[str, str]) -> dict[str, str]:
    """The console's environment: private Jupyter/IPython dirs and store, no notebook identity."""
    env = {
        name: value for name, value in os.environ.items() if name not in ("JPY_SESSION_NAME", "DURABLE_KERNEL_SESSION")
    }
    env.update(jupyter_dirs)
    env.update(
        {
            "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
            "IPYTHONDIR": str(tmp_path / "ipython"),
            "TERM": "dumb",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


# Runs the console as its child and, as a container's init that is slow to reap does, adopts the
# kernel the console leaves behind (PR_SET_CHILD_SUBREAPER) without reaping it: once the kernel
# has exited it stays a zombie until this wrapper is told "release" (or 120 s pass).
HOLD_ORPHANS = r"""
import ctypes, select, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
code = subprocess.call(sys.argv[1:])
print("CONSOLE EXITED", code, flush=True)
select.select([sys.stdin], [], [], 120)
"""


class Console:
    """One ``jupyter console`` session in a pty, started in ``folder``."""

    def __init__(self, folder: Path, env: dict[str, str], log: Path, hold_orphans: bool = False):
        self._log = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed in quit()/close()
        self.hold_orphans = hold_orphans
        argv = ["-m", "jupyter_console", "--kernel", "durable-python3", "--simple-prompt"]
        if hold_orphans:
            argv = ["-c", HOLD_ORPHANS, sys.executable, *argv]
        self.child = pexpect.spawn(
            sys.executable,
            argv,
            cwd=str(folder),
            env=env,
            encoding="utf-8",
            timeout=90,
            echo=False,
            dimensions=(50, 400),
        )
        self.child.logfile_read = self._log
        self.child.expect(PROMPT)
        self.banner = self.child.before
        # A person takes a moment before typing the first line.  Typed at once, it is lost about once
        # in 12 starts on a busy machine, with stock ipykernel too: jupyter console shows its first
        # prompt before its IOPub subscription is connected, runs the cell, misses the kernel's idle
        # status and waits for it forever.
        time.sleep(1)
        #: the prompt shown now, e.g. "In [1]:"
        self.prompt = self.child.after.strip()

    def run(self, line: str) -> str:
        """Type one line; what the console printed before the next prompt (then in ``prompt``)."""
        self.child.sendline(line)
        self.child.expect(PROMPT)
        self.prompt = self.child.after.strip()
        return ANSI.sub("", self.child.before)

    def kernel_pid(self) -> int:
        return int(re.search(r"KERNEL PID (\d+)", self.run("print('KERNEL PID', __import__('os').getpid())"))[1])

    def quit(self) -> str:
        """``exit``, as a user types it: the console asks the kernel to shut down and ends."""
        self.child.sendline("exit")
        if self.hold_orphans:
            self.child.expect("CONSOLE EXITED")
            return self.child.before
        self.child.expect(pexpect.EOF)
        out = self.child.before
        self.close()
        return out

    def release(self) -> None:
        """Let the wrapper end, and with it the zombie it held."""
        self.child.sendline("release")
        self.child.expect(pexpect.EOF)
        self.close()

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close()
        self._log.close()


@pytest.fixture
def consoles(tmp_path: Path, console_env: dict[str, str]):
    started: list[Console] = []

    def start(folder: Path, hold_orphans: bool = False) -> Console:
        console = Console(folder, console_env, tmp_path / "console.log", hold_orphans)
        started.append(console)
        return console

    yield start
    for console in started:
        if not console._log.closed:
            console.close()


def process_state(pid: int) -> str:
    """'Z' for a zombie, 'gone' once reaped, else the state letter from /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


def wait_reaped(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while process_state(pid) != "gone":
        assert time.monotonic() < deadline, f"kernel {pid} still {process_state(pid)} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_console_quit_and_start_again_in_the_same_folder_restores(tmp_path, consoles):
    folder = tmp_path / "analysis"
    folder.mkdir()

    first = consoles(folder)
    assert f"durable-kernel: no saved state for {folder} yet" in first.banner
    first.run("answer = 41 + 1")
    first.run("names = ['x', 'y']")
    first.run("greet = lambda who: f'hello {who}'")
    assert "hello you" in first.run("greet('you')")
    old_kernel = first.kernel_pid()
    assert "Shutting down kernel" in first.quit()  # no %checkpoint save: the shutdown waits for it
    # jupyter console does not wait for its kernel to exit; a user starting it again takes a
    # moment.  (Starting again at once is the next test.)
    wait_reaped(old_kernel)

    again = consoles(folder)
    banner_line = next(line for line in again.banner.splitlines() if "durable-kernel:" in line)
    assert re.search(
        rf"durable-kernel: restored 3 variables for {re.escape(str(folder))}, saved .* as of In \[\d+\] of an "
        r"earlier kernel: "
        r"answer, greet, names",
        banner_line,
    ), again.banner
    out = again.run("print(answer, names, greet('again'))")
    assert "42 ['x', 'y'] hello again" in out
    # The first cell repeats the notice on stderr, and nothing else from durable-kernel: in
    # particular no claim that the kernel that just quit is "also saving" this state.
    notices = [line.strip() for line in out.splitlines() if "durable-kernel:" in line]
    assert len(notices) == 1 and notices[0].startswith("durable-kernel: restored 3 variables"), out
    assert "durable-kernel:" not in again.run("more = answer * 2")
    again.quit()

    elsewhere_folder = tmp_path / "elsewhere"
    elsewhere_folder.mkdir()
    elsewhere = consoles(elsewhere_folder)
    assert f"durable-kernel: no saved state for {elsewhere_folder} yet" in elsewhere.banner
    assert "NameError" in elsewhere.run("answer")
    elsewhere.quit()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux only")
def test_console_started_again_at_once_does_not_call_the_quit_kernel_another_writer(tmp_path, consoles):
    """Quit and start again at once, while the old kernel has exited but is not reaped yet.

    jupyter console sends shutdown_request and ends without waiting, so its kernel is
    orphaned; until init reaps it (here 1-2 s; a container whose PID 1 does not reap:
    never) it is a zombie.  The new kernel's first save must not warn that this dead
    kernel "is also saving this notebook's state".
    """
    folder = tmp_path / "quick"
    folder.mkdir()
    first = consoles(folder, hold_orphans=True)
    first.run("answer = 42")
    old_kernel = first.kernel_pid()
    first.quit()
    deadline = time.monotonic() + 30
    while process_state(old_kernel) != "Z":
        assert time.monotonic() < deadline, f"old kernel still {process_state(old_kernel)}"
        time.sleep(0.05)
    try:
        again = consoles(folder)
        assert "42" in again.run("print(answer)")
        out = again.run("more = answer + 1") + again.run("get_ipython().kernel.wait_for_checkpoint(30)")
        out += again.run("pass")
        assert "another kernel" not in out, out
        again.quit()
    finally:
        first.release()


@pytest.fixture
def restored_console(tmp_path, consoles):
    """A console started again in a folder where the previous one ran In [1] to [3] and quit."""
    folder = tmp_path / "numbers"
    folder.mkdir()
    first = consoles(folder)
    for line in ("a = 1", "b = 2", "c = a + b"):
        first.run(line)
    old_kernel = first.kernel_pid()
    first.quit()
    wait_reaped(old_kernel)
    again = consoles(folder)
    assert "as of In [3] of an earlier kernel: a, b, c" in again.banner, again.banner
    return again


@pytest.mark.slow
def test_console_prompts_and_tracebacks_count_from_in_1_after_a_restore(restored_console):
    console = restored_console
    assert console.prompt == "In [1]:"
    out = console.run("1 / 0")
    assert "ZeroDivisionError" in out and "Cell In[1], line 1" in out, out
    assert console.prompt == "In [2]:"
    console.run("d = c + 1")
    assert console.prompt == "In [3]:"


@pytest.mark.slow
def test_console_checkpoint_list_shows_this_kernels_cells_by_their_prompt_numbers(restored_console):
    console = restored_console
    made_at = console.prompt
    console.run("d = c + 1")
    console.run("assert get_ipython().kernel.wait_for_checkpoint(30)")
    listed = parse_checkpoint_list(console.run("%checkpoint list"))
    shown = [line if isinstance(line, str) else (f"In [{line['In']}]:", line["cell"]) for line in listed]
    assert shown == [
        (made_at, "d = c + 1"),
        EARLIER_KERNEL,
        ("In [3]:", "c = a + b"),
        ("In [2]:", "b = 2"),
        ("In [1]:", "a = 1"),
    ]
