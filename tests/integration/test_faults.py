"""Crashes and faults, against the whole service: a real redis-server (AOF, fsync always), SeaweedFS
S3 (behind a fault-injecting proxy where the test needs one), real Celery worker processes and the
API under uvicorn.

- kill -9 of the pool process while it samples identities, renders a shard or finalises: the job
  succeeds with every (identity, sample) exactly once, and resumes instead of starting over;
- a task that kills its worker every time fails the job after max_task_attempts, with a reason;
- Redis killed and restarted mid-job: no record is lost and the job completes;
- S3 answering 503 SlowDown, resetting connections and answering slowly: uploads are retried and
  every object matches the manifest's sha256;
- a visibility timeout shorter than a task: the redelivered task never runs in parallel with the
  first delivery, and a crash still gets it redelivered and completed.

The long randomised version runs under `make soak` (`-m soak`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import Client
from app.errors import JobStoreUnavailable, StorageError, StorageKeyMissing
from app.jobstore import JobStore
from app.scheduler import Scheduler
from app.servers import RedisServer, free_port
from app.settings import Settings
from app.storage import S3Storage
from tests.conftest import TEAM_KEYS
from tests.faultproxy import FaultProxy
from tests.servers import S3_KEY, S3_SECRET, Proc, SeaweedS3, wait_http
from workers.tasking import TaskLedger

pytestmark = pytest.mark.integration

BUCKET = "idforge-faults"
LEASE_S = 3  # short task leases: a killed worker's task is picked up again within seconds
LATENT = {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"}


# ---- the stack ---------------------------------------------------------------------------------

class Stack:
    """One service: Redis with AOF (fsync always), SeaweedFS (optionally behind a FaultProxy), Celery
    workers and the API. `env` overrides IDFORGE_* settings for the workers and the API."""

    def __init__(self, root: Path, model_dir: Path, *, env: dict[str, str] | None = None,
                 proxy: bool = False, workers: int = 1) -> None:
        self.root, self.model_dir = root, model_dir
        self.redis = RedisServer(root / "redis").start()
        self.redis_client().config_set("appendfsync", "always")  # nothing acknowledged is lost
        self.s3 = SeaweedS3(root / "s3").start(bucket=BUCKET)
        self.proxy = FaultProxy(self.s3.endpoint, seed=7).start() if proxy else None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "IDFORGE_REDIS_URL": self.redis.url,
            "IDFORGE_API_KEYS": TEAM_KEYS,
            "IDFORGE_SECRET_KEY": "faults-secret",
            "IDFORGE_STORAGE": "s3",
            "IDFORGE_S3_ENDPOINT_URL": self.proxy.endpoint if self.proxy else self.s3.endpoint,
            # Download URLs are signed for the S3 server itself: clients bypass the proxy.
            "IDFORGE_S3_PUBLIC_ENDPOINT_URL": self.s3.endpoint,
            "IDFORGE_S3_BUCKET": BUCKET,
            "IDFORGE_S3_ACCESS_KEY_ID": S3_KEY,
            "IDFORGE_S3_SECRET_ACCESS_KEY": S3_SECRET,
            "IDFORGE_PUBLIC_URL": self.url,
            "IDFORGE_MODEL_DIR": str(model_dir),
            "IDFORGE_SHARD_IDENTITIES": "3",
            "IDFORGE_CHECKPOINT_STEPS": "5",
            "IDFORGE_TASK_LEASE_S": str(LEASE_S),
            **(env or {}),
        }
        self.workers: list[Proc] = []
        self.api: Proc | None = None
        self.store = JobStore.from_url(self.redis.url)
        self.alpha = Client(self.url, "key-alpha")
        try:
            for _ in range(workers):
                self.add_worker()
            self.api = Proc(["serve", "--port", str(self.port)], self.env, root / "api.log")
            wait_http(f"{self.url}/healthz", proc=self.api)
            for w in self.workers:
                self.wait_pool(w)
        except BaseException:
            self.stop()
            raise

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis.url, decode_responses=True)

    def add_worker(self) -> Proc:
        n = len(self.workers)
        w = Proc(["worker", "--queues", "gpu,cpu", "--concurrency", "1", "--name", f"w{n}@%h"],
                 self.env, self.root / f"worker{n}.log")
        self.workers.append(w)
        return w

    def wait_pool(self, worker: Proc, timeout: float = 120) -> int:
        """The pid of the worker's pool process, once it is up."""
        children: list[int] = wait_for(lambda: _pool_children(worker.proc.pid), timeout,
                                       f"the pool process of {worker.log.name}")
        return children[0]

    def restart_redis(self, sig: int = signal.SIGKILL, down_s: float = 0.0) -> float:
        """Stop redis-server with `sig`, leave it down `down_s` seconds, and start it again on the
        same port and data directory; returns the seconds it was away."""
        assert self.redis.proc is not None
        t0 = time.monotonic()
        os.kill(self.redis.proc.pid, sig)
        self.redis.proc.wait(30)
        self.redis.proc = None
        time.sleep(down_s)
        self.redis.start()
        self.redis_client().config_set("appendfsync", "always")
        return time.monotonic() - t0

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self.store.events(job_id, limit=100_000)

    def record(self, job_id: str) -> dict[str, Any] | None:
        """The job record straight from Redis (quicker to poll than the API), or None while Redis is
        away."""
        try:
            return self.store.get(job_id)
        except JobStoreUnavailable:
            return None

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The job over the API, or None while the API cannot answer (Redis restarting)."""
        try:
            r = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers={"Authorization": "Bearer key-alpha"},
                          timeout=10)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def wait_job(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        def terminal() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job and job["status"] in ("succeeded", "failed", "canceled") else None
        job: dict[str, Any] = wait_for(terminal, timeout, f"job {job_id} to end", logs=self.logs)
        return job

    def logs(self) -> str:
        out = []
        for p in [*self.workers, *([self.api] if self.api else [])]:
            out.append(f"--- {p.log.name}\n{p.log.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Stop everything, each part even if another fails to stop."""
        parts: list[Callable[[], None]] = [self.proxy.stop] if self.proxy else []
        parts += [p.stop for p in [*([self.api] if self.api else []), *self.workers]]
        parts += [self.s3.stop, self.redis.stop]
        errors = []
        for stop in parts:
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - reported below, after the rest are stopped
                errors.append(e)
        if errors:
            raise errors[0]


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
             logs: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}" + (f"\n{logs()}" if logs else ""))
        time.sleep(interval)


def _pool_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def kill_pool(worker: Proc) -> int:
    """kill -9 the worker's pool process (as the kernel's OOM killer would); returns its pid."""
    children = _pool_children(worker.proc.pid)
    assert len(children) == 1, children
    os.kill(children[0], signal.SIGKILL)
    return children[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("faults"), model_dir)
    try:
        yield s
    finally:
        s.stop()


# ---- what a finished job must hold -----------------------------------------------------------

def s3_client(stack: Stack) -> Any:
    """boto3 straight to the S3 server (never through the proxy)."""
    return stack.s3.client()


def verify_dataset(stack: Stack, job_id: str, identities: int, per_identity: int) -> dict[str, Any]:
    """Every (identity, sample) exactly once in the manifest, the Parquet index and the bucket, and
    every object's bytes match the manifest's sha256 (the tars: their table's). Returns the manifest,
    with `shard_objects` added: the paths the shard-objects table lists."""
    import pyarrow.parquet as pq

    s3 = s3_client(stack)
    root = f"jobs/{job_id}"

    def get(rel: str) -> bytes:
        data: bytes = s3.get_object(Bucket=BUCKET, Key=f"{root}/{rel}")["Body"].read()
        return data

    manifest: dict[str, Any] = json.loads(get("manifest.json"))
    index_bytes = get("dataset/index.parquet")  # the per-image listing, pinned by the manifest
    assert hashlib.sha256(index_bytes).hexdigest() == manifest["index"]["sha256"]
    index = pq.read_table(io.BytesIO(index_bytes)).to_pylist()
    files = [r for r in index if not r["filtered"]]
    grid = {(i, s) for i in range(identities) for s in range(per_identity)}
    assert manifest["counts"]["images"] == identities * per_identity == len(files)
    pairs = [(f["identity"], f["sample"]) for f in files]
    assert len(pairs) == len(set(pairs)) and set(pairs) == grid  # no duplicate, no gap
    for f in files:
        assert hashlib.sha256(get(f["path"])).hexdigest() == f["sha256"], f["path"]
    for rel, meta in manifest["outputs"].items():
        data = get(rel)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (meta["size"], meta["sha256"]), rel
    shard_objects = [json.loads(line) for line in get("dataset/objects.jsonl").splitlines()]
    assert len(shard_objects) == manifest["outputs"]["dataset/objects.jsonl"]["rows"]
    for obj in shard_objects:  # the tars, pinned through the table the manifest pins
        data = get(obj["path"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (obj["size"], obj["sha256"]), obj["path"]
    manifest["shard_objects"] = [o["path"] for o in shard_objects]
    listed = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{root}/dataset/imagefolder/") for o in page.get("Contents", [])]
    assert len(listed) == identities * per_identity  # no stray image from an interrupted run
    return manifest


def starts(events: list[dict[str, Any]]) -> Counter[str]:
    """How many times each task started its work."""
    return Counter(e["task"] for e in events if e["type"] == "task_started")


def assert_never_parallel(events: list[dict[str, Any]], killed: set[str]) -> None:
    """No task started while an earlier delivery of it was still running: each start follows the
    previous one's end, or the previous one's pool process was killed (`killed`: pids), or comes from
    that same process (which runs one task at a time; its end event is lost when Redis was away)."""
    running: dict[str, str] = {}
    for e in events:
        if e["type"] == "task_started":
            prev = running.get(e["task"])
            assert prev in (None, e["worker"]) or prev.rpartition(":")[2] in killed, \
                f"{e['task']} started on {e['worker']} while {prev} still ran it"
            running[e["task"]] = e["worker"]
        elif e["type"] == "task_ended" and running.get(e["task"]) == e["worker"]:
            del running[e["task"]]


def submit(stack: Stack, spec: dict[str, Any]) -> str:
    job_id: str = stack.alpha.submit(spec)["id"]
    return job_id


def wait_stage(stack: Stack, job_id: str, ready: Callable[[dict[str, Any]], bool], what: str,
               timeout: float = 180) -> dict[str, Any]:
    """Poll the job record until `ready(record)`; the job must not end first."""
    def check() -> dict[str, Any] | None:
        job = stack.record(job_id)
        if job is None:
            return None
        assert job["status"] in ("queued", "running"), (job, stack.logs())
        return job if ready(job) else None
    job: dict[str, Any] = wait_for(check, timeout, what, interval=0.02, logs=stack.logs)
    return job


# ---- kill -9 during each stage -------------------------------------------------------------------

def test_kill_while_sampling_identities_resumes_from_the_checkpoint(stack: Stack) -> None:
    t0 = time.monotonic()
    spec = {"identities": 6, "images_per_identity": 2, "seed": 31, "models": LATENT,
            "sampler": {"method": "langevin", "iterations": 60},
            "variations": {"method": "dispersion", "iterations": 2}}
    job_id = submit(stack, spec)
    wait_stage(stack, job_id, lambda j: j["progress"]["stage"]["unit"] == "Langevin steps"
               and j["progress"]["stage"]["done"] >= 12, "Langevin past its second checkpoint")
    killed = kill_pool(stack.workers[0])
    job = stack.wait_job(job_id)
    assert job["status"] == "succeeded", (job, stack.logs())
    events = stack.events(job_id)
    resumed = [int(e["step"]) for e in events if e["type"] == "resumed"]
    saved = [int(e["step"]) for e in events if e["type"] == "checkpoint"]
    assert len(resumed) == 1 and resumed[0] >= 10 and resumed[0] in saved, events
    assert starts(events)["sample_identities"] == 2  # killed once, resumed once
    assert all(n == 1 for k, n in starts(events).items() if k != "sample_identities")
    assert_never_parallel(events, {str(killed)})
    verify_dataset(stack, job_id, 6, 2)
    print(f"\nsampling kill: 1 kill, resumed at step {resumed[0]}/60, {time.monotonic() - t0:.1f} s")


def test_kill_while_rendering_a_shard_reruns_only_that_shard(stack: Stack) -> None:
    t0 = time.monotonic()
    spec = {"identities": 12, "images_per_identity": 3, "seed": 32,
            "render": {"steps": 6, "batch_size": 1}}
    job_id = submit(stack, spec)

    def mid_shard(job: dict[str, Any]) -> bool:  # shard 0 done (9 images), shard 1 part-way
        done = job["progress"]["images_done"]
        return 9 < done < 18 and starts(stack.events(job_id))["render_shard:1"] == 1
    wait_stage(stack, job_id, mid_shard, "shard 1 part-way")
    killed = kill_pool(stack.workers[0])
    job = stack.wait_job(job_id)
    assert job["status"] == "succeeded", (job, stack.logs())
    events = stack.events(job_id)
    counts = starts(events)
    rerun = [k for k, n in counts.items() if n == 2]
    assert len(rerun) == 1 and rerun[0].startswith("render_shard:"), counts  # the killed shard only
    assert counts["sample_identities"] == 1 and counts["finalize"] == 1
    assert sum(1 for k in counts if k.startswith("render_shard:")) == 4
    assert not [e for e in events if e["type"] == "resumed"]  # identities were not sampled again
    assert_never_parallel(events, {str(killed)})
    verify_dataset(stack, job_id, 12, 3)
    print(f"\nrender kill: 1 kill ({rerun[0]} ran twice, 3 shards once), {time.monotonic() - t0:.1f} s")


def test_kill_while_finalising_finishes_without_rendering_again(stack: Stack) -> None:
    t0 = time.monotonic()
    spec = {"identities": 12, "images_per_identity": 6, "seed": 33, "render": {"steps": 1, "batch_size": 18},
            "output": {"formats": ["imagefolder", "webdataset", "recordio"]}}
    job_id = submit(stack, spec)
    wait_stage(stack, job_id, lambda j: j.get("stage") in ("evaluating", "packaging"), "finalize",
               timeout=240)
    killed = kill_pool(stack.workers[0])
    job = stack.wait_job(job_id)
    assert job["status"] == "succeeded", (job, stack.logs())
    events = stack.events(job_id)
    counts = starts(events)
    assert counts["finalize"] == 2, counts  # killed inside finalize, then ran again
    assert all(n == 1 for k, n in counts.items() if k != "finalize"), counts  # nothing rendered again
    assert_never_parallel(events, {str(killed)})
    manifest = verify_dataset(stack, job_id, 12, 6)
    assert "dataset/recordio/train.rec" in manifest["outputs"]
    assert "dataset/webdataset/000003.tar" in manifest["shard_objects"]
    print(f"\nfinalize kill: 1 kill, {time.monotonic() - t0:.1f} s")


def test_a_task_that_kills_its_worker_every_time_fails_with_a_reason(stack: Stack) -> None:
    """The pool process dies whenever it starts render_shard:1 (as if that shard ran it out of
    memory): the job fails after max_task_attempts (3) starts, instead of looping."""
    t0 = time.monotonic()
    job_id = submit(stack, {"identities": 9, "images_per_identity": 2, "seed": 34,
                            "render": {"steps": 4, "batch_size": 1}})
    killed: list[str] = []
    deadline = time.monotonic() + 240
    while True:
        for e in stack.events(job_id):
            if e["type"] == "task_started" and e["task"] == "render_shard:1" and e["worker"] not in killed:
                os.kill(int(e["worker"].rpartition(":")[2]), signal.SIGKILL)
                killed.append(e["worker"])
        job = stack.job(job_id)
        if job and job["status"] in ("succeeded", "failed", "canceled"):
            break
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.02)
    assert job["status"] == "failed", job
    assert len(killed) == 3  # max_task_attempts
    err = job["error"]
    assert err["code"] == "worker_lost" and err["stage"] == "rendering"
    assert "render_shard:1" in err["message"] and "max_task_attempts=3" in err["message"]
    assert "started 3 times" in err["message"]
    assert TaskLedger(stack.store.r).attempts(job_id)["render_shard:1"] == 4  # the fourth delivery failed the job
    print(f"\nkilled on every start: {len(killed)} kills, then failed ({time.monotonic() - t0:.1f} s)")
    wait_for(lambda: _pool_children(stack.workers[0].proc.pid), 60, "a fresh pool process")


# ---- Redis restarted mid-job ---------------------------------------------------------------------

def test_redis_killed_and_restarted_mid_job_loses_nothing(tmp_path: Path, model_dir: Path) -> None:
    t0 = time.monotonic()
    s = Stack(tmp_path, model_dir)
    try:
        spec = {"identities": 12, "images_per_identity": 2, "seed": 35, "render": {"steps": 8, "batch_size": 1},
                "metadata": {"ci_run": "redis-restart"}}
        job_id = submit(s, spec)
        before = wait_stage(s, job_id, lambda j: j.get("stage") == "rendering"
                            and j["progress"]["images_done"] >= 4, "rendering under way")
        events_before = len(s.events(job_id))
        held = Scheduler(s.store.r).snapshot().jobs[job_id].held
        assert held >= 1  # shards wait in the scheduler (one worker slot): they must survive the restart
        away = [s.restart_redis(signal.SIGKILL, down_s=3)]
        job = wait_stage(s, job_id, lambda j: j["progress"]["images_done"] > before["progress"]["images_done"],
                         "progress after the first restart", timeout=120)
        away.append(s.restart_redis(signal.SIGTERM, down_s=1))  # and a clean shutdown, later on
        job = s.wait_job(job_id)
        assert job["status"] == "succeeded", (job, s.logs())
        assert job["spec"]["metadata"] == {"ci_run": "redis-restart"} and job["created_at"] == before["created_at"]
        events = s.events(job_id)
        assert len(events) > events_before
        assert [e["to"] for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]
        listed = httpx.get(f"{s.url}/v1/jobs", headers={"Authorization": "Bearer key-alpha"}).json()["jobs"]
        assert [j["id"] for j in listed] == [job_id]
        verify_dataset(s, job_id, 12, 2)
        # The worker and the API reconnected: a second job runs through the restarted Redis.
        again = s.wait_job(submit(s, {"identities": 2, "images_per_identity": 1, "render": {"steps": 1}}))
        assert again["status"] == "succeeded", again
        print(f"\nredis restarts: 2 (away {away[0]:.2f} s and {away[1]:.2f} s; {held} shards held at the first), "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        s.stop()


# ---- S3 faults ------------------------------------------------------------------------------------

def test_s3_faults_are_retried_and_every_object_is_intact(tmp_path: Path, model_dir: Path) -> None:
    t0 = time.monotonic()
    s = Stack(tmp_path, model_dir, proxy=True)
    proxy = s.proxy
    assert proxy is not None
    try:
        # Spread over the job's ~150 requests (seeded): some requests meet several faults in a row.
        caps = {"slowdown": 10, "reset_before": 4, "reset_after": 4, "reset_mid_body": 4, "delay": 4}
        proxy.inject("slowdown", p=0.2, times=caps["slowdown"], methods=["PUT"])
        proxy.inject("reset_before", p=0.1, times=caps["reset_before"])
        proxy.inject("reset_after", p=0.1, times=caps["reset_after"], methods=["PUT"])
        proxy.inject("reset_mid_body", p=0.2, times=caps["reset_mid_body"], methods=["GET"])
        proxy.inject("delay", p=0.1, times=caps["delay"], delay_s=1.0)
        spec = {"identities": 9, "images_per_identity": 3, "seed": 36, "render": {"steps": 2, "batch_size": 4},
                "output": {"formats": ["imagefolder", "webdataset", "recordio"]}}
        job = s.wait_job(submit(s, spec), timeout=400)
        proxy.clear()
        assert job["status"] == "succeeded", (job, s.logs())
        faults = {k: v for k, v in proxy.stats.items() if k not in ("requests", "forwarded")}
        assert set(faults) == set(caps) and sum(faults.values()) >= 15, faults
        manifest = verify_dataset(s, job["id"], 9, 3)
        assert len(manifest["outputs"]) >= 7 and len(manifest["shard_objects"]) == 3
        # What a client downloads through the presigned URLs matches too (Client.download checks).
        assert s.alpha.download(job["id"], tmp_path / "download") == 27
        print(f"\nS3 faults: {sum(faults.values())} injected {dict(faults)} over {proxy.stats['requests']} "
              f"requests, {time.monotonic() - t0:.1f} s")
    finally:
        s.stop()


def test_multipart_uploads_and_streamed_reads_survive_resets(tmp_path: Path) -> None:
    """Objects of MULTIPART_PART bytes and up go as multipart uploads: parts and the completion are
    retried through 503s and resets; a GET whose body breaks off is sent again."""
    from app.storage import MULTIPART_PART

    s3 = SeaweedS3(tmp_path / "s3").start(bucket=BUCKET)
    proxy = FaultProxy(s3.endpoint, seed=3).start()
    try:
        storage = S3Storage.from_settings(Settings(
            storage="s3", s3_bucket=BUCKET, s3_endpoint_url=proxy.endpoint, s3_access_key_id=S3_KEY,
            s3_secret_access_key=S3_SECRET))
        data = random.Random(5).randbytes(2 * MULTIPART_PART + 12345)
        (tmp_path / "big.bin").write_bytes(data)
        proxy.inject("slowdown", times=2, path_contains="partNumber=2")
        proxy.inject("reset_after", times=1, path_contains="partNumber=3")
        proxy.inject("reset_before", times=1, path_contains="partNumber=1")
        proxy.inject("reset_after", times=1, methods=["POST"], path_contains="uploadId=")  # the completion
        storage.put_file("big/object.bin", tmp_path / "big.bin")
        assert proxy.injected() == 5 and sum(1 for m, t, f in proxy.log if "partNumber" in t) == 3 + 4
        proxy.clear()
        proxy.inject("reset_mid_body", times=2, methods=["GET"])
        assert hashlib.sha256(storage.get_bytes("big/object.bin")).digest() == hashlib.sha256(data).digest()
        assert proxy.stats["reset_mid_body"] == 2
        proxy.clear()
        proxy.inject("reset_mid_body", methods=["GET"])  # every time: a clear error, not a hang
        with pytest.raises(StorageError, match="broke off 4 times"):
            storage.get_bytes("big/object.bin")
        # A 404 whose error body breaks off is a transient StorageError (the task is retried), not
        # urllib3's ProtocolError (which failed a job in the soak run) nor a missing key.
        with pytest.raises(StorageError) as err:
            storage.get_bytes("big/missing.bin")
        assert not isinstance(err.value, StorageKeyMissing) and "Connection broken" in str(err.value)
        proxy.clear()
        with pytest.raises(StorageKeyMissing):
            storage.get_bytes("big/missing.bin")
    finally:
        proxy.stop()
        s3.stop()


# ---- visibility timeout shorter than a task -------------------------------------------------------

def test_a_redelivered_long_task_never_runs_in_parallel(tmp_path: Path, model_dir: Path) -> None:
    """visibility_timeout_s=10, a sampling task of ~45 s and two workers: Redis redelivers the
    unacknowledged task to the idle worker, which finds the lease and waits instead of running it.
    Then the pool process running it is killed: a waiting delivery takes it over, it resumes from
    its checkpoint and the job completes."""
    t0 = time.monotonic()
    s = Stack(tmp_path, model_dir, workers=2, env={"IDFORGE_VISIBILITY_TIMEOUT_S": "10",
                                                   "IDFORGE_WEBHOOK_BACKOFF_S": "1",
                                                   "IDFORGE_WEBHOOK_BACKOFF_MAX_S": "5"})
    try:
        # Calibrate: the task must outlast the visibility timeout on this machine, whatever its speed.
        probe = {"identities": 4, "images_per_identity": 1, "seed": 1, "models": LATENT,
                 "sampler": {"method": "langevin", "iterations": 20}}
        probe_id = submit(s, probe)
        assert s.wait_job(probe_id)["status"] == "succeeded"
        step_s = next(float(e["seconds"]) for e in s.events(probe_id) if e["type"] == "identities_sampled") / 20
        iterations = min(10_000, max(100, int(45 / step_s)))
        spec = {**probe, "seed": 37, "sampler": {"method": "langevin", "iterations": iterations}}
        job_id = submit(s, spec)
        first = wait_for(lambda: [e for e in s.events(job_id) if e["type"] == "task_started"], 120,
                         "sampling to start")[0]
        # Past the visibility timeout and a restore sweep, the message went back to the queue; the
        # other worker took it, found the lease, and deferred it (again and again).
        wait_for(lambda: _count(s, f"job {job_id} sample_identities: running elsewhere") >= 2, 90,
                 "a redelivery to find the lease", logs=s.logs)
        job = s.record(job_id)
        assert job is not None and job["stage"] == "sampling_identities", job
        assert job["progress"]["stage"]["done"] < iterations  # the first delivery still runs
        assert starts(s.events(job_id))["sample_identities"] == 1
        deferrals = _count(s, f"job {job_id} sample_identities: running elsewhere")
        # Kill the process running it: its lease lapses and a waiting delivery takes the task over.
        runner = next(w for w in s.workers
                      if [str(p) for p in _pool_children(w.proc.pid)] == [first["worker"].rpartition(":")[2]])
        killed = kill_pool(runner)
        job = s.wait_job(job_id, timeout=600)
        assert job["status"] == "succeeded", (job, s.logs())
        events = s.events(job_id)
        assert starts(events)["sample_identities"] == 2
        assert_never_parallel(events, {str(killed)})
        resumed = [int(e["step"]) for e in events if e["type"] == "resumed"]
        assert len(resumed) == 1 and resumed[0] > 0
        verify_dataset(s, job_id, 4, 1)
        total = _count(s, f"job {job_id} sample_identities: running elsewhere")
        print(f"\nshort visibility: {iterations} steps of {step_s * 1000:.0f} ms; {deferrals} deferred "
              f"deliveries before the kill, {total} in all; 1 kill, resumed at step {resumed[0]}; "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        s.stop()


def _count(s: Stack, text: str) -> int:
    return sum(w.log.read_text(errors="replace").count(text) for w in s.workers)


# ---- time limits ------------------------------------------------------------------------------------

def test_a_task_past_its_hard_time_limit_is_requeued_then_fails_with_a_reason(
        tmp_path: Path, model_dir: Path) -> None:
    """IDFORGE_TASK_TIME_LIMIT_S=3: Celery kills the pool process at 3 s. The task is requeued (not
    silently acknowledged), resumes from its checkpoint each time, and once max_task_attempts
    deliveries have been killed the job fails with a reason naming the limit."""
    t0 = time.monotonic()
    # A checkpoint every step: each 3 s attempt must save progress however slow this machine is
    # (every 5 steps, attempts on a loaded 2-core machine, or on torch's scalar path, saved none).
    s = Stack(tmp_path, model_dir, env={"IDFORGE_TASK_TIME_LIMIT_S": "3", "IDFORGE_CHECKPOINT_STEPS": "1"})
    try:
        job_id = submit(s, {"identities": 4, "images_per_identity": 1, "seed": 38, "models": LATENT,
                            "sampler": {"method": "langevin", "iterations": 10_000}})
        job = s.wait_job(job_id, timeout=240)
        assert job["status"] == "failed", job
        err = job["error"]
        assert err["code"] == "worker_lost" and err["stage"] == "sampling_identities"
        assert "IDFORGE_TASK_TIME_LIMIT_S=3" in err["message"] and "started 3 times" in err["message"]
        events = s.events(job_id)
        assert starts(events)["sample_identities"] == 3
        resumed = [int(e["step"]) for e in events if e["type"] == "resumed"]
        assert len(resumed) == 2 and 0 < resumed[0] < resumed[1], resumed  # progress kept across kills
        log = "".join(w.log.read_text(errors="replace") for w in s.workers)
        assert log.count("Hard time limit (3") == 3
        print(f"\nhard time limit: 3 timeouts, resumed at steps {resumed}, then failed; "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        s.stop()


def test_time_limit_settings_reach_the_celery_config() -> None:
    from app.queue import celery_config

    conf = celery_config(Settings(task_time_limit_s=600, task_soft_time_limit_s=540, visibility_timeout_s=30,
                                  webhook_backoff_max_s=20))
    assert (conf["task_time_limit"], conf["task_soft_time_limit"]) == (600, 540)
    assert conf["task_acks_on_timeout"] is False and conf["task_reject_on_worker_lost"] is True
    assert conf["broker_transport_options"]["visibility_timeout"] == 30
    assert conf["broker_transport_options"]["unacked_restore_interval"] == 6
    off = celery_config(Settings(task_time_limit_s="", task_soft_time_limit_s="none"))
    assert off["task_time_limit"] is None and off["task_soft_time_limit"] is None
    with pytest.raises(ValueError, match="IDFORGE_TASK_SOFT_TIME_LIMIT_S .60. must be below"):
        Settings(task_time_limit_s=60, task_soft_time_limit_s=60)
    with pytest.raises(ValueError, match="task_lease_s"):
        Settings(task_lease_s=1)


# ---- the lease, in process ------------------------------------------------------------------------

class _Task:
    """What tasking.run uses of a bound Celery task: its name, its request, apply_async."""

    name = "idforge.render_shard"

    def __init__(self) -> None:
        self.request = type("Request", (), {"retries": 0})()
        self.sent: list[tuple[list[Any], int]] = []

    def apply_async(self, *, args: list[Any], countdown: int, retries: int) -> None:
        self.sent.append((args, countdown))


@pytest.fixture
def runtime(store: JobStore, tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from app.queue import TaskQueue
    from app.storage import LocalStorage
    from models.registry import Registry
    from workers import runtime as worker_runtime
    from workers.runtime import ModelCache, Runtime

    url = store.r.connection_pool.connection_kwargs
    s = Settings(redis_url=f"redis://127.0.0.1:{url['port']}/0", storage_dir=tmp_path / "storage",
                 model_dir=model_dir, task_lease_s=30, task_soft_time_limit_s=7)
    rt = Runtime(settings=s, store=store, storage=LocalStorage(s.storage_dir),
                 queue=TaskQueue.from_settings(s), models=ModelCache(Registry(model_dir), "cpu"))
    monkeypatch.setattr(worker_runtime, "_runtime", rt)
    return rt


def _job(store: JobStore) -> str:
    made = store.create("alpha", {"identities": 1}, "h", identities=1, images=1)
    store.transition(made.job_id, "running")
    return made.job_id


def test_lease_is_exclusive_renewable_and_only_its_holder_releases_it(store: JobStore) -> None:
    from workers.tasking import TaskLedger

    ledger = TaskLedger(store.r)
    assert ledger.acquire_lease("j1", "render_shard:0", "a", 0.5)
    assert not ledger.acquire_lease("j1", "render_shard:0", "b", 5)
    assert not ledger.renew_lease("j1", "render_shard:0", "b", 5) and not ledger.release_lease("j1", "render_shard:0", "b")
    assert ledger.acquire_lease("j1", "render_shard:1", "b", 5)  # another task of the job: its own lease
    assert ledger.renew_lease("j1", "render_shard:0", "a", 0.3)
    time.sleep(0.4)  # lapsed: a crashed holder's lease frees itself
    assert ledger.lease_holder("j1", "render_shard:0") is None
    assert ledger.renew_lease("j1", "render_shard:0", "a", 5)  # nobody took it: the holder takes it back
    assert ledger.release_lease("j1", "render_shard:0", "a") and ledger.lease_holder("j1", "render_shard:0") is None


def test_the_heartbeat_keeps_a_running_task_s_lease(store: JobStore) -> None:
    from workers.tasking import TaskLease, TaskLedger

    ledger = TaskLedger(store.r)
    lease = TaskLease(ledger, "j2", "finalize", ttl_s=0.6)
    assert lease.acquire()
    time.sleep(2.0)  # > 3 leases long: renewed every 0.2 s
    assert ledger.lease_holder("j2", "finalize") == lease.holder
    assert not TaskLease(ledger, "j2", "finalize", ttl_s=0.6).acquire()
    lease.release()
    assert ledger.lease_holder("j2", "finalize") is None and not lease.lost


def test_a_delivery_that_finds_the_lease_waits_and_a_done_task_never_runs_again(runtime: Any) -> None:
    from workers import tasking

    store: JobStore = runtime.store
    ledger = tasking.TaskLedger(store.r)
    job_id, task, ran = _job(store), _Task(), []
    assert ledger.acquire_lease(job_id, "render_shard:0", "elsewhere:1:x", 30)
    tasking.run(task, job_id, "render_shard:0", lambda rt, j, shard: ran.append(shard), 0)
    assert ran == [] and task.sent == [([job_id, 0], 15)]  # sent again for later
    assert ledger.attempts(job_id) == {}  # a deferral is not an attempt
    ledger.release_lease(job_id, "render_shard:0", "elsewhere:1:x")
    for _ in range(3):  # the first runs it; late redeliveries find it done
        tasking.run(task, job_id, "render_shard:0", lambda rt, j, shard: ran.append(shard), 0)
    assert ran == [0] and ledger.attempts(job_id) == {"render_shard:0": 1} and len(task.sent) == 1
    assert ledger.lease_holder(job_id, "render_shard:0") is None
    kinds = [(e["type"], e.get("task"), e.get("outcome")) for e in store.events(job_id) if e["type"].startswith("task_")]
    assert kinds == [("task_started", "render_shard:0", None), ("task_ended", "render_shard:0", "returned")]


def test_the_soft_time_limit_fails_the_job_with_a_reason(runtime: Any) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from workers import tasking

    def slow(rt: Any, job_id: str) -> None:
        raise SoftTimeLimitExceeded()  # what Celery raises inside the task at the soft limit

    job_id = _job(runtime.store)
    tasking.run(_Task(), job_id, "sample_identities", slow)
    job = runtime.store.get(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "task_timeout"
    assert "soft time limit of 7 s (IDFORGE_TASK_SOFT_TIME_LIMIT_S)" in job["error"]["message"]
    assert tasking.TaskLedger(runtime.store.r).lease_holder(job_id, "sample_identities") is None


# ---- soak: `make soak` ------------------------------------------------------------------------------

SOAK_SECONDS = float(os.environ.get("IDFORGE_SOAK_SECONDS", "300"))


def _soak_spec(rng: random.Random, k: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"identities": rng.randint(4, 12), "images_per_identity": rng.randint(1, 3),
                            "seed": 1000 + k, "render": {"steps": rng.choice([1, 2, 4]), "batch_size": 4},
                            "output": {"formats": rng.choice([["imagefolder"], ["imagefolder", "webdataset"],
                                                              ["imagefolder", "webdataset", "recordio"]])}}
    kind = rng.choice(["random", "hyperface", "langevin"])
    if kind == "hyperface":
        spec["sampler"] = {"method": "hyperface", "iterations": rng.randint(50, 300), "gallery_size": 16}
    elif kind == "langevin":
        spec |= {"models": LATENT, "sampler": {"method": "langevin", "iterations": rng.randint(20, 60)},
                 "variations": {"method": "dispersion", "iterations": 2}}
    return spec


def _submit_retrying(s: Stack, spec: dict[str, Any], key: str) -> str:
    """Submit as a CI system would: retry on any failure with the same Idempotency-Key."""
    from app.client import ApiError

    def attempt() -> str | None:
        try:
            job_id: str = s.alpha.submit(spec, idempotency_key=key)["id"]
            return job_id
        except (ApiError, httpx.HTTPError):
            return None
    job_id: str = wait_for(attempt, 120, f"submitting {key}", interval=0.5)
    return job_id


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 1200)
def test_soak_random_kills_redis_restarts_and_s3_faults(tmp_path: Path, model_dir: Path) -> None:
    """For IDFORGE_SOAK_SECONDS (default 300), two workers run a stream of random jobs (random,
    HyperFace and Langevin identities, 1-3 images each, assorted formats) while, every 1-6 s, a pool
    process is killed -9 at a random moment (or, one time in ten, Redis is killed and restarted),
    and S3 answers a few per cent of requests with 503s, resets and delays. Then every job must have
    succeeded with each (identity, sample) exactly once, intact, and no task ever ran twice at once.
    IDFORGE_SOAK_SEED picks the run."""
    seed = int(os.environ.get("IDFORGE_SOAK_SEED", "1"))
    rng = random.Random(seed)
    s = Stack(tmp_path, model_dir, proxy=True, workers=2,
              env={"IDFORGE_MAX_TASK_ATTEMPTS": "25", "IDFORGE_VISIBILITY_TIMEOUT_S": "30",
                   "IDFORGE_TASK_LEASE_S": "5",  # outlives the Redis outages below
                   "IDFORGE_WEBHOOK_BACKOFF_S": "1", "IDFORGE_WEBHOOK_BACKOFF_MAX_S": "10"})
    proxy = s.proxy
    assert proxy is not None
    proxy.inject("slowdown", p=0.05, methods=["PUT"])
    proxy.inject("reset_before", p=0.02)
    proxy.inject("reset_after", p=0.02, methods=["PUT"])
    proxy.inject("reset_mid_body", p=0.03, methods=["GET"])
    proxy.inject("delay", p=0.02, delay_s=0.5)
    jobs: dict[str, dict[str, Any]] = {}
    killed: set[str] = set()
    restarts = 0
    try:
        t0 = time.monotonic()
        next_action = t0 + rng.uniform(1, 6)
        while time.monotonic() - t0 < SOAK_SECONDS:
            live = [j for j in jobs if (s.record(j) or {}).get("status") in (None, "queued", "running")]
            while len(live) < 2:
                spec = _soak_spec(rng, len(jobs))
                job_id = _submit_retrying(s, spec, f"soak-{seed}-{len(jobs)}")
                jobs[job_id] = spec
                live.append(job_id)
            if time.monotonic() >= next_action:
                if rng.random() < 0.1:
                    s.restart_redis(rng.choice([signal.SIGKILL, signal.SIGTERM]), down_s=rng.uniform(0, 2))
                    restarts += 1
                else:
                    w = rng.choice(s.workers)
                    children = _pool_children(w.proc.pid)
                    if children:
                        os.kill(children[0], signal.SIGKILL)
                        killed.add(str(children[0]))
                next_action = time.monotonic() + rng.uniform(1, 6)
            time.sleep(0.05)
        chaos_s = time.monotonic() - t0
        proxy.clear()
        results = {j: s.wait_job(j, timeout=600) for j in jobs}
        failed = {j: r.get("error") for j, r in results.items() if r["status"] != "succeeded"}
        assert not failed, (failed, s.logs())
        images = 0
        for job_id, spec in jobs.items():
            verify_dataset(s, job_id, spec["identities"], spec["images_per_identity"])
            assert_never_parallel(s.events(job_id), killed)
            images += spec["identities"] * spec["images_per_identity"]
        reruns = sum(n - 1 for j in jobs for n in starts(s.events(j)).values())
        assert _count(s, "lease lapsed and was taken") == 0  # no delivery ever lost its lease
        print(f"\nsoak (seed {seed}): {len(jobs)} jobs, {images} images, all intact; {len(killed)} kills, "
              f"{restarts} Redis restarts, {proxy.injected()} S3 faults over {proxy.stats['requests']} "
              f"requests; {reruns} task re-runs; chaos {chaos_s:.0f} s, total {time.monotonic() - t0:.0f} s")
    finally:
        s.stop()
