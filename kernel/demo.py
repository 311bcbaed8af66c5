"""``durable-kernel demo``: durability end to end, with a real kernel and kill -9."""

from __future__ import annotations

import tempfile
import time

from .kernelspec import KERNEL_NAME
from .testing import KernelProcess

CELLS = [
    "answer = 42\nprimes = [2, 3, 5, 7, 11]\nconfig = {'lr': 0.01, 'epochs': 10}",
    "def greet(name):\n    return f'hello {name}, the answer is {answer}'",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
    "    def __repr__(self):\n        return f'Point({self.x}, {self.y})'\n\norigin = Point(0, 0)",
    "square = lambda v: v * v\nimport math as m",
]
CHECKS = ["answer", "primes", "config", "greet('world')", "origin", "square(12)", "m.pi"]


def run() -> int:
    """Run the demo; returns an exit status."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        print(f"The {KERNEL_NAME} kernelspec is not installed: run 'durable-kernel install --user' first.")
        return 1
    with tempfile.TemporaryDirectory(prefix="durable-kernel-demo-") as store:
        env = {"DURABLE_KERNEL_DIR": store, "DURABLE_KERNEL_SESSION": "durable-kernel demo"}
        print(f"Starting a {KERNEL_NAME} kernel (checkpoints in {store})")
        kernel = KernelProcess(KERNEL_NAME, env=env)
        for cell in CELLS:
            print("\n".join(f"  In  | {line}" for line in cell.splitlines()))
            out = kernel.execute(cell)
            if out.error:
                print(f"  !! {out.error}")
        kernel.execute("get_ipython().kernel.wait_for_checkpoint(60)", silent=True)  # the last cell's checkpoint
        print(f"\nKilling the kernel with SIGKILL (pid {kernel.pid}): no shutdown, no last-minute save.")
        kernel.kill()
        print("Starting a new kernel for the same notebook...\n")
        t0 = time.perf_counter()
        with KernelProcess(KERNEL_NAME, env=env) as again:
            print(f"Kernel ready in {time.perf_counter() - t0:.1f} s. Its banner says:")
            for line in again.banner.strip().splitlines():
                if line.startswith("durable-kernel"):
                    print(f"  {line}")
            print("\nValues in the new kernel:")
            ok = True
            for expr in CHECKS:
                try:
                    print(f"  {expr} = {again.value(expr)}")
                except RuntimeError as exc:
                    ok = False
                    print(f"  {expr}: {exc}")
        print("\nEverything came back." if ok else "\nSome values did not come back (see above).")
        print(f"Try it yourself: jupyter console --kernel {KERNEL_NAME}")
    return 0 if ok else 1
