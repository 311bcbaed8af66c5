"""Nothing lost when resources run short (issue 9): a container's memory limit, foreground
saves that must not break the kernel, and crash leftovers on a small disk.

Real kernels; the memory limit is a real cgroup (tests/cgroup_support.py), the small disk a
real tmpfs (both skipped, with the reason, where this machine refuses them).
"""

from __future__ import annotations

import time

import pytest
from cgroup_support import memory_cgroup
from conftest import holds, wait_saved
from durable_kernel.checkpoints import Store
from durable_kernel.checkpoints.location import open_store
from reliability_support import mounted_tmpfs, report

MiB = 1 << 20
FOREGROUND = ["--DurableKernel.background=False"]


def the_store(jupyter_dirs) -> Store:
    return open_store(environ=jupyter_dirs)


def newest_skipped(jupyter_dirs, session: str) -> dict[str, str]:
    nb = the_store(jupyter_dirs).notebook(session)
    return {s["name"]: s["reason"] for s in nb.read_manifest(nb.checkpoint_ids()[0]).skipped}


# --- 7. a container's memory limit -------------------------------------------------------------------


def test_a_kernel_near_its_containers_memory_limit_stays_alive_and_says_why(start_kernel, capsys):
    with memory_cgroup(1150 * MiB) as cg:
        kernel = start_kernel(session="container.ipynb", preexec_fn=cg.join)
        # about 760 MiB of Python objects: a checkpoint child touching each would copy them all,
        # and pickling them here would take more than the 1150 MiB limit leaves
        built = kernel.execute("rows = [[float(i), float(i + 1)] for i in range(5_600_000)]\nx = 0", timeout=300)
        assert not built.error, built.error
        told = kernel.execute("x = 1", timeout=300).stderr
        for _ in range(3):
            told += kernel.execute("x += 1", timeout=300).stderr
        told += kernel.stderr_of(built)
        assert kernel.km.is_alive()
        assert "memory is low" in told and "container limit 1.1 GiB" in told, told
        assert "not saved: rows (builtins.list: not enough free memory to save it" in told, told
        wait_saved(kernel, timeout=300)
        oom_kills = cg.oom_kills()
        kernel.kill()
    again = start_kernel(session="container.ipynb")
    assert again.value("x") == "4"
    assert oom_kills == 0
    report(
        "container memory limit 1150 MiB, ~760 MiB namespace",
        capsys,
        rounds=1,
        lost=0,
        untrusted_code_ran=0,
        kernel_alive=True,
        oom_kills=oom_kills,
    )


# --- 8. foreground saves -------------------------------------------------------------------------------

DEEP = "import sys\nsys.setrecursionlimit(1_000_000)\ndeep = []\nfor _ in range(100_000):\n    deep = [deep]\nkept = 1"


@pytest.mark.parametrize("where", ["foreground", "background"])
def test_a_deep_structure_under_a_raised_recursion_limit_is_skipped_not_a_crash(where, start_kernel, jupyter_dirs):
    session = f"deep-{where}.ipynb"
    kernel = start_kernel(session=session, extra_arguments=FOREGROUND if where == "foreground" else [])
    made = kernel.execute(DEEP)
    wait_saved(kernel)
    told = kernel.execute("pass").stderr + kernel.stderr_of(made)
    assert kernel.km.is_alive()
    assert "not saved: deep (builtins.list: nested too deeply to pickle (recursion limit))" in told, told
    wait_saved(kernel)
    assert newest_skipped(jupyter_dirs, session) == {"deep": "nested too deeply to pickle (recursion limit)"}
    kernel.kill()
    assert start_kernel(session=session).value("kept") == "1"


@pytest.mark.parametrize("raised", ["SystemExit", "GeneratorExit", "KeyboardInterrupt('from __reduce__')"])
def test_a_reduce_that_raises_a_base_exception_does_not_stop_the_kernel(raised, start_kernel):
    kernel = start_kernel(session="base-exception.ipynb", extra_arguments=FOREGROUND)
    code = f"class Odd:\n    def __reduce__(self):\n        raise {raised}\nodd = Odd()\nkept = 1"
    out = kernel.execute(code, timeout=60)
    assert out.status == "ok" and not out.error, out
    assert kernel.execute("1 + 1", timeout=60).result == "2"
    assert kernel.km.is_alive()


SLOW = "import time\nclass Slow:\n    def __reduce__(self):\n        time.sleep(3600)\n        return (int, ())\nslow = Slow()"


def test_a_foreground_save_that_hangs_is_stopped_and_the_variable_skipped(start_kernel, jupyter_dirs, capsys):
    kernel = start_kernel(
        session="fg-slow.ipynb", extra_arguments=[*FOREGROUND, "--DurableKernel.checkpoint_timeout=2"]
    )
    out = kernel.execute(SLOW + "\nkept = 1", timeout=120)
    assert out.status == "ok", out
    assert "took longer than 2 s while saving 'slow'; 'slow' is skipped until it is reassigned" in out.stderr, out
    later = kernel.execute("more = 2", timeout=120)
    assert "checkpoint took longer" not in later.stderr, later.stderr  # not stuck again on the next cell
    assert newest_skipped(jupyter_dirs, "fg-slow.ipynb") == {"slow": "saving it took longer than 2 s"}
    kernel.kill()
    assert start_kernel(session="fg-slow.ipynb").value("(kept, more)") == "(1, 2)"
    report("foreground save hangs (checkpoint_timeout=2)", capsys, rounds=1, lost=0, untrusted_code_ran=0)


def test_interrupting_a_foreground_save_skips_the_variable_from_then_on(start_kernel, jupyter_dirs):
    kernel = start_kernel(session="fg-interrupt.ipynb", extra_arguments=FOREGROUND)
    msg_id = kernel.kc.execute(SLOW + "\nkept = 1")
    time.sleep(3)  # the cell body is done; the save is stuck in __reduce__
    kernel.km.interrupt_kernel()
    reply = kernel.kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok"
    told = _stderr_of(kernel, msg_id)
    assert "the checkpoint was interrupted while saving 'slow'; 'slow' is skipped until it is reassigned" in told, told
    later = kernel.execute("more = 2", timeout=60)
    assert later.status == "ok", later
    assert newest_skipped(jupyter_dirs, "fg-interrupt.ipynb") == {"slow": "saving it was interrupted"}


def _stderr_of(kernel, msg_id: str) -> str:
    text = ""
    while True:
        try:
            msg = kernel.kc.get_iopub_msg(timeout=1)
        except Exception:
            return text
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            text += msg["content"]["text"]


# --- 11. crash leftovers on a small disk -------------------------------------------------------------


def test_crash_leftovers_do_not_stop_saves_on_a_small_disk(start_kernel, tmp_path, jupyter_dirs, capsys):
    with mounted_tmpfs(tmp_path / "small-disk", "200m") as disk:
        env = {"DURABLE_KERNEL_DIR": str(disk / "store")}
        kernel = start_kernel(session="leftovers.ipynb", env=env)
        assert not kernel.execute("x = 1").error
        wait_saved(kernel)
        kernel.kill()
        nb = Store(disk / "store", the_store(jupyter_dirs).key).notebook("leftovers.ipynb")
        for i, folder in enumerate([nb.manifests_dir, nb.blobs_dir / "ab", nb.blobs_dir / "cd"]):
            folder.mkdir(exist_ok=True)
            (folder / f".tmp-99999{i}-dead").write_bytes(b"\0" * (22 * MiB))  # 66 MiB a crash left behind
        kernel = start_kernel(session="leftovers.ipynb", env=env)
        assert not kernel.execute("import numpy as np\narr = np.ones(150 * 2**20 // 8)").error  # 150 MiB
        wait_saved(kernel)
        told = kernel.execute("pass").stderr
        assert "checkpoint not saved" not in told, told
        kernel.kill()
        holds(start_kernel(session="leftovers.ipynb", env=env), "arr.sum() == 150 * 2**20 // 8")
    report("66 MiB of crash leftovers on a 200 MiB disk", capsys, rounds=1, lost=0, untrusted_code_ran=0)
