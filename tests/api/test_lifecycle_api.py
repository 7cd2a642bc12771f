"""Deleting, retention, reuse and finding jobs, through the HTTP edge in-process (FastAPI TestClient)
against a real Redis and the local storage; the deletion itself runs the workers' function on the
same storage (the Celery path is in tests/integration/test_lifecycle_service.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.jobstore import JobStore
from app.layout import JobKeys
from app.servers import RedisServer
from app.settings import Settings
from app.storage import LocalStorage
from tests.api.test_api import problem
from tests.conftest import TEAM_KEYS
from workers.lifecycle import StillLive, delete_job

A = {"Authorization": "Bearer key-alpha"}
B = {"Authorization": "Bearer key-beta"}
RO = {"Authorization": "Bearer key-ro"}
SPEC: dict[str, Any] = {"identities": 3, "images_per_identity": 2, "seed": 1, "metadata": {"commit": "abc"}}
PINS = {"generator": {"name": "arc2face-tiny", "sha256": {"a.safetensors": "1" * 64}},
        "embedder": {"name": "iresnet-tiny", "sha256": {"b.safetensors": "2" * 64}}}


class RecordingStorage(LocalStorage):
    """The local storage, recording the prefixes deleted, in order."""

    deleted: list[str]

    def delete_prefix(self, prefix: str) -> int:
        self.deleted.append(prefix)
        return super().delete_prefix(prefix)


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    return Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS + ",alpha:key-ro:read",
                    storage_dir=tmp_path / "storage", public_url="http://testserver",
                    team_retention_days={"beta": 7})


@pytest.fixture
def storage(settings: Settings) -> RecordingStorage:
    s = RecordingStorage(settings.storage_dir)
    s.deleted = []
    return s


@pytest.fixture
def api(settings: Settings, store: JobStore, storage: RecordingStorage) -> Iterator[TestClient]:
    with TestClient(create_app(settings, storage=storage)) as c:
        yield c


def _succeed(store: JobStore, storage: LocalStorage, job_id: str, pins: dict[str, Any] = PINS) -> list[str]:
    """What a finished job leaves: a few objects under its prefix and its manifest; then succeeded."""
    keys = JobKeys.for_job("jobs", job_id)
    names = ["spec.json", "identities/embeddings.safetensors", "shards/00000/done.json",
             "dataset/imagefolder/000000/000.jpg", "dataset/index.parquet", "report/report.json"]
    for n in names:
        storage.put_bytes(keys.key(n), b"x")
    storage.put_bytes(keys.manifest, json.dumps({"models": pins, "plan": {"shard_identities": 64}}).encode())
    store.transition(job_id, "running")
    store.transition(job_id, "succeeded")
    return [*names, "manifest.json"]


def _delete_now(settings: Settings, store: JobStore, storage: LocalStorage, job_id: str) -> int | None:
    """The workers' deletion, run here on the same Redis and storage."""
    return delete_job(SimpleNamespace(settings=settings, store=store, storage=storage), job_id)  # type: ignore[arg-type]


def test_delete_a_succeeded_job_removes_every_object_manifest_first_and_keeps_a_tombstone(
        api: TestClient, store: JobStore, storage: RecordingStorage, settings: Settings) -> None:
    job_id = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    names = _succeed(store, storage, job_id)
    keys = JobKeys.for_job("jobs", job_id)
    assert storage.exists(keys.manifest)
    store.r.delete("cpu")

    r = api.delete(f"/v1/jobs/{job_id}", headers=A)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "succeeded" and job["deletion_requested_at"] and job["deleted_at"] is None
    assert [json.loads(m)["headers"]["task"] for m in store.r.lrange("cpu", 0, -1)] == ["idforge.delete_job"]
    gone = problem(api.get(f"/v1/jobs/{job_id}/artifacts", headers=A), 410)
    assert gone["code"] == "job_deleted" and job_id in gone["detail"]
    # Until the workers run it, a repeated DELETE is the same request (nothing new is recorded).
    assert api.delete(f"/v1/jobs/{job_id}", headers=A).status_code == 202
    assert len([e for e in store.events(job_id) if e["type"] == "deletion_requested"]) == 1

    assert _delete_now(settings, store, storage, job_id) == len(names)
    assert storage.deleted[0] == keys.manifest  # the commit marker first
    assert list(storage.list_keys(keys.key(""))) == [] and not (settings.storage_dir / keys.root).exists()
    done = api.delete(f"/v1/jobs/{job_id}", headers=A)
    assert done.status_code == 200 and done.json()["deleted_at"]
    g = api.get(f"/v1/jobs/{job_id}", headers=A).json()
    assert g["status"] == "succeeded" and g["timestamps"]["succeeded"] and g["deleted_at"] == done.json()["deleted_at"]
    assert _delete_now(settings, store, storage, job_id) is None  # done before: nothing to do
    problem(api.get(f"/v1/jobs/{job_id}/artifacts", headers=A), 410)


def test_delete_a_live_job_cancels_it_first_and_waits_for_it_to_stop(
        api: TestClient, store: JobStore, storage: RecordingStorage, settings: Settings) -> None:
    queued = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    job = api.delete(f"/v1/jobs/{queued}", headers=A).json()
    assert job["status"] == "canceled" and job["deletion_requested_at"]
    assert _delete_now(settings, store, storage, queued) == 0  # nothing was stored yet

    running = api.post("/v1/jobs", json={**SPEC, "seed": 2}, headers=A).json()["id"]
    store.transition(running, "running")
    storage.put_bytes(JobKeys.for_job("jobs", running).key("shards/00000/done.json"), b"{}")
    job = api.delete(f"/v1/jobs/{running}", headers=A).json()
    assert job["status"] == "canceling" and job["deletion_requested_at"]
    with pytest.raises(StillLive):  # its workers may still write: the task tries again later
        _delete_now(settings, store, storage, running)
    store.transition(running, "canceled")
    assert _delete_now(settings, store, storage, running) == 1


def test_delete_is_404_for_another_team_and_needs_the_submit_scope(api: TestClient, store: JobStore) -> None:
    job_id = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    problem(api.delete(f"/v1/jobs/{job_id}", headers=B), 404)
    assert problem(api.delete(f"/v1/jobs/{job_id}", headers=RO), 403)["code"] == "insufficient_scope"
    problem(api.delete("/v1/jobs/jnosuchjob", headers=A), 404)
    problem(api.delete("/v1/jobs/not-an-id!", headers=A), 404)
    job = store.get(job_id)
    assert job is not None and "deletion_requested_at" not in job and job["status"] == "queued"


def test_retention_comes_from_the_job_then_the_team_then_the_default(api: TestClient, store: JobStore) -> None:
    own = api.post("/v1/jobs", json={**SPEC, "retention_days": 0.5}, headers=A).json()
    assert own["retention_days"] == 0.5 and own["expires_at"] is None  # counted from the job's end
    assert "retention_days" not in own["spec"]  # not part of the data, nor of its hash
    assert api.post("/v1/jobs", json=SPEC, headers=A).json()["retention_days"] is None  # kept until deleted
    team = api.post("/v1/jobs", json=SPEC, headers=B).json()
    assert team["retention_days"] == 7
    store.transition(team["id"], "running")
    store.transition(team["id"], "succeeded")
    assert api.get(f"/v1/jobs/{team['id']}", headers=B).json()["expires_at"]


@pytest.mark.parametrize("value", [0, -1, "7", 36501, True, None])
def test_bad_retention_is_a_422_naming_the_field(api: TestClient, value: Any) -> None:
    if value is None:
        r = api.post("/v1/jobs", json={**SPEC, "retention_days": value}, headers=A)
        assert r.status_code == 202  # null: the team's default
        return
    problem(api.post("/v1/jobs", json={**SPEC, "retention_days": value}, headers=A), 422, "retention_days")


def test_an_idempotency_key_with_another_retention_is_another_body(api: TestClient) -> None:
    h = {**A, "Idempotency-Key": "k-retention"}
    assert api.post("/v1/jobs", json=SPEC, headers=h).status_code == 202
    assert problem(api.post("/v1/jobs", json={**SPEC, "retention_days": 3}, headers=h), 422,
                   "Idempotency-Key")["code"] == "idempotency_key_reused"


def test_reuse_answers_the_team_s_identical_succeeded_job_and_counts_nothing(
        api: TestClient, store: JobStore, storage: RecordingStorage) -> None:
    first = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    _succeed(store, storage, first)
    store.publish_models("w1", {p["name"]: {"ok": True, "reason": "", "sha256": p["sha256"]}
                                for p in PINS.values()})
    def counted() -> tuple[int, int]:  # what the quota counts (not its clock: resets_in_s moves)
        q = api.get("/v1/quota", headers=A).json()
        return q["concurrent_jobs"]["used"], q["images_per_day"]["used"]

    before = counted()
    gpu = store.r.llen("gpu")
    # Other metadata (a new CI run) and a webhook change no byte of the dataset.
    again = {**SPEC, "metadata": {"commit": "def"}, "reuse": "if_identical"}
    r = api.post("/v1/jobs", json=again, headers=A)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == first and r.json()["reused"] is True
    assert r.headers["location"] == f"http://testserver/v1/jobs/{first}"
    assert store.r.llen("gpu") == gpu  # nothing enqueued
    assert counted() == before  # nothing counted
    # Off by default; never across teams; another seed is another dataset.
    assert api.post("/v1/jobs", json={**SPEC, "metadata": {"commit": "def"}}, headers=A).status_code == 202
    assert api.post("/v1/jobs", json=again, headers=B).status_code == 202
    assert api.post("/v1/jobs", json={**again, "seed": 9}, headers=A).status_code == 202


def test_reuse_is_refused_with_a_reason_when_pins_changed_or_the_data_is_deleted(
        api: TestClient, store: JobStore, storage: RecordingStorage) -> None:
    first = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    _succeed(store, storage, first)
    store.publish_models("w1", {"arc2face-tiny": {"ok": True, "reason": "", "sha256": {"a.safetensors": "3" * 64}},
                                "iresnet-tiny": {"ok": True, "reason": "", "sha256": PINS["embedder"]["sha256"]}})
    r = api.post("/v1/jobs", json={**SPEC, "reuse": "if_identical"}, headers=A)
    assert r.status_code == 202 and r.json()["id"] != first
    notes = [e for e in store.events(r.json()["id"]) if e["type"] == "reuse"]
    assert len(notes) == 1 and first in notes[0]["note"] and "arc2face-tiny" in notes[0]["note"]

    store.publish_models("w1", {p["name"]: {"ok": True, "reason": "", "sha256": p["sha256"]} for p in PINS.values()})
    assert api.post("/v1/jobs", json={**SPEC, "reuse": "if_identical"}, headers=A).status_code == 200
    api.delete(f"/v1/jobs/{first}", headers=A)
    r = api.post("/v1/jobs", json={**SPEC, "reuse": "if_identical"}, headers=A)
    assert r.status_code == 202 and r.json()["id"] != first  # a deleted dataset is never answered


def test_bad_reuse_value_is_a_422(api: TestClient) -> None:
    problem(api.post("/v1/jobs", json={**SPEC, "reuse": "always"}, headers=A), 422, "reuse")


def test_edge_date_times_and_an_empty_metadata_key_are_taken(api: TestClient) -> None:
    for query in ("created_after=0000-01-01T00:00:00Z", "created_before=2026-12-31T23:59:60Z",
                  "created_after=1990-01-01t00:00:00.123456-23:59", "metadata[]=x"):
        r = api.get(f"/v1/jobs?{query}", headers=A)
        assert r.status_code == 200, (query, r.text)


def test_list_filters_by_metadata_and_creation_time_over_http(api: TestClient) -> None:
    a = api.post("/v1/jobs", json=SPEC, headers=A).json()
    b = api.post("/v1/jobs", json={**SPEC, "seed": 2, "metadata": {"commit": "def", "ci": "7"}}, headers=A).json()
    api.post("/v1/jobs", json=SPEC, headers=B)

    def ids(params: dict[str, Any]) -> list[str]:
        r = api.get("/v1/jobs", params=params, headers=A)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["jobs"]]

    assert ids({"metadata[commit]": "abc"}) == [a["id"]]
    assert ids({"metadata[commit]": "def", "metadata[ci]": "7"}) == [b["id"]]
    assert ids({"metadata[commit]": "def", "metadata[ci]": "8"}) == []
    assert ids({"created_after": b["created_at"]}) == [b["id"]]
    assert ids({"created_before": b["created_at"]}) == [a["id"]]
    assert ids({"created_after": a["created_at"], "metadata[commit]": "abc", "status": "queued"}) == [a["id"]]


@pytest.mark.parametrize(("query", "field"), [
    ("metadata=abc", "query.metadata"),
    ("metadata[k=abc", "query.metadata[k"),
    ("metadata[k]=1&metadata[k]=2", "query.metadata[k]"),
    ("metadata[k]=" + "x" * 1100, "query.metadata[k]"),
    ("metadata[" + "k" * 300 + "]=v", "query.metadata[" + "k" * 300 + "]"),
    ("created_after=yesterday", "query.created_after"),
    ("created_after=0.5", "query.created_after"),  # a number is not a date-time
    ("created_after=20261201T000000Z", "query.created_after"),  # ISO 8601 basic, not RFC 3339
    ("created_after=2026-12-01T00:00:00", "query.created_after"),  # no offset: which day is it?
    ("created_before=2026-13-01T00:00:00Z", "query.created_before"),
])
def test_bad_list_filters_are_a_422_naming_the_parameter(api: TestClient, query: str, field: str) -> None:
    problem(api.get(f"/v1/jobs?{query}", headers=A), 422, field)
