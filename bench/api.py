"""API throughput: status polls per second and their latency while a job runs, against `/healthz`.

Everything is real and on this machine: a redis-server, the API under uvicorn as it is deployed
(`app.api.main:create_app`, no reload, no access log; `--api-workers` processes), and a Celery worker
running a real tiny job (tiny Arc2Face, CPU, one torch thread so that the API keeps its share of a
small machine). Once the job is rendering, `--clients` keep-alive connections each send
`GET /v1/jobs/{id}` back to back for `--seconds` (after a one-second warm-up), then the same against
`GET /healthz`, the reference: the cheapest route through the same server, middleware and client.

The client is a minimal asyncio HTTP/1.1 client (one request in flight per connection), so that the
load generator, not httpx, is not what saturates a small machine; every response's status is
checked and every 50th job body is parsed to record the job's status. Rate limiting stays on, with
a limit far above the load, so that each poll pays its token-bucket round trip as in production.

    python -m bench.api [--quick] [--seconds 10] [--clients 10] [--api-workers 1]

`--quick` (what `python -m bench` runs): 3 seconds each. Target (issue 7): at least 1,000 polls/s
with p99 at most 25 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.servers import RedisServer, free_port, stop_group
from bench import emit, quick_summary

SECONDS, QUICK_SECONDS = 10.0, 3.0  # measured seconds per route
WARMUP_S = 1.0  # seconds of load before measuring starts
CLIENTS = 10  # concurrent keep-alive connections
TARGET_RATE, TARGET_P99_MS = 1000.0, 25.0  # issue 7
KEY = "key-bench"
# A job that keeps rendering for minutes on one CPU thread: the polls see it running.
JOB = {"identities": 2000, "images_per_identity": 4, "seed": 1, "render": {"steps": 2, "batch_size": 8},
       "quality": {"report": False}}
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


@dataclass
class Load:
    """What one route's run measured."""

    latencies: list[float] = field(default_factory=list)  # seconds, one per measured request
    statuses: Counter[int] = field(default_factory=Counter)
    job_states: Counter[str] = field(default_factory=Counter)  # from every 50th job body
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def pct_ms(self, q: float) -> float:
        xs = sorted(self.latencies)
        return 1e3 * xs[min(len(xs) - 1, int(q * len(xs)))]


async def _connection(host: str, port: int, request: bytes, start: float, stop: float, load: Load,
                      parse_every: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    n = 0
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            m = _CONTENT_LENGTH.search(head)
            if m is None:
                raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
            body = await reader.readexactly(int(m[1]))
            t1 = time.perf_counter()
            if t0 >= start and t1 <= stop:
                load.latencies.append(t1 - t0)
                status = int(head[9:12])
                load.statuses[status] += 1
                n += 1
                if parse_every and status == 200 and n % parse_every == 0:
                    load.job_states[json.loads(body)["status"]] += 1
    finally:
        writer.close()


async def _hammer(host: str, port: int, path: str, clients: int, seconds: float, parse_every: int) -> Load:
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
               "Accept: application/json\r\n\r\n").encode()
    load = Load(seconds=seconds)
    start = time.perf_counter() + WARMUP_S
    await asyncio.gather(*(_connection(host, port, request, start, start + seconds, load, parse_every)
                           for _ in range(clients)))
    return load


def hammer(port: int, path: str, clients: int, seconds: float, parse_every: int = 0) -> Load:
    return asyncio.run(_hammer("127.0.0.1", port, path, clients, seconds, parse_every))


def process_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of the processes so far (Linux /proc)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


@contextlib.contextmanager
def service(root: Path, model_dir: Path, api_workers: int) -> Iterator[tuple[int, int]]:
    """Redis, a worker and the API; yields (API port, uvicorn's pid)."""
    redis = RedisServer(root / "redis", appendonly=True).start()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDFORGE_REDIS_URL": redis.url,
           "IDFORGE_API_KEYS": f"bench:{KEY}", "IDFORGE_STORAGE_DIR": str(root / "storage"),
           "IDFORGE_MODEL_DIR": str(model_dir), "IDFORGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
           "IDFORGE_SHARD_IDENTITIES": "16", "IDFORGE_LOG_FORMAT": "json",
           "IDFORGE_RATE_LIMIT_PER_S": "1000000", "IDFORGE_RATE_LIMIT_BURST": "1000000",
           "IDFORGE_MAX_CONCURRENT_JOBS": "0"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        worker_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--concurrency", "1"],
                                      env=worker_env, stdout=open(root / "worker.log", "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(api_workers), "--no-access-log", "--log-level", "warning"],
            env=env, stdout=open(root / "api.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_http(f"http://127.0.0.1:{port}/healthz", procs[-1], root / "api.log")
        yield port, procs[-1].pid
    finally:
        for p in reversed(procs):
            stop_group(p, timeout=20)
        redis.stop()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def start_job(port: int, timeout: float = 300) -> str:
    """Submit the job and wait until the worker renders it; returns its id."""
    auth = {"Authorization": f"Bearer {KEY}"}
    base = f"http://127.0.0.1:{port}"
    r = httpx.post(f"{base}/v1/jobs", json=JOB, headers=auth, timeout=30)
    if r.status_code != 202:
        raise RuntimeError(f"submit: {r.status_code} {r.text}")
    job_id: str = r.json()["id"]
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=30).json()
        if job["status"] == "running" and job["progress"]["images_done"] > 0:
            return job_id
        if job["terminal"] or time.monotonic() > deadline:
            raise RuntimeError(f"the job did not start rendering: {job['status']} {job.get('error')}")
        time.sleep(0.5)


def measure(seconds: float, clients: int, api_workers: int, model_dir: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp, service(Path(tmp), model_dir, api_workers) as (port, pid):
        job_id = start_job(port)
        pids = _tree(pid)
        c0 = process_cpu_s(pids)
        polls = hammer(port, f"/v1/jobs/{job_id}", clients, seconds, parse_every=50)
        c1 = process_cpu_s(pids)
        health = hammer(port, "/healthz", clients, seconds)
        c2 = process_cpu_s(pids)
        auth = {"Authorization": f"Bearer {KEY}"}
        done = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", headers=auth).json()["progress"]
        httpx.post(f"http://127.0.0.1:{port}/v1/jobs/{job_id}/cancel", headers=auth)
    bad = {s: n for s, n in (polls.statuses + health.statuses).items() if s != 200}
    if bad:
        raise RuntimeError(f"non-200 responses: {bad}")
    ok = polls.rate >= TARGET_RATE and polls.pct_ms(0.99) <= TARGET_P99_MS
    per_req = (lambda cpu, load: 1e3 * cpu / max(1, len(load.latencies) + clients))
    return [
        (f"api GET /v1/jobs/{{id}}: {polls.rate:.0f} polls/s, p50 {polls.pct_ms(0.5):.1f} ms, "
         f"p99 {polls.pct_ms(0.99):.1f} ms | /healthz: {health.rate:.0f} req/s, p50 {health.pct_ms(0.5):.1f} ms, "
         f"p99 {health.pct_ms(0.99):.1f} ms | polls/healthz {polls.rate / health.rate:.2f} | target >= "
         f"{TARGET_RATE:.0f}/s with p99 <= {TARGET_P99_MS:.0f} ms: {'met' if ok else 'NOT met'}"),
        (f"  ({clients} keep-alive clients, {seconds:.0f} s each after {WARMUP_S:.0f} s warm-up, "
         f"{api_workers} uvicorn process(es); API CPU {per_req(c1 - c0, polls):.2f} ms/poll, "
         f"{per_req(c2 - c1, health):.2f} ms/healthz; job seen {dict(polls.job_states)} while its worker "
         f"rendered {done['images_done']}/{done['images_total']} images)"),
    ]


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS:.0f} s per route")
    p.add_argument("--seconds", type=float, default=None, help=f"measured seconds per route (default {SECONDS:.0f})")
    p.add_argument("--clients", type=int, default=CLIENTS, help="concurrent keep-alive connections")
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--model-dir", type=Path, default=Path(".idforge/models"),
                   help="the worker's model directory (tiny presets are built there once)")
    args = p.parse_args(argv)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else SECONDS)
    if seconds <= 0 or args.clients < 1 or args.api_workers < 1:
        p.error(f"--seconds, --clients, --api-workers must be positive, got {seconds}, {args.clients}, "
                f"{args.api_workers}")
    lines = measure(seconds, args.clients, args.api_workers, args.model_dir.resolve())
    return emit(lines, f"{os.cpu_count()} cpus")


def run() -> str:
    """`python -m bench` entry: the quick run, as one summary line."""
    return quick_summary(main)


if __name__ == "__main__":
    main()
