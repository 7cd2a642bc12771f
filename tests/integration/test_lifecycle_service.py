"""Deleting, expiring and reusing datasets through the whole service (real Redis with AOF, SeaweedFS
behind a fault proxy, a Celery worker, the API): a deletion removes every object of the job, a
live job is canceled first, a worker killed with -9 halfway and a storm of S3 faults both leave a
deletion that finishes, never half a dataset that looks whole; retention deletes a job at its time
and never before; reuse answers an identical request with the existing job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import ApiError, Client
from app.layout import JobKeys
from app.lifecycle import EXPIRY, Lifecycle
from tests.integration.test_faults import BUCKET, LATENT, Stack, kill_pool, wait_for

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {"identities": 6, "images_per_identity": 3, "seed": 61, "models": LATENT,
                        "variations": {"method": "dispersion", "iterations": 2},
                        "output": {"formats": ["imagefolder", "webdataset"]}, "quality": {"report": True}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("lifecycle"), model_dir, proxy=True,
              env={"IDFORGE_WORKER_HEARTBEAT_S": "1", "IDFORGE_RETENTION_SWEEP_S": "1"})
    try:
        yield s
    finally:
        s.stop()


def _objects(stack: Stack, job_id: str) -> list[str]:
    """The job's objects, listed straight from the S3 server (not through the proxy)."""
    s3 = stack.s3.client()
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=JobKeys.for_job("jobs", job_id).key("")) for o in page.get("Contents", [])]


def _manifest_key(job_id: str) -> str:
    return JobKeys.for_job("jobs", job_id).manifest


def _finished(stack: Stack, spec: dict[str, Any]) -> str:
    job = stack.wait_job(stack.alpha.submit(spec)["id"], timeout=240)
    assert job["status"] == "succeeded", (job, stack.logs())
    return str(job["id"])


def _wait_deleted(stack: Stack, job_id: str, timeout: float = 120) -> dict[str, Any]:
    job: dict[str, Any] = wait_for(lambda: (j := stack.job(job_id)) and j.get("deleted_at") and j, timeout,
                                   f"job {job_id} deleted", interval=0.1, logs=stack.logs)
    return job


def _artifacts_status(stack: Stack, job_id: str) -> int:
    return httpx.get(f"{stack.url}/v1/jobs/{job_id}/artifacts",
                     headers={"Authorization": "Bearer key-alpha"}, timeout=10).status_code


def test_delete_removes_every_object_of_a_succeeded_job(stack: Stack) -> None:
    job_id = _finished(stack, SPEC)
    kept = _finished(stack, {**SPEC, "seed": 62})  # another job of the team: untouched
    before = _objects(stack, job_id)
    assert _manifest_key(job_id) in before and any("/report/" in k for k in before) and len(before) > 20
    n_kept = len(_objects(stack, kept))

    job = stack.alpha.delete(job_id, wait=True, timeout=120)
    assert job["deleted_at"] and job["status"] == "succeeded" and job["timestamps"]["succeeded"]
    assert _objects(stack, job_id) == []
    assert _artifacts_status(stack, job_id) == 410
    assert len(_objects(stack, kept)) == n_kept and _artifacts_status(stack, kept) == 200
    events = [e["type"] for e in stack.events(job_id)]
    assert events[-2:] == ["deletion_requested", "deleted"]
    assert stack.alpha.delete(job_id)["deleted_at"] == job["deleted_at"]  # idempotent
    with pytest.raises(ApiError) as e:  # another team's job does not exist for it
        Client(stack.url, "key-beta").delete(kept)
    assert e.value.status == 404


def test_deleting_a_rendering_job_cancels_it_then_deletes_everything(stack: Stack) -> None:
    job_id = stack.alpha.submit({**SPEC, "identities": 30, "seed": 63})["id"]
    wait_for(lambda: (j := stack.record(job_id)) and j.get("stage") == "rendering"
             and j["progress"]["images_done"] > 0, 120, "rendering", logs=stack.logs)
    job = stack.alpha.delete(job_id)
    assert job["status"] in ("canceling", "canceled") and job["deletion_requested_at"]
    job = _wait_deleted(stack, job_id)
    assert job["status"] == "canceled" and _objects(stack, job_id) == []
    time.sleep(2)  # nothing of the canceled job is written after its deletion
    assert _objects(stack, job_id) == []


def test_a_worker_killed_mid_deletion_leaves_no_whole_looking_dataset_and_the_deletion_finishes(
        stack: Stack) -> None:
    proxy = stack.proxy
    assert proxy is not None
    job_id = _finished(stack, {**SPEC, "seed": 64})
    n = len(_objects(stack, job_id))
    proxy.inject("delay", path_contains="?delete", delay_s=4.0)  # every DeleteObjects takes 4 s
    try:
        stack.alpha.delete(job_id)
        # The manifest goes first (its own call); kill the pool while the rest is being deleted.
        wait_for(lambda: _manifest_key(job_id) not in _objects(stack, job_id), 60, "the manifest deleted",
                 logs=stack.logs)
        time.sleep(1.0)
        kill_pool(stack.workers[0])
        left = _objects(stack, job_id)
        assert 0 < len(left) < n and _manifest_key(job_id) not in left  # half deleted, and it says so
        assert _artifacts_status(stack, job_id) == 410
        assert not stack.record(job_id).get("deleted_at")  # type: ignore[union-attr]
    finally:
        proxy.clear()
    job = _wait_deleted(stack, job_id, timeout=180)  # redelivered to the new pool process
    assert _objects(stack, job_id) == [] and job["deleted_at"]


def test_a_storm_of_s3_faults_during_a_deletion_is_retried_until_it_finishes(stack: Stack) -> None:
    proxy = stack.proxy
    assert proxy is not None
    job_id = _finished(stack, {**SPEC, "seed": 65})
    proxy.inject("slowdown", p=0.7, times=8, path_contains="?delete")
    proxy.inject("reset_before", p=0.5, times=6, path_contains="list-type")
    proxy.inject("reset_after", p=0.5, times=4, path_contains="?delete")
    try:
        stack.alpha.delete(job_id)
        job = _wait_deleted(stack, job_id, timeout=240)
    finally:
        faults = proxy.injected()
        proxy.clear()
    assert faults >= 6, proxy.stats
    assert _objects(stack, job_id) == [] and job["deleted_at"]
    assert _artifacts_status(stack, job_id) == 410


def test_retention_deletes_a_job_at_its_time_and_never_before(stack: Stack) -> None:
    job_id = _finished(stack, {**SPEC, "seed": 66, "retention_days": 0.0002})  # 17.28 s after it ends
    job = stack.job(job_id)
    assert job is not None and job["retention_days"] == 0.0002 and job["expires_at"]
    expires_ms = int(stack.redis_client().zscore(EXPIRY, job_id))
    # The test's clock, a millisecond before: the sweep requests nothing.
    sent: list[str] = []
    assert Lifecycle(stack.store).sweep(sent.append, now_ms=expires_ms - 1).expired == [] and sent == []
    # The workers' own sweeps (every second here) leave it until its time, then delete it.
    while time.time() * 1000 < expires_ms - 2000:
        assert not stack.job(job_id).get("deletion_requested_at")  # type: ignore[union-attr]
        assert _manifest_key(job_id) in _objects(stack, job_id)
        time.sleep(0.5)
    job = _wait_deleted(stack, job_id, timeout=60)
    requested = stack.store.get(job_id)
    assert requested is not None and requested["deletion_reason"] == "expired"
    assert job["deletion_requested_at"] >= job["expires_at"]
    assert _objects(stack, job_id) == []


def test_reuse_answers_an_identical_request_with_the_existing_job(stack: Stack) -> None:
    spec = {**SPEC, "seed": 67, "metadata": {"commit": "c1"}}
    first = _finished(stack, spec)
    r = httpx.post(f"{stack.url}/v1/jobs", json={**spec, "metadata": {"commit": "c2"}, "reuse": "if_identical"},
                   headers={"Authorization": "Bearer key-alpha"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == first and r.json()["reused"] is True and r.json()["status"] == "succeeded"
    found = list(stack.alpha.jobs(metadata={"commit": "c1"}))
    assert [j["id"] for j in found] == [first]
    assert list(stack.alpha.jobs(metadata={"commit": "c2"})) == []  # reuse made no new job
