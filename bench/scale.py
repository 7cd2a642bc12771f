"""Paper-scale jobs: the same job at growing sizes through the real service, and how its costs grow.

Everything is real and on this machine: a redis-server, SeaweedFS (`weed mini`, S3 with SigV4), one
Celery worker process (`idforge worker --concurrency 1`) and the API under uvicorn. The job is the
tiny latent path (`stylegan2-tiny` + `iresnet-tiny`, random identities, Dispersion's initial
latents without iterations, ImageFolder + WebDataset), 50 images an identity, at each size with
and without the quality report. For each run it prints:

- images/s end to end (submit -> succeeded) and the time in each stage (from the job's events);
- peak RSS of the worker's pool process (all tasks), of the pool process during finalize
  (`evaluating` + `packaging`), and of the API process; Redis `used_memory` after the job;
- `manifest.json` and `dataset/index.parquet` bytes;
- `GET /v1/jobs/{id}/artifacts` latency of the first and of the last page (walking every page);
- status-poll latency p99 while the job runs (a client polling `GET /v1/jobs/{id}` every 50 ms).

Then the growth ratios, largest size over smallest: seconds per image, peak RSS, manifest bytes,
last-page over first-page latency; and at each size run both ways, the report's cost (the job with
it over the job without it; target 1.25x). (Dispersion's 20 default iterations are a forward and backward
pass through the generator and the embedder each, about 30x the render itself on the tiny presets:
this bench measures the service around the models, so it leaves them out.) Targets (issue 15):
cost per image within 1.2x, peak memory within 1.2x, manifest size constant, last page within 2x
of the first.

    python -m bench.scale [--quick] [--sizes 10000,100000,500000] [--report both|on|off]

`--quick` stops at 100k images (10k and 100k). The full run (to 500k, both report settings) takes
about an hour on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from app.servers import RedisServer, free_port, stop_group
from bench import emit

SIZES = (10_000, 100_000, 500_000)  # images per job
QUICK_SIZES = (10_000, 100_000)
IMAGES_PER_IDENTITY = 50
KEY = "key-scale"
AUTH = {"Authorization": f"Bearer {KEY}"}
POLL_S = 0.05  # the status poller's period
SAMPLE_S = 0.25  # the RSS sampler's period
# manifest: constant but for its digits (counts, digests' neighbours, timings): within 1%
TARGETS = {"s_per_image": 1.2, "peak_rss": 1.2, "manifest": 1.01, "last_page": 2.0}
REPORT_TARGET = 1.25  # a job with the report over the same job without it


def job_spec(images: int, report: bool) -> dict[str, Any]:
    return {"identities": images // IMAGES_PER_IDENTITY, "images_per_identity": IMAGES_PER_IDENTITY,
            "seed": 7, "models": {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"},
            "variations": {"method": "dispersion", "iterations": 0},
            "output": {"formats": ["imagefolder", "webdataset"]}, "quality": {"report": report}}


# ---- processes ---------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Sampler:
    """Samples RSS of the worker's pool processes and of the API, and the job's stage, in a thread."""

    worker_pid: int
    api_pid: int
    stage: list[str] = field(default_factory=lambda: [""])  # set by the poller
    worker_peak_kb: int = 0
    finalize_peak_kb: int = 0
    api_peak_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            pool = _children(self.worker_pid)  # the prefork pool's processes
            rss = max([_rss_kb(p) for p in pool] or [0])
            self.worker_peak_kb = max(self.worker_peak_kb, rss)
            if self.stage[0] in ("evaluating", "packaging"):
                self.finalize_peak_kb = max(self.finalize_peak_kb, rss)
            self.api_peak_kb = max(self.api_peak_kb, _rss_kb(self.api_pid))

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def service(root: Path, model_dir: Path, *, keys: str = f"bench:{KEY}",
            env_extra: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Redis, SeaweedFS S3, one worker and the API; yields their handles. `keys`: IDFORGE_API_KEYS;
    `env_extra`: more IDFORGE_* settings for the worker and the API."""
    from tests.servers import S3_KEY, S3_SECRET, SeaweedS3

    redis = RedisServer(root / "redis", appendonly=True).start()
    s3 = SeaweedS3(root / "s3").start("idforge-scale")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDFORGE_REDIS_URL": redis.url,
           "IDFORGE_API_KEYS": keys, "IDFORGE_MODEL_DIR": str(model_dir),
           "IDFORGE_PUBLIC_URL": f"http://127.0.0.1:{port}", "IDFORGE_SECRET_KEY": "scale-bench",
           "IDFORGE_STORAGE": "s3", "IDFORGE_S3_ENDPOINT_URL": s3.endpoint, "IDFORGE_S3_BUCKET": "idforge-scale",
           "IDFORGE_S3_ACCESS_KEY_ID": S3_KEY, "IDFORGE_S3_SECRET_ACCESS_KEY": S3_SECRET,
           "IDFORGE_LOG_FORMAT": "json", "IDFORGE_RATE_LIMIT_PER_S": "1000000",
           "IDFORGE_RATE_LIMIT_BURST": "1000000", "IDFORGE_TASK_SOFT_TIME_LIMIT_S": "7200",
           "IDFORGE_TASK_TIME_LIMIT_S": "7500", "IDFORGE_MAX_IMAGES_PER_DAY": "0",
           "IDFORGE_MAX_CONCURRENT_JOBS": "0", **(env_extra or {})}
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as logs:
        worker_log = logs.enter_context((root / "worker.log").open("wb"))
        api_log = logs.enter_context((root / "api.log").open("wb"))
        procs.append(subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--concurrency", "1"],
                                      env=env, stdout=worker_log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log", "--log-level", "warning"],
            env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            if procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not come up: {(root / 'api.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield {"base": base, "worker_pid": procs[0].pid, "api_pid": procs[1].pid, "redis": redis,
               "s3": s3.client(), "bucket": "idforge-scale"}
    finally:
        for p in reversed(procs):
            stop_group(p, timeout=30)
        s3.stop()
        redis.stop()


# ---- one run -----------------------------------------------------------------------------------

@dataclass
class Run:
    images: int
    report: bool
    seconds: float
    stages: dict[str, float]
    worker_peak_mb: float
    finalize_peak_mb: float
    api_peak_mb: float
    redis_mb: float
    manifest_bytes: int
    index_bytes: int
    first_page_ms: float
    last_page_ms: float
    pages: int
    poll_p99_ms: float

    @property
    def s_per_image(self) -> float:
        return self.seconds / self.images


def _stage_times(events: list[dict[str, Any]], end: float) -> dict[str, float]:
    from datetime import datetime

    def t(at: str) -> float:
        return datetime.fromisoformat(at).timestamp()

    marks = [(e["stage"], t(e["at"])) for e in events if e.get("type") == "stage"]
    out: dict[str, float] = {}
    for (stage, t0), (_, t1) in zip(marks, [*marks[1:], ("end", end)], strict=True):
        out[stage] = out.get(stage, 0.0) + (t1 - t0)
    return out


def _events(c: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    out, after = [], "-"
    while True:
        page = c.get(f"/v1/jobs/{job_id}/events", params={"after": after}).json()
        out += page["events"]
        if not page.get("next") or not page["events"]:
            return out
        after = page["next"]


def run_one(svc: dict[str, Any], images: int, report: bool) -> Run:
    c = httpx.Client(base_url=svc["base"], headers=AUTH, timeout=120)
    sampler = Sampler(svc["worker_pid"], svc["api_pid"])
    polls: list[float] = []
    t0 = time.time()
    r = c.post("/v1/jobs", json=job_spec(images, report))
    if r.status_code != 202:
        raise RuntimeError(f"submit: {r.status_code} {r.text}")
    job_id = r.json()["id"]
    with sampler:
        while True:
            p0 = time.perf_counter()
            job = c.get(f"/v1/jobs/{job_id}").json()
            polls.append(time.perf_counter() - p0)
            sampler.stage[0] = job.get("stage") or ""
            if job["terminal"]:
                break
            time.sleep(POLL_S)
    seconds = time.time() - t0
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
    stages = _stage_times(_events(c, job_id), time.time())
    # /artifacts: every page, timing the first and the last
    latencies, params = [], {"limit": 1000}
    while True:
        a0 = time.perf_counter()
        page = c.get(f"/v1/jobs/{job_id}/artifacts", params=params)
        latencies.append(time.perf_counter() - a0)
        if page.status_code != 200:
            raise RuntimeError(f"artifacts: {page.status_code} {page.text[:500]}")
        body = page.json()
        if not body["has_more"]:
            break
        params = {"limit": 1000, "after": body["next"]}
    s3, bucket = svc["s3"], svc["bucket"]
    prefix = f"jobs/{job_id}/"
    size = (lambda key: int(s3.head_object(Bucket=bucket, Key=prefix + key)["ContentLength"]))
    import redis as redis_lib

    mem = redis_lib.Redis.from_url(svc["redis"].url).info("memory")["used_memory"]
    polls.sort()
    return Run(images, report, seconds, stages, sampler.worker_peak_kb / 1024, sampler.finalize_peak_kb / 1024,
               sampler.api_peak_kb / 1024, mem / 2**20, size("manifest.json"), size("dataset/index.parquet"),
               1e3 * latencies[0], 1e3 * latencies[-1], len(latencies),
               1e3 * polls[min(len(polls) - 1, int(0.99 * len(polls)))])


def lines_for(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in r.stages.items())
        out.append(
            f"scale {r.images:>7,} images report={'on ' if r.report else 'off'}: {r.images / r.seconds:6.0f} img/s "
            f"({1e3 * r.s_per_image:.2f} ms/img, {r.seconds:.0f} s; {stages}) | peak RSS worker "
            f"{r.worker_peak_mb:.0f} MB, finalize {r.finalize_peak_mb:.0f} MB, API {r.api_peak_mb:.0f} MB | redis "
            f"{r.redis_mb:.1f} MB | manifest {r.manifest_bytes:,} B, index {r.index_bytes:,} B | artifacts "
            f"first {r.first_page_ms:.0f} ms, last {r.last_page_ms:.0f} ms ({r.pages} pages) | poll p99 "
            f"{r.poll_p99_ms:.0f} ms")
    for report in (False, True):
        rs = sorted((r for r in runs if r.report == report), key=lambda r: r.images)
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        ratios = {"s_per_image": b.s_per_image / a.s_per_image,
                  "peak_rss": b.worker_peak_mb / a.worker_peak_mb,
                  "manifest": b.manifest_bytes / a.manifest_bytes,
                  "last_page": b.last_page_ms / b.first_page_ms}
        verdict = ", ".join(f"{k} {v:.2f}x ({'met' if v <= TARGETS[k] + 1e-9 else 'NOT met'} <= {TARGETS[k]}x)"
                            for k, v in ratios.items())
        out.append(f"growth {b.images:,} / {a.images:,} images, report={'on' if report else 'off'}: {verdict}; "
                   f"manifest {b.manifest_bytes - a.manifest_bytes:+,} B, "
                   f"finalize RSS {b.finalize_peak_mb / max(a.finalize_peak_mb, 1):.2f}x, "
                   f"API RSS {b.api_peak_mb / a.api_peak_mb:.2f}x")
    for n in sorted({r.images for r in runs}):
        pair = {r.report: r for r in runs if r.images == n}
        if len(pair) == 2:
            v = pair[True].seconds / pair[False].seconds
            out.append(f"report cost at {n:,} images: {v:.2f}x the job without it "
                       f"({'met' if v <= REPORT_TARGET else 'NOT met'} <= {REPORT_TARGET}x)")
    return out


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="stop at 100k images")
    p.add_argument("--sizes", default=None, help="comma-separated image counts (multiples of 50)")
    p.add_argument("--report", choices=("both", "on", "off"), default="both")
    p.add_argument("--model-dir", type=Path, default=Path(".idforge/models"),
                   help="the worker's model directory (tiny presets are copied there once)")
    args = p.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    if any(s <= 0 or s % IMAGES_PER_IDENTITY for s in sizes):
        p.error(f"--sizes: positive multiples of {IMAGES_PER_IDENTITY}, got {sizes}")
    reports = {"both": (False, True), "on": (True,), "off": (False,)}[args.report]
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers and the worker are stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="idforge-scale-") as tmp, \
            service(Path(tmp), args.model_dir.resolve()) as svc:
        for report in reports:
            for n in sizes:
                runs.append(run_one(svc, n, report))
                print(lines_for([runs[-1]])[0], flush=True)
    return emit(lines_for(runs)[len(runs):] or ["(one size: no growth ratios)"], f"{os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
