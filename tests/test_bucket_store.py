"""State that follows the user to another machine (issue 13): checkpoints in object storage.

A real S3 server (SeaweedFS, ``tests/s3_support.py``) on 127.0.0.1.  A "machine" is a
Jupyter data dir of its own (its own local cache of the bucket); kernels are real
(jupyter_client), killed with SIGKILL, and what comes back is checked value by value.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from durable_kernel.checkpoints import location, serialize, sync
from durable_kernel.checkpoints import manifest as manifest_format
from durable_kernel.checkpoints.bucket import Bucket
from durable_kernel.checkpoints.location import open_store
from durable_kernel.testing import KernelProcess
from s3_support import SeaweedS3

SESSION = "/home/user/analysis.ipynb"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.close()


@pytest.fixture
def bucket_url(s3, monkeypatch):
    """A fresh bucket for this test; this process reaches it through the usual AWS variables."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    url = s3.create_bucket(f"t-{uuid.uuid4().hex[:12]}") + "/state"
    return url


class Machines:
    """Machines sharing one bucket: each its own data dir (cache, key); kernels killed at the end."""

    def __init__(self, tmp_path: Path, s3: SeaweedS3, url: str):
        self.tmp, self.s3, self.url = tmp_path, s3, url
        self.kernels: list[KernelProcess] = []
        self.keys: dict[str, str] = {}

    def env(self, name: str) -> dict[str, str]:
        env = {
            **self.s3.env(),
            "JUPYTER_DATA_DIR": str(self.tmp / name / "jupyter-data"),
            "DURABLE_KERNEL_DIR": self.url,
            "DURABLE_KERNEL_SESSION": SESSION,
        }
        if name in self.keys:
            env["DURABLE_KERNEL_KEY"] = self.keys[name]
        return env

    def give_key(self, source: str, target: str) -> None:
        """Carry the key from one machine to another, as a Kubernetes secret would: in DURABLE_KERNEL_KEY."""
        self.keys[target] = self.keys.get(source) or location.key_path(self.env(source)).read_text().strip()

    def start(self, name: str) -> KernelProcess:
        kernel = KernelProcess(
            "durable-python3", env=self.env(name), log_file=str(self.tmp / f"{name}-{len(self.kernels)}.log")
        )
        self.kernels.append(kernel)
        return kernel

    def close(self) -> None:
        for kernel in self.kernels:
            if kernel.km.is_alive():
                kernel.close()


@pytest.fixture
def machines(tmp_path, s3, bucket_url):
    found = Machines(tmp_path, s3, bucket_url)
    yield found
    found.close()


def uploaded(kernel: KernelProcess, timeout: float = 60) -> None:
    out = kernel.execute(f"assert get_ipython().kernel.wait_for_upload({timeout}), 'not uploaded'", silent=True)
    assert not out.error, out.error


def remote_ids(url: str) -> list[int]:
    bucket = Bucket(url)
    return sync.manifest_ids(bucket.objects(f"{manifest_format.folder_name(SESSION)}/manifests"))


def first_cell_with_the_server_down(machines: Machines, name: str, cell: str):
    """Start a kernel on machine ``name`` while the S3 endpoint is down; its first cell's output."""
    machines.s3.stop()
    try:
        return machines.start(name).execute(cell)
    finally:
        machines.s3.start()


def test_a_kernel_killed_on_one_machine_restores_exactly_on_another(machines):
    a = machines.start("A")
    a.execute("import numpy as np\nx = 41\nnames = ['a', 'b']\narr = np.arange(2_000_000, dtype=np.float64)")
    a.execute("x += 1\narr[7] = -1.0")
    uploaded(a)
    a.kill()
    machines.give_key("A", "B")
    b = machines.start("B")
    out = b.execute("print(x, names, arr[7], arr[-1], arr.dtype)")
    assert out.stdout.strip() == "42 ['a', 'b'] -1.0 1999999.0 float64", b.stderr_of(out)
    assert "downloaded checkpoint" in out.stderr and machines.url in out.stderr


def test_cells_keep_working_while_the_server_is_down_and_the_upload_completes_when_it_is_back(machines):
    a = machines.start("A")
    a.execute("x = 1")
    uploaded(a)
    machines.s3.stop()
    try:
        outs = [a.execute("x = 2\ny = x * 10")]
        # The upload fails in the background; its warning comes with a later cell.
        deadline = time.monotonic() + 60
        while "cannot upload to" not in a.stderr_of(outs[-1]) and time.monotonic() < deadline:
            time.sleep(0.5)
            outs.append(a.execute("x += 1\ny = x * 10"))
        outs += [a.execute("x += 1\ny = x * 10") for _ in range(3)]
        assert all(o.status == "ok" and not o.error for o in outs)
        warnings = "".join(a.stderr_of(o) for o in outs)
        assert warnings.count("cannot upload to") == 1, warnings
        status = a.execute("%checkpoint status").stdout
        assert "waiting to upload" in status, status
        expected = a.value("(x, y)")
    finally:
        machines.s3.start()
    uploaded(a, timeout=120)
    assert "uploaded to" in a.execute("%checkpoint status").stdout
    a.kill()
    machines.give_key("A", "B")
    b = machines.start("B")
    assert b.value("(x, y)") == expected


def test_a_restore_with_the_server_down_uses_the_local_cache_and_says_so(machines):
    a = machines.start("A")
    a.execute("x = 'from the cache'")
    uploaded(a)
    a.kill()
    out = first_cell_with_the_server_down(machines, "A", "print(x)")
    assert out.stdout.strip() == "from the cache"
    assert "cannot be reached" in out.stderr and "restored from this machine's cache instead" in out.stderr


def test_a_restore_with_the_server_down_and_no_cache_starts_empty_and_says_why(machines):
    a = machines.start("A")
    a.execute("x = 1")
    uploaded(a)
    a.kill()
    machines.give_key("A", "B")
    out = first_cell_with_the_server_down(machines, "B", "print('x' in dir())")
    assert out.stdout.strip() == "False"
    assert "cannot be reached" in out.stderr and "nothing in this machine's cache either" in out.stderr


def test_two_machines_alternating_cells_leave_only_checkpoints_that_load(machines):
    a = machines.start("A")
    a.execute("turn = 0")
    uploaded(a)
    machines.give_key("A", "B")
    b = machines.start("B")
    for i in range(1, 7):
        kernel = a if i % 2 else b
        kernel.execute(f"turn = {i}\nby = {'A' if i % 2 else 'B'!r}\ndata = list(range({i} * 1000))")
        uploaded(kernel)
    # Every checkpoint in the bucket verifies and has all its blobs, intact.
    key = location.key_path(machines.env("A")).read_bytes().strip()
    bucket = Bucket(machines.url)
    folder = manifest_format.folder_name(SESSION)
    blobs = bucket.objects(f"{folder}/blobs")
    ids = remote_ids(machines.url)
    assert len(ids) >= 2
    for gen in ids:
        raw = bucket.get(f"{folder}/manifests/{gen:012d}.manifest")
        man = manifest_format.decode(raw, key, f"checkpoint {gen}", generation=gen, folder=folder)
        for digest in man.blob_digests():
            assert f"{folder}/blobs/{digest[:2]}/{digest}" in blobs
    a.kill()
    b.kill()
    machines.give_key("A", "C")
    c = machines.start("C")
    assert c.execute("print(turn, by, len(data))").stdout.strip() == "6 B 6000"


def test_gc_on_one_machine_while_another_commits_loses_nothing(machines):
    a = machines.start("A")
    env = {**os.environ, **machines.env("G")}
    a.execute("import numpy as np\nbig = np.zeros(3_000_000)")
    uploaded(a)
    machines.give_key("A", "G")
    gc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "end = time.time() + 25\n"
            "while time.time() < end:\n"
            f"    subprocess.run(['durable-kernel', 'gc', '--grace', '2s', '--dir', {machines.url!r}], check=True,"
            " capture_output=True)\n",
        ],
        env=env,
    )
    try:
        for i in range(1, 12):
            a.execute(f"big[:] = {i}\nstep = {i}")
        uploaded(a, timeout=120)
    finally:
        gc.wait(60)
    assert gc.returncode == 0
    a.kill()
    machines.give_key("A", "B")
    b = machines.start("B")
    assert b.execute("print(step, big.min(), big.max())").stdout.strip() == "11 11.0 11.0"
    # gc did collect: blobs of checkpoints it dropped are gone once they are old enough.
    done = subprocess.run(
        ["durable-kernel", "gc", "--grace", "0s", "--dir", machines.url, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"freed"' in done.stdout


class _Planted:
    """Unpickling this runs a shell command: what an attacker would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_planted_in_the_bucket_without_the_key_is_never_unpickled(machines, tmp_path):
    a = machines.start("A")
    a.execute("x = 'genuine'")
    uploaded(a)
    a.kill()
    marker = tmp_path / "planted-code-ran"
    forger = open_store(environ=machines.env("Mallory"))  # a key of its own
    nb = forger.notebook(SESSION)
    nb.commit(serialize.snapshot({"x": _Planted(marker)}), execution_count=99)
    assert sync.upload_newest(nb, Bucket(machines.url)) is not None  # now the bucket's newest
    machines.give_key("A", "B")
    b = machines.start("B")
    out = b.execute("print(x)")
    assert out.stdout.strip() == "genuine"
    assert "not signed with this user's key" in out.stderr
    assert not marker.exists()


def replace_newest_buffer_of(machines: Machines, name: str, data: Callable[[int], bytes]) -> None:
    """Overwrite, in the bucket, the first buffer blob (chunk) of variable ``name`` in the newest checkpoint
    with ``data(its size)``."""
    bucket = Bucket(machines.url)
    folder = manifest_format.folder_name(SESSION)
    key = location.key_path(machines.env("A")).read_bytes().strip()
    newest = remote_ids(machines.url)[0]
    raw = bucket.get(f"{folder}/manifests/{newest:012d}.manifest")
    man = manifest_format.decode(raw, key, "newest", generation=newest, folder=folder)
    digest, size = next((b["digest"], b["size"]) for v in man.variables if v["name"] == name for b in v["buffers"])
    path = machines.tmp / f"replacement-{digest[:8]}"
    path.write_bytes(data(size))
    with open(path, "rb") as f:
        bucket.upload(f"{folder}/blobs/{digest[:2]}/{digest}", f)


def test_a_damaged_blob_in_the_bucket_is_not_used(machines):
    a = machines.start("A")
    a.execute("import numpy as np\nold = np.arange(100_000)")
    uploaded(a)
    a.execute("new = np.arange(200_000) * 2")
    uploaded(a)
    a.kill()
    replace_newest_buffer_of(machines, "new", lambda size: b"\x00" * size)  # same size, other bytes
    machines.give_key("A", "B")
    b = machines.start("B")
    out = b.execute("print('new' in dir(), old[-1])")
    assert out.stdout.strip() == "False 99999"
    assert "damaged" in out.stderr


def test_the_cli_lists_shows_gcs_and_clears_a_bucket_store(machines):
    a = machines.start("A")
    a.execute("import numpy as np\nweights = np.ones(50_000)")
    a.execute("weights = weights * 2")
    uploaded(a)
    a.kill()
    env = {**os.environ, **machines.env("A")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["durable-kernel", *args, "--dir", machines.url], env=env, capture_output=True, text=True)

    listed = cli("list")
    assert listed.returncode == 0 and SESSION in listed.stdout and machines.url in listed.stdout, listed
    shown = cli("show", SESSION)
    assert shown.returncode == 0 and "weights" in shown.stdout and "numpy.ndarray" in shown.stdout, shown
    collected = cli("gc", "--grace", "0s")
    assert collected.returncode == 0 and "Removed" in collected.stdout, collected
    assert "weights" in cli("show", SESSION).stdout  # what the kept checkpoints need stays
    cleared = cli("clear", SESSION)
    assert cleared.returncode == 0 and "Removed" in cleared.stdout, cleared
    assert Bucket(machines.url).objects(manifest_format.folder_name(SESSION)) == {}
    assert "No checkpoints" in cli("list").stdout


def test_clearing_a_bucket_store_clears_this_machines_cache_too(machines):
    a = machines.start("A")
    a.execute("x = 'old state'")
    uploaded(a)
    a.kill()
    env = {**os.environ, **machines.env("A")}
    cleared = subprocess.run(["durable-kernel", "clear", SESSION], env=env, capture_output=True, text=True)
    assert cleared.returncode == 0, cleared
    again = machines.start("A")
    assert again.execute("print('x' in dir())").stdout.strip() == "False"


def test_a_small_change_uploads_less_than_a_mebibyte(machines):
    a = machines.start("A")
    a.execute("import numpy as np\nbig = np.zeros(4_000_000)\nsmall = 1")
    uploaded(a)
    a.execute("small = 2")
    uploaded(a)
    last = a.execute("print(get_ipython().kernel.uploads.last['bytes'])", silent=True).stdout
    assert int(last) < 1 << 20, last


def test_pickle_helper_planted_payload_would_run(tmp_path):
    """The planted payload of the test above is real: unpickled, it runs its command."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Planted(marker)))
    assert marker.exists()


def test_checkpoint_clear_in_a_kernel_clears_the_bucket_too(machines):
    a = machines.start("A")
    a.execute("x = 'old state'")
    uploaded(a)
    out = a.execute("%checkpoint clear")
    assert "Removed" in out.stdout and not out.error, a.stderr_of(out)
    a.kill()
    machines.give_key("A", "B")
    b = machines.start("B")  # a fresh machine: only the bucket could bring it back
    assert b.execute("print('x' in dir())").stdout.strip() == "False"


def test_a_cache_restores_the_newer_state_another_machine_made_after_a_clear(machines):
    a = machines.start("A")
    for i in range(3):
        a.execute(f"x = 'old {i}'")
    uploaded(a)
    machines.give_key("A", "B")
    b = machines.start("B")
    assert b.execute("print(x)").stdout.strip() == "old 2"  # B's cache now holds the old state
    b.kill()
    a.execute("%checkpoint clear")
    for i in range(3):  # the bucket's generations start again from 1 and reach the same numbers
        a.execute(f"x = 'new {i}'")
    uploaded(a)
    a.kill()
    again = machines.start("B")
    assert again.execute("print(x)").stdout.strip() == "new 2"


def test_junk_under_manifests_in_the_bucket_does_not_stop_uploads(machines):
    a = machines.start("A")
    a.execute("x = 1")
    uploaded(a)
    folder = manifest_format.folder_name(SESSION)
    junk = machines.tmp / "junk"
    junk.write_bytes(b'durable-kernel-manifest\nsig\n{"variables":[{"buffers":[{}]}]}')
    with open(junk, "rb") as f:
        Bucket(machines.url).upload(f"{folder}/manifests/notes.txt", f)
    a.execute("x = 2")
    uploaded(a)
    a.kill()
    machines.give_key("A", "B")
    assert machines.start("B").execute("print(x)").stdout.strip() == "2"


def test_a_blob_larger_than_its_signed_manifest_says_is_not_downloaded(machines):
    a = machines.start("A")
    a.execute("import numpy as np\nold = np.arange(1000)")
    uploaded(a)
    a.execute("new = np.arange(100_000) * 3")
    uploaded(a)
    a.kill()
    replace_newest_buffer_of(machines, "new", lambda size: b"\x00" * (8 << 20))
    machines.give_key("A", "B")
    out = machines.start("B").execute("print('new' in dir(), old[-1])")
    assert out.stdout.strip() == "False 999"
    assert "larger than it should be" in out.stderr
