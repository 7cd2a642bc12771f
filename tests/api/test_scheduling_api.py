"""The scheduling surface of the HTTP edge, in-process against a real Redis (no worker consuming
the queues): priorities and the interactive cap, dry runs, a job's place, /backlog and the queue
metrics, and the cancel of a job whose shards are all held."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.estimates import Throughput
from app.jobstore import JobStore
from app.queue import FINISH_CANCEL, SAMPLE_IDENTITIES
from app.scheduler import Scheduler
from app.servers import RedisServer
from app.settings import Settings
from app.telemetry import Telemetry
from tests.api.test_api import problem
from tests.conftest import TEAM_KEYS

A = {"Authorization": "Bearer key-alpha"}
B = {"Authorization": "Bearer key-beta"}
SPEC: dict[str, Any] = {"identities": 3, "images_per_identity": 2, "seed": 1}


@pytest.fixture
def api(redis_server: RedisServer, store: JobStore, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS, storage_dir=tmp_path / "storage",
                        public_url="http://testserver", max_interactive_images=10, metrics_token="m-token",
                        team_scheduling={"beta": {"priority": "batch", "weight": 3}})
    with TestClient(create_app(settings)) as c:
        yield c


def _tasks(store: JobStore, queue: str) -> list[tuple[str, list[Any]]]:
    return [(m["headers"]["task"], json.loads(m["headers"]["argsrepr"].replace("'", '"')))
            for m in map(json.loads, reversed(store.r.lrange(queue, 0, -1)))]


def test_priority_defaults_per_team_and_the_interactive_cap(api: TestClient, store: JobStore) -> None:
    a = api.post("/v1/jobs", json=SPEC, headers=A).json()  # 6 images: within alpha's cap of 10
    assert a["priority"] == "interactive" and a["priority_note"] is None
    b = api.post("/v1/jobs", json=SPEC, headers=B).json()  # beta's default is batch
    assert b["priority"] == "batch"
    over = api.post("/v1/jobs", json={**SPEC, "seed": 2}, headers=A).json()  # 6 + 6 > 10
    assert over["priority"] == "batch" and "cap of 10" in over["priority_note"]
    events = api.get(f"/v1/jobs/{over['id']}/events", headers=A).json()["events"]
    assert any(e["type"] == "priority" and e["priority"] == "batch" for e in events)
    asked = api.post("/v1/jobs", json={**SPEC, "seed": 3, "priority": "batch"}, headers=A).json()
    assert asked["priority"] == "batch" and asked["priority_note"] is None
    assert "priority" not in asked["spec"]  # not part of the normalised spec or its hash
    problem(api.post("/v1/jobs", json={**SPEC, "priority": "urgent"}, headers=A), 422, "priority")


def test_an_idempotency_key_replayed_with_another_priority_is_another_body(api: TestClient) -> None:
    h = {**A, "Idempotency-Key": "k1"}
    first = api.post("/v1/jobs", json={**SPEC, "priority": "batch"}, headers=h)
    assert first.status_code == 202
    assert api.post("/v1/jobs", json={**SPEC, "priority": "batch"}, headers=h).json()["id"] == first.json()["id"]
    problem(api.post("/v1/jobs", json={**SPEC, "priority": "interactive"}, headers=h), 422)


def test_a_dry_run_validates_estimates_and_creates_nothing(api: TestClient, store: JobStore) -> None:
    r = api.post("/v1/jobs?dry_run=true", json={**SPEC, "identities": 200, "images_per_identity": 50}, headers=A)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["dry_run"] and got["shards"] == 4 and got["priority"] == "batch"  # over alpha's cap
    est = got["estimate"]
    assert est["images"] == 10_000 and est["source"] == {"render": "default", "sampling": "default", "bytes": "default"}
    assert est["gpu_seconds"] > 0 and est["stored_bytes"] > 10_000 * 4000
    assert store.r.llen("gpu") == 0 and store.r.zcard("idf:team:alpha:jobs") == 0
    # Once the workers have measured the generator, the estimate follows the measurement.
    t = Throughput(store.r)
    t.observe("render:arc2face-tiny:iresnet-tiny:embedding_noise", 0.5)
    again = api.post("/v1/jobs?dry_run=true", json={**SPEC, "identities": 200, "images_per_identity": 50},
                     headers=A).json()["estimate"]
    assert again["source"]["render"] == "measured"
    assert again["breakdown"]["render_gpu_seconds"] == pytest.approx(10_000 * 25 * 0.5)
    problem(api.post("/v1/jobs?dry_run=true", json={**SPEC, "identities": 0}, headers=A), 422, "identities")


def test_a_queued_job_shows_its_place_and_a_held_one_its_shards(api: TestClient, store: JobStore) -> None:
    first = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    second = api.post("/v1/jobs", json={**SPEC, "seed": 9}, headers=A).json()["id"]
    assert api.get(f"/v1/jobs/{first}", headers=A).json()["schedule"]["queue_position"] == 0
    assert api.get(f"/v1/jobs/{second}", headers=A).json()["schedule"]["queue_position"] == 1
    job = api.get(f"/v1/jobs/{first}", headers=A).json()
    assert set(job["stages"]) == {"sampling_identities"} and job["stages"]["sampling_identities"]["queued_at"]
    # As a worker would after sampling: running, rendering, its 5 shards held, one slot.
    store.transition(first, "running")
    sched = Scheduler(store.r, send=lambda j, k: None)
    sched.hold("other", "beta", "batch", 3, 1.0)
    sched.hold(first, "alpha", "interactive", 5, 1.0)
    sched.release()  # one slot: one shard of the two jobs
    place = api.get(f"/v1/jobs/{first}", headers=A).json()["schedule"]
    assert place["shards_held"] + place["shards_in_flight"] == 5
    # alpha's first shard went first (a tie broken by name); beta, at weight 3, has three shards of a
    # third of alpha's virtual time each before alpha's next.
    assert place["shards_ahead"] == 3 and place["next_start_in_s"] == 4.0  # the running one, then those 3
    assert api.get("/backlog").status_code == 401  # guarded like /metrics
    backlog = api.get("/backlog", headers={"Authorization": "Bearer m-token"}).json()["gpu"]
    assert backlog == {"held": 7, "queued": 2, "waiting": 9, "in_flight": 1}
    metrics = api.get("/metrics", headers={"Authorization": "Bearer m-token"}).text
    assert 'idforge_shards_held{priority="interactive",team="alpha"}' in metrics
    assert "idforge_gpu_backlog 9.0" in metrics


def test_queue_waits_reach_the_metrics_by_team_and_priority(api: TestClient, store: JobStore) -> None:
    tel = Telemetry(store.r)
    tel.observe_wait("rendering", "alpha", "interactive", 0.3)
    tel.observe_wait("rendering", "alpha", "interactive", 42.0)
    metrics = api.get("/metrics", headers={"Authorization": "Bearer m-token"}).text
    labels = 'priority="interactive",stage="rendering",team="alpha"'
    assert f"idforge_queue_wait_seconds_count{{{labels}}} 2.0" in metrics
    assert f'idforge_queue_wait_seconds_bucket{{le="0.5",{labels}}} 1.0' in metrics
    assert f"idforge_queue_wait_seconds_sum{{{labels}}} 42.3" in metrics


def test_canceling_a_job_with_every_shard_held_sends_the_finishing_task(api: TestClient, store: JobStore) -> None:
    job_id = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    store.r.delete("gpu")
    store.transition(job_id, "running")
    Scheduler(store.r).hold(job_id, "alpha", "interactive", 3, 1.0)  # nothing released yet
    r = api.post(f"/v1/jobs/{job_id}/cancel", headers=A)
    assert r.status_code == 202 and r.json()["status"] == "canceling"
    assert _tasks(store, "cpu") == [(FINISH_CANCEL, [job_id])]  # nothing runs that would see it
    assert job_id not in Scheduler(store.r).snapshot().jobs  # its held shards never run
    assert not [t for t in _tasks(store, "gpu") if t[0] != SAMPLE_IDENTITIES]
