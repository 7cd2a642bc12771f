"""Sharing the GPUs, through the whole service (real Redis with AOF, SeaweedFS, a Celery worker, the
API): a bulk job's shards are held and released one slot at a time, so another team's small job
and the team's own interactive job run while the bulk job renders; a canceled job whose shards
were all held ends at once; the job shows its place, its stage clocks and an estimate before it
is posted; /metrics and /backlog show the queue waits and what is held."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import Client
from tests.integration.test_faults import LATENT, Stack, verify_dataset, wait_for

pytestmark = pytest.mark.integration

# One identity a shard: the bulk job is 24 shards of 3 images (a fraction of a second each here).
BULK = {"identities": 24, "images_per_identity": 3, "seed": 51, "models": LATENT,
        "variations": {"method": "dispersion", "iterations": 2}, "priority": "batch"}
SMALL = {"identities": 1, "images_per_identity": 2, "seed": 52, "models": LATENT,
         "variations": {"method": "dispersion", "iterations": 2}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("sched"), model_dir,
              env={"IDFORGE_SHARD_IDENTITIES": "1", "IDFORGE_WORKER_HEARTBEAT_S": "1"})
    try:
        yield s
    finally:
        s.stop()


def _get(stack: Stack, path: str, key: str = "key-alpha") -> Any:
    r = httpx.get(f"{stack.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json() if "json" in r.headers.get("content-type", "") else r.text


def test_small_jobs_run_while_a_bulk_job_renders(stack: Stack) -> None:
    beta = Client(stack.url, "key-beta")
    bulk = stack.alpha.submit(BULK)["id"]
    # Rendering, with shards held: the bulk job does not flood the queue.
    job = wait_for(lambda: (j := _get(stack, f"/v1/jobs/{bulk}"))["stage"] == "rendering"
                   and (j.get("schedule") or {}).get("shards_held", 0) > 10 and j, 120,
                   "the bulk job rendering with held shards", logs=stack.logs)
    assert job["priority"] == "batch" and job["schedule"]["priority"] == "batch"
    assert stack.redis_client().llen("gpu") <= 1  # one worker slot: one shard released ahead at most
    backlog = _get(stack, "/backlog")["gpu"]
    assert backlog["held"] > 10 and backlog["waiting"] == backlog["held"] + backlog["queued"]

    other_team = beta.submit(SMALL)["id"]
    own_ci = stack.alpha.submit({**SMALL, "seed": 53, "priority": "interactive"})["id"]
    for client, small in ((beta, other_team), (stack.alpha, own_ci)):
        done = client.wait(small, timeout=240, interval=0.1)
        assert done["status"] == "succeeded", (done, stack.logs())
    bulk_now = _get(stack, f"/v1/jobs/{bulk}")
    assert bulk_now["status"] == "running" and bulk_now["schedule"]["shards_held"] > 0, bulk_now
    small_job = _get(stack, f"/v1/jobs/{other_team}", "key-beta")
    clocks = small_job["stages"]
    assert {"sampling_identities", "rendering", "evaluating"} <= clocks.keys()
    assert all(c["queued_at"] <= c["started_at"] for c in clocks.values()), clocks

    done = stack.wait_job(bulk, timeout=300)
    assert done["status"] == "succeeded", (done, stack.logs())
    verify_dataset(stack, bulk, 24, 3)  # every (identity, sample) once: no shard lost or run twice
    metrics = _get(stack, "/metrics")
    assert 'idforge_queue_wait_seconds_count{priority="batch",stage="rendering",team="alpha"} 1.0' in metrics
    assert 'idforge_queue_wait_seconds_count{priority="interactive",stage="rendering",team="beta"} 1.0' in metrics
    assert "idforge_shards_in_flight 0.0" in metrics and _get(stack, "/backlog")["gpu"]["held"] == 0


def test_a_job_whose_shards_are_all_held_cancels_at_once(stack: Stack) -> None:
    first = stack.alpha.submit({**BULK, "seed": 54})["id"]
    wait_for(lambda: _get(stack, f"/v1/jobs/{first}")["stage"] == "rendering", 120, "the first job rendering")
    second = stack.alpha.submit({**BULK, "seed": 55})["id"]
    held = wait_for(lambda: (j := _get(stack, f"/v1/jobs/{second}"))["stage"] == "rendering" and j, 120,
                    "the second job's shards held", logs=stack.logs)
    t0 = time.monotonic()
    stack.alpha.cancel(second)
    canceled = wait_for(lambda: (j := _get(stack, f"/v1/jobs/{second}"))["status"] == "canceled" and j, 60,
                        "the cancel to finish", logs=stack.logs)
    print(f"\ncanceled with {held['schedule']['shards_held']} shards held in {time.monotonic() - t0:.2f} s")
    assert canceled["status"] == "canceled"
    assert stack.alpha.wait(first, timeout=300)["status"] == "succeeded"
    assert _get(stack, "/backlog")["gpu"]["held"] == 0


def test_a_dry_run_estimates_and_creates_nothing(stack: Stack) -> None:
    before = stack.redis_client().zcard("idf:team:alpha:jobs")
    r = httpx.post(f"{stack.url}/v1/jobs", params={"dry_run": "true"}, json=BULK,
                   headers={"Authorization": "Bearer key-alpha"}, timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["dry_run"] and got["shards"] == 24 and got["priority"] == "batch"
    est = got["estimate"]
    assert est["images"] == 72 and est["stored_bytes"] > 72 * 1000 and est["gpu_seconds"] > 0
    # The earlier tests' shards measured this generator: the estimate says so.
    assert est["source"]["render"] == "measured" and est["source"]["bytes"] == "measured"
    assert stack.redis_client().zcard("idf:team:alpha:jobs") == before
    bad = httpx.post(f"{stack.url}/v1/jobs", params={"dry_run": "true"}, json={**BULK, "priority": "urgent"},
                     headers={"Authorization": "Bearer key-alpha"}, timeout=10)
    assert bad.status_code == 422 and "priority" in bad.text
