"""`sampler.exclude` at the HTTP edge: the jobs it names must be the team's own, succeeded, not
deleted, and of the same generator and embedder; anything else is a 422 naming the entry, before
a job is made. Malformed entries and bounds are refused by the spec's schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.jobstore import JobStore
from app.servers import RedisServer
from app.settings import Settings
from tests.api.test_api import SPEC, A, B, problem
from tests.conftest import TEAM_KEYS

LATENT = {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"}


@pytest.fixture
def api(redis_server: RedisServer, store: JobStore, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS, storage_dir=tmp_path / "storage",
                        public_url="http://testserver")
    with TestClient(create_app(settings)) as c:
        yield c


def _done(api: TestClient, store: JobStore, spec: dict[str, Any] = SPEC, headers: dict[str, str] = A) -> str:
    job_id: str = api.post("/v1/jobs", json=spec, headers=headers).json()["id"]
    store.transition(job_id, "running")
    store.transition(job_id, "succeeded")
    return job_id


def _excluding(*names: str, **extra: Any) -> dict[str, Any]:
    return {**SPEC, "sampler": {"method": "random", "exclude": list(names), **extra}}


def test_excluding_the_team_s_succeeded_job_and_a_reference_set_is_accepted(api: TestClient, store: JobStore) -> None:
    first = _done(api, store)
    r = api.post("/v1/jobs", json=_excluding(first, "lfw-gallery", exclude_min_angle_deg=75), headers=A)
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["sampler"]["exclude"] == [first, "lfw-gallery"]
    assert r.json()["spec"]["sampler"]["exclude_min_angle_deg"] == 75


def test_excluded_jobs_that_cannot_be_used_are_a_422_naming_the_entry(api: TestClient, store: JobStore) -> None:
    ok = _done(api, store)
    theirs = _done(api, store, headers=B)
    live = api.post("/v1/jobs", json={**SPEC, "seed": 5}, headers=A).json()["id"]
    other_models = _done(api, store, {**SPEC, "models": LATENT, "variations": {"method": "dispersion"}})
    deleted = _done(api, store, {**SPEC, "seed": 6})
    api.delete(f"/v1/jobs/{deleted}", headers=A)
    for name, words in ((theirs, "of your team"), ("j" + "0" * 22, "of your team"), (live, "is queued"),
                        (other_models, "stylegan2-tiny"), (deleted, "was deleted")):
        body = problem(api.post("/v1/jobs", json=_excluding(ok, name), headers=A), 422, "sampler.exclude.1")
        assert body["code"] == "invalid_exclusion" and words in body["detail"], body
        assert problem(api.post("/v1/jobs?dry_run=true", json=_excluding(name), headers=A), 422,
                       "sampler.exclude.0")


def test_malformed_exclusions_are_refused_by_the_schema(api: TestClient) -> None:
    for sampler in ({"method": "random", "exclude": ["../etc/passwd"]},
                    {"method": "random", "exclude": ["a", "a"]},
                    {"method": "random", "exclude": ["a"] * 65},
                    {"method": "random", "exclude": ["a"], "exclude_min_angle_deg": 0},
                    {"method": "random", "exclude": ["a"], "exclude_min_angle_deg": 180}):
        r = api.post("/v1/jobs", json={**SPEC, "sampler": sampler}, headers=A)
        assert r.status_code == 422 and any(e["field"].startswith("sampler") for e in r.json()["errors"]), r.text


def test_an_extension_is_resolved_against_its_parent_before_the_job_is_made(api: TestClient, store: JobStore) -> None:
    parent = _done(api, store, {**SPEC, "identities": 4, "variations": {"cone_degrees": 25},
                                "output": {"formats": ["webdataset"]}, "metadata": {"set": "train"}})
    r = api.post("/v1/jobs", json={"extends": parent, "identities": 2, "metadata": {"set": "train-2"}}, headers=A)
    assert r.status_code == 202, r.text
    spec = r.json()["spec"]
    assert spec["extends"] == parent and spec["identities"] == 2 and spec["images_per_identity"] == 2
    assert spec["variations"]["cone_degrees"] == 25 and spec["output"]["formats"] == ["webdataset"]
    assert spec["output"]["label_offset"] == 4 and spec["sampler"]["exclude"] == [parent]
    assert spec["metadata"] == {"set": "train-2"} and spec["seed"] != SPEC["seed"]
    dry = api.post("/v1/jobs?dry_run=true", json={"extends": parent}, headers=A)
    assert dry.status_code == 200 and dry.json()["spec"]["output"]["label_offset"] == 4

    child = r.json()["id"]
    store.transition(child, "running")
    store.transition(child, "succeeded")
    grandchild = _done(api, store, {"extends": child})
    g = api.get(f"/v1/jobs/{grandchild}", headers=A).json()["spec"]
    assert g["output"]["label_offset"] == 6 and g["sampler"]["exclude"] == [parent, child]


def test_an_extension_of_a_job_that_cannot_be_extended_is_a_422_naming_extends(api: TestClient, store: JobStore) -> None:
    ok = _done(api, store)
    theirs = _done(api, store, headers=B)
    live = api.post("/v1/jobs", json={**SPEC, "seed": 5}, headers=A).json()["id"]
    deleted = _done(api, store, {**SPEC, "seed": 6})
    api.delete(f"/v1/jobs/{deleted}", headers=A)
    for parent, words in ((theirs, "of your team"), ("j" + "0" * 22, "of your team"), (live, "is queued"),
                          (deleted, "was deleted")):
        body = problem(api.post("/v1/jobs", json={"extends": parent}, headers=A), 422, "extends")
        assert body["code"] == "invalid_extension" and words in body["detail"], body
    for bad in ("../x", 5, ["j" + "0" * 22]):
        problem(api.post("/v1/jobs", json={"extends": bad}, headers=A), 422, "extends")
    body = problem(api.post("/v1/jobs", json={"extends": ok, "output": {"label_offset": 1}}, headers=A), 422,
                   "output.label_offset")
    assert "overlap" in body["detail"]
    problem(api.post("/v1/jobs", json={"extends": ok, "models": LATENT, "variations": {"method": "dispersion"}},
                     headers=A), 422, "sampler.exclude.0")  # another space: the parent cannot be excluded
    problem(api.post("/v1/jobs", json={**SPEC, "output": {"label_offset": 1 << 24}}, headers=A), 422,
            "output.label_offset")


def test_pure_packing_gets_the_restart_packer_and_says_so(api: TestClient) -> None:
    r = api.post("/v1/jobs", json={**SPEC, "sampler": {"method": "hyperface", "alpha": 0, "gallery_size": 8}},
                 headers=A)
    assert r.status_code == 202 and r.json()["spec"]["sampler"]["restarts"] == 8, r.text
    r = api.post("/v1/jobs", json={**SPEC, "sampler": {"method": "hyperface", "alpha": 0, "iterations": 300}},
                 headers=A)
    assert r.status_code == 202 and "restarts" not in r.json()["spec"]["sampler"]
    problem(api.post("/v1/jobs", json={**SPEC, "sampler": {"method": "hyperface", "alpha": 0, "restarts": 2,
                                                           "iterations": 300}}, headers=A), 422)


def test_a_job_from_a_preview_is_the_previews_job_and_may_change_only_what_is_not_data(
        api: TestClient, store: JobStore) -> None:
    full = {**SPEC, "identities": 9, "output": {"formats": ["webdataset"]}, "metadata": {"set": "train"}}
    r = api.post("/v1/jobs", json={**full, "preview": {"identities": 2}}, headers=A)
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["preview"] == {"identities": 2}
    preview = _done(api, store, {**full, "preview": {"identities": 2}})

    est = api.post("/v1/jobs?dry_run=true", json={"from_preview": preview}, headers=A)
    r = api.post("/v1/jobs", json={"from_preview": preview, "metadata": {"set": "full"}}, headers=A)
    assert r.status_code == 202, r.text
    spec = r.json()["spec"]
    assert spec["from_preview"] == {"job": preview, "identities": 2}
    assert "preview" not in spec and spec["identities"] == 9 and spec["output"]["formats"] == ["webdataset"]
    assert spec["metadata"] == {"set": "full"}  # not inherited: it describes this request
    # The object form is read the same way, and the API sets the count from the preview.
    again = api.post("/v1/jobs", json={"from_preview": {"job": preview, "identities": 7}}, headers=A)
    assert again.status_code == 202 and again.json()["spec"]["from_preview"] == {"job": preview, "identities": 2}
    # The dry run: the dataset's images, rendering only what the preview did not, and the plan's break.
    plain = api.post("/v1/jobs?dry_run=true", json=full, headers=A)
    assert est.status_code == plain.status_code == 200, est.text
    e, p = est.json(), plain.json()
    assert e["estimate"]["images"] == p["estimate"]["images"] == 18 and (e["shards"], p["shards"]) == (2, 1)
    ratio = e["estimate"]["breakdown"]["render_gpu_seconds"] / p["estimate"]["breakdown"]["render_gpu_seconds"]
    assert ratio == pytest.approx(7 / 9, rel=0.02)
    assert e["estimate"]["breakdown"]["sampling_gpu_seconds"] == 0

    for change, field in (({"seed": 2}, "seed"), ({"identities": 10}, "identities"),
                          ({"output": {"formats": ["recordio"]}}, "output.formats"),
                          ({"images_per_identity": 3}, "images_per_identity")):
        body = problem(api.post("/v1/jobs", json={"from_preview": preview, **change}, headers=A), 422, field)
        assert body["code"] == "invalid_preview" and preview in body["detail"]


def _a_preview(api: TestClient, store: JobStore) -> str:
    """A succeeded preview of team A."""
    return _done(api, store, {**SPEC, "seed": 8, "preview": {"identities": 1}})


def test_from_preview_of_a_job_that_is_no_preview_is_a_422_naming_it(api: TestClient, store: JobStore) -> None:
    plain = _done(api, store)
    theirs = _done(api, store, {**SPEC, "preview": {"identities": 1}}, headers=B)
    live = api.post("/v1/jobs", json={**SPEC, "seed": 4, "preview": {"identities": 1}}, headers=A).json()["id"]
    for given, words in ((plain, "not a preview"), (theirs, "of your team"), (live, "is queued"),
                         ("nope", "expected a job id"), (7, "expected"),
                         ({"identities": 2}, "expected")):
        body = problem(api.post("/v1/jobs", json={"from_preview": given}, headers=A), 422, "from_preview")
        assert body["code"] == "invalid_preview" and words in body["detail"], body
    body = problem(api.post("/v1/jobs", json={"extends": _a_preview(api, store)}, headers=A), 422, "extends")
    assert "is a preview" in body["detail"]
    body = problem(api.post("/v1/jobs", json={**SPEC, "preview": {"identities": 4}}, headers=A), 422, "preview")
    assert "more than the job's 3" in body["detail"]
    problem(api.post("/v1/jobs", json={**SPEC, "preview": {"identities": 0}}, headers=A), 422, "preview.identities")
