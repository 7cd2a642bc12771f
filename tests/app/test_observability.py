"""`/metrics` and the JSON logs: the Redis-side telemetry against a real redis-server, the scrape
through two API instances sharing it, and a real Celery worker whose log lines name their job."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import telemetry
from app.api.main import create_app
from app.jobstore import JobStore
from app.logs import log_context, setup_logging
from app.servers import RedisServer, free_port
from app.settings import Settings
from tests.conftest import TEAM_KEYS
from tests.servers import Proc, wait_http

A = {"Authorization": "Bearer key-alpha"}
B = {"Authorization": "Bearer key-beta"}
SPEC: dict[str, Any] = {"identities": 2, "images_per_identity": 2, "seed": 1}


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, parsed by prometheus_client."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def make_job(store: JobStore, owner: str = "alpha") -> str:
    made = store.create(owner, SPEC, "h", identities=2, images=4)
    assert made.created
    return made.job_id


# ---- telemetry in Redis -------------------------------------------------------------------------


def test_stage_clock_observes_each_stage_once(store: JobStore) -> None:
    t = telemetry.Telemetry(store.r)
    jid = make_job(store)
    assert t.enter_stage(jid, "sampling_identities")
    time.sleep(0.3)
    assert not t.enter_stage(jid, "sampling_identities")  # a redelivered task: no new observation
    assert t.enter_stage(jid, "rendering")
    assert t.end_stage(jid)
    assert not t.end_stage(jid)  # finalize run twice: the clock is already stopped
    snap = t.snapshot(store, [], None)
    sampling, rendering = snap.stages["sampling_identities"], snap.stages["rendering"]
    assert sampling.count == 1 and 0.3 <= sampling.sum < 5
    assert dict(sampling.buckets)[0.5] == 1 and dict(sampling.buckets)[float("inf")] == 1
    assert rendering.count == 1 and rendering.sum < 0.3
    assert snap.stages["packaging"].count == 0
    assert not t.enter_stage("jnosuchjob", "rendering")  # no record, no clock
    with pytest.raises(ValueError, match="stage must be one of"):
        t.enter_stage(jid, "dreaming")


def test_histogram_buckets_are_cumulative(store: JobStore) -> None:
    # Durations land in the first bucket whose bound is >= them; bounds stay cumulative.
    store.r.hset(telemetry.STAGE + "rendering", mapping={"b0": 2, "b3": 1, f"b{len(telemetry.STAGE_BUCKETS)}": 4,
                                                       "sum": 99999.5, "count": 7})
    h = telemetry.Telemetry(store.r).snapshot(store, [], None).stages["rendering"]
    counts = dict(h.buckets)
    assert counts[0.5] == 2 and counts[2.5] == 2 and counts[5] == 3 and counts[86400] == 3
    assert counts[float("inf")] == 7 == h.count


def test_images_counter_and_heartbeats(store: JobStore) -> None:
    t = telemetry.Telemetry(store.r)
    t.count_images(5)
    t.count_images(0)
    t.count_images(7)
    with pytest.raises(ValueError, match="n must be >= 0"):
        t.count_images(-1)
    t.heartbeat("host-a:1", 10)
    t.heartbeat("host-b:2", 0.1)
    t.heartbeat("host-c:3", 10)
    time.sleep(0.4)  # host-b's three 0.1 s beats are over
    t.goodbye("host-c:3")
    # A worker silent for more than an hour is dropped by the next heartbeat.
    store.r.hset(telemetry.WORKERS, "gone:9", json.dumps({"seen": time.time() - 4000, "ttl": 30}))
    t.heartbeat("host-a:1", 10)
    beats = {w.name: w for w in t.workers()}
    assert set(beats) == {"host-a:1", "host-b:2"}
    assert beats["host-a:1"].live and beats["host-a:1"].age_s < 0.2
    assert not beats["host-b:2"].live and beats["host-b:2"].age_s >= 0.4
    assert t.snapshot(store, [], None).images == 12


# ---- the status poll's read ---------------------------------------------------------------------


def test_read_matches_get_in_one_round_trip_of_fixed_size(store: JobStore) -> None:
    jid = make_job(store)
    assert store.read(jid) == store.get(jid)  # no progress yet
    store.set_progress(jid, "shard0", identities=1, images=2)
    assert store.read(jid) == store.get(jid)
    for k in range(1, 40):
        store.set_progress(jid, f"shard{k}", identities=2, images=4)
    store.set_progress(jid, "sampling", identities=9, images=9)  # not a shard: not summed
    store.set_progress(jid, "shard3", identities=1, images=1)  # redelivered: starts again
    job = store.read(jid)
    assert job == store.get(jid)
    assert job is not None and (job["progress"]["identities_done"], job["progress"]["images_done"]) == \
        (1 + 38 * 2 + 1, 2 + 38 * 4 + 1)
    # The read carries the job's fields and two sums, however many shards wrote progress.
    store.r.hset(f"idf:job:{jid}:progress", "shard0:identities", 5)  # a write that bypasses the sums
    assert store.read(jid) != store.get(jid)  # proof that read used the sums, not the 80 fields
    assert store.read("jnosuchjob") is None


# ---- the scrape endpoint ------------------------------------------------------------------------


@pytest.fixture
def two_apis(redis_server: RedisServer, store: JobStore, tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    """Two API instances (as two processes would be) over one Redis."""
    def app() -> Any:
        return create_app(Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS,
                                   storage_dir=tmp_path / "storage", public_url="http://testserver"))

    with TestClient(app()) as a, TestClient(app()) as b:
        yield a, b


def test_metrics_agree_across_api_processes(two_apis: tuple[TestClient, TestClient], store: JobStore) -> None:
    a, b = two_apis
    ids = [a.post("/v1/jobs", json=SPEC, headers=A).json()["id"] for _ in range(3)]
    b.post("/v1/jobs", json=SPEC, headers=B)
    assert a.post(f"/v1/jobs/{ids[0]}/cancel", headers=A).json()["status"] == "canceled"
    store.transition(ids[1], "running")
    t = telemetry.Telemetry(store.r)
    t.enter_stage(ids[1], "rendering")
    t.count_images(40)
    t.heartbeat("node-1:100", 5)
    r = a.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = scrape(r.text)
    jobs = {dict(k[1])["status"]: v for k, v in m.items() if k[0] == "idforge_jobs"}
    assert jobs == {"queued": 2, "running": 1, "canceling": 0, "succeeded": 0, "failed": 0, "canceled": 1}
    assert m[("idforge_queue_length", (("queue", "gpu"),))] == 4  # every submit enqueued one task
    assert m[("idforge_queue_length", (("queue", "cpu"),))] == 0
    assert m[("idforge_images_rendered_total", ())] == 40
    assert m[("idforge_workers_live", ())] == 1
    assert m[("idforge_worker_last_seen_seconds", (("worker", "node-1:100"),))] < 5
    assert m[("idforge_stage_duration_seconds_count", (("stage", "rendering"),))] == 0  # still in it
    assert ("idforge_stage_duration_seconds_bucket", (("le", "+Inf"), ("stage", "packaging"))) in m
    assert m[("idforge_broker_up", ())] == 1
    # The other API instance renders the same numbers (the worker's age aside: time moves on).
    other = scrape(b.get("/metrics").text)
    assert {k: v for k, v in other.items() if "last_seen" not in k[0]} == \
        {k: v for k, v in m.items() if "last_seen" not in k[0]}
    # Counts only: no team names and no job ids in the scrape.
    assert "alpha" not in r.text and "beta" not in r.text and ids[0] not in r.text


def test_metrics_token_guards_the_scrape(redis_server: RedisServer, store: JobStore, tmp_path: Path) -> None:
    s = Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS, storage_dir=tmp_path,
                 metrics_token="scrape-secret")
    with TestClient(create_app(s)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=A).status_code == 401  # a team's key is not the token
        r = c.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert r.status_code == 200 and "idforge_jobs" in r.text


def test_metrics_without_a_broker_still_scrape(redis_server: RedisServer, store: JobStore, tmp_path: Path) -> None:
    s = Settings(redis_url=redis_server.url, broker_url=f"redis://127.0.0.1:{free_port()}/0",
                 api_keys=TEAM_KEYS, storage_dir=tmp_path)
    with TestClient(create_app(s)) as c:
        m = scrape(c.get("/metrics").text)
    assert m[("idforge_broker_up", ())] == 0
    assert not any(k[0] == "idforge_queue_length" for k in m)


# ---- logs ---------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_job_context(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("json", "INFO", stream=out)
    log = logging.getLogger("idforge.test")
    log.info("before")
    with log_context(job_id="j1", task="idforge.render_shard", shard=2):
        log.info("rendering %d images", 8, extra={"images": 8})
        with log_context(shard=None):  # None leaves a field as it is
            log.warning("nested")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    log.debug("below the level")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [x["message"] for x in lines] == ["before", "rendering 8 images", "nested", "failed"]
    assert "job_id" not in lines[0]
    assert {k: lines[1][k] for k in ("level", "logger", "job_id", "task", "shard", "images")} == {
        "level": "INFO", "logger": "idforge.test", "job_id": "j1", "task": "idforge.render_shard",
        "shard": 2, "images": 8}
    assert lines[1]["time"].endswith("Z") and lines[2]["shard"] == 2
    assert "RuntimeError: boom" in lines[3]["exc_info"]


def test_text_format_and_auto(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("text", "INFO", stream=out)
    with log_context(job_id="j2"):
        logging.getLogger("idforge.test").info("hello")
    assert out.getvalue().rstrip().endswith("INFO    idforge.test [job_id=j2] hello")
    out2 = io.StringIO()  # not a terminal: auto means JSON
    setup_logging("auto", "INFO", stream=out2)
    logging.getLogger("idforge.test").info("x")
    assert json.loads(out2.getvalue())["message"] == "x"
    with pytest.raises(ValueError, match="log_level"):
        Settings(log_level="loud")  # type: ignore[arg-type]
    assert Settings(log_level="debug").log_level == "DEBUG"  # type: ignore[arg-type]


def test_request_logs_carry_the_job_id(redis_server: RedisServer, store: JobStore, tmp_path: Path,
                                      restore_logging: None) -> None:
    app = create_app(Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS, storage_dir=tmp_path))

    def probe(job_id: str) -> dict[str, str]:  # a sync route: runs in the thread pool
        logging.getLogger("idforge.api").info("probed %s", job_id)
        return {}

    def broken(job_id: str) -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/jobs/{job_id}/probe", probe)
    app.add_api_route("/probe/{job_id}", probe)
    app.add_api_route("/v1/jobs/{job_id}/broken", broken)
    out = io.StringIO()
    setup_logging("json", "INFO", stream=out)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.get("/v1/jobs/j123abc/probe")
        c.get("/probe/j456")
        assert c.get("/v1/jobs/j789/broken").status_code == 500
        c.get("/probe/j000")  # the failed request's context did not leak into the next one
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["message"], x.get("job_id")) for x in lines if "probed" in x["message"]] == [
        ("probed j123abc", "j123abc"), ("probed j456", None), ("probed j000", None)]
    (error,) = [x for x in lines if x["message"].startswith("unhandled error")]
    assert error["job_id"] == "j789" and "RuntimeError: a bug" in error["exc_info"]


# ---- a real worker ------------------------------------------------------------------------------


@pytest.mark.integration
def test_worker_logs_heartbeats_and_job_metrics(tmp_path: Path, model_dir: Path) -> None:
    """A real API and Celery worker: the worker's JSON log lines name the job they belong to,
    /metrics shows the job's stages, its images and the worker's heartbeat; a killed pool process's
    heartbeat goes stale while its replacement beats."""
    redis = RedisServer(tmp_path / "redis").start()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDFORGE_REDIS_URL": redis.url,
           "IDFORGE_API_KEYS": TEAM_KEYS, "IDFORGE_STORAGE_DIR": str(tmp_path / "storage"),
           "IDFORGE_MODEL_DIR": str(model_dir), "IDFORGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
           "IDFORGE_SHARD_IDENTITIES": "2", "IDFORGE_LOG_FORMAT": "json", "IDFORGE_LOG_LEVEL": "info",
           "IDFORGE_WORKER_HEARTBEAT_S": "0.5"}
    worker = Proc(["worker", "--concurrency", "1"], env, tmp_path / "worker.log")
    api = Proc(["serve", "--port", str(port)], env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc=api)
        job_id = httpx.post(f"{url}/v1/jobs", headers=A, json={
            "identities": 4, "images_per_identity": 2, "seed": 3, "render": {"steps": 2}}).json()["id"]
        job = _wait(url, job_id, 240)
        assert job["status"] == "succeeded", job
        m = scrape(httpx.get(f"{url}/metrics").text)
        assert m[("idforge_images_rendered_total", ())] == 8
        assert m[("idforge_jobs", (("status", "succeeded"),))] == 1
        for stage in ("sampling_identities", "rendering", "evaluating", "packaging"):
            assert m[("idforge_stage_duration_seconds_count", (("stage", stage),))] == 1, stage
        assert m[("idforge_workers_live", ())] == 1
        (pool_name,) = [dict(k[1])["worker"] for k in m if k[0] == "idforge_worker_last_seen_seconds"]
        pool_pid = int(pool_name.rsplit(":", 1)[1])
        os.kill(pool_pid, signal.SIGKILL)  # the pool process dies; Celery forks a replacement
        deadline = time.monotonic() + 60
        while True:
            m = scrape(httpx.get(f"{url}/metrics").text)
            ages = {dict(k[1])["worker"]: v for k, v in m.items() if k[0] == "idforge_worker_last_seen_seconds"}
            if len(ages) == 2 and ages[pool_name] > 1.5 and m[("idforge_workers_live", ())] == 1:
                break
            assert time.monotonic() < deadline, (ages, m[("idforge_workers_live", ())])
            time.sleep(0.2)
    finally:
        api.stop()
        worker.stop()
        redis.stop()
    # Every line the worker wrote is a JSON record: no banner, warnings captured as records; only
    # Celery's shutdown notice ("worker: Warm shutdown") is written straight to the raw stdout.
    records = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()
               if line.strip() and not line.startswith("worker: ")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    mine = [r for r in records if r.get("job_id") == job_id]
    tasks = {(r["task"], r.get("shard")) for r in mine}
    assert {("idforge.sample_identities", None), ("idforge.render_shard", 0), ("idforge.render_shard", 1),
            ("idforge.finalize", None)} <= tasks, tasks
    api_records = [json.loads(line) for line in (tmp_path / "api.log").read_text().splitlines() if line.strip()]
    assert any(r["logger"] == "uvicorn.error" for r in api_records), api_records


def _wait(url: str, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}", headers=A).json()
        if job["terminal"] or time.monotonic() > deadline:
            return job
        time.sleep(0.2)
