"""The HTTP edge in-process (FastAPI TestClient) against a real Redis; tasks land on the real
broker lists, with no worker consuming them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.jobstore import JobStore
from app.servers import RedisServer
from app.settings import Settings
from tests.conftest import TEAM_KEYS

A = {"Authorization": "Bearer key-alpha"}
B = {"Authorization": "Bearer key-beta"}
SPEC: dict[str, Any] = {"identities": 3, "images_per_identity": 2, "seed": 1}


@pytest.fixture
def api(redis_server: RedisServer, store: JobStore, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS,
                        storage_dir=tmp_path / "storage", max_identities=1000,
                        max_images_per_identity=64, max_total_images=10_000,
                        public_url="http://testserver")
    with TestClient(create_app(settings)) as c:
        yield c


def problem(r: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["type"].endswith(body["code"]) and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body  # type: ignore[no-any-return]


def test_submit_returns_202_location_and_enqueues(api: TestClient, store: JobStore) -> None:
    r = api.post("/v1/jobs", json=SPEC, headers=A)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"http://testserver/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"]["images_total"] == 6
    assert job["spec"]["sampler"] == {"method": "random"}  # normalised, defaults filled in
    assert r.headers["retry-after"]
    assert store.r.llen("gpu") == 1  # the sampling task is on the gpu queue
    g = api.get(f"/v1/jobs/{job['id']}", headers=A)
    assert g.status_code == 200 and g.json()["id"] == job["id"] and g.headers["etag"]
    assert api.get(f"/v1/jobs/{job['id']}", headers={**A, "If-None-Match": g.headers["etag"]}
                   ).status_code == 304


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"images_per_identity": 2}, "identities", "invalid_spec"),
        ({**SPEC, "identities": 0}, "identities", "invalid_spec"),
        ({**SPEC, "identities": 1001}, "identities", "over_limit"),
        ({**SPEC, "images_per_identity": 65}, "images_per_identity", "over_limit"),
        ({**SPEC, "identities": 1000, "images_per_identity": 11}, "images_per_identity",
         "over_limit"),
        ({**SPEC, "sampler": {"method": "annealing"}}, "sampler", "invalid_spec"),
        ({**SPEC, "sampler": {"method": "hyperface", "alpha": -1}}, "sampler.hyperface.alpha",
         "invalid_spec"),
        ({**SPEC, "models": {"generator": "no-such-model"}}, "models.generator", "unknown_model"),
        ({**SPEC, "models": {"embedder": "arc2face-tiny"}}, "models.embedder", "unknown_model"),
        ({**SPEC, "variations": {"method": "dispersion"}}, "variations.method",
         "incompatible_models"),
        ({**SPEC, "sampler": {"method": "langevin"}}, "sampler.method", "incompatible_models"),
        ({**SPEC, "sampler": {"method": "hyperface", "batch_size": 1}},
         "sampler.hyperface.batch_size", "invalid_spec"),
        ({**SPEC, "variations": {"target_cosine": 0}}, "variations.embedding_noise.target_cosine",
         "invalid_spec"),
        ({**SPEC, "render": {"steps": 0}}, "render.steps", "invalid_spec"),
        ({**SPEC, "render": {"mode": "fast"}, "models": {"generator": "stylegan2-tiny"}}, "render.mode",
         "incompatible_models"),
        ({**SPEC, "render": {"mode": "turbo"}}, "render.mode", "invalid_spec"),
        ({**SPEC, "output": {"image_format": "gif"}}, "output.image_format", "invalid_spec"),
        ({**SPEC, "unknown_field": 1}, "unknown_field", "invalid_spec"),
        ({**SPEC, "webhook": {"url": "not a url"}}, "webhook.url", "invalid_spec"),
    ],
)
def test_bad_specs_are_422_naming_the_field(api: TestClient, store: JobStore, body: Any,
                                            field: str, code: str) -> None:
    p = problem(api.post("/v1/jobs", json=body, headers=A), 422, field)
    assert p["code"] == code
    assert store.r.llen("gpu") == 0 and store.list_jobs("alpha")[0] == []  # nothing recorded


def test_incompatible_pair_message_names_the_valid_pairs(api: TestClient) -> None:
    p = problem(api.post("/v1/jobs", json={**SPEC, "variations": {"method": "disco"}},
                         headers=A), 422, "variations.method")
    assert "embedding_noise" in p["detail"] and "arc2face-tiny" in p["detail"]


def test_malformed_json_wrong_type_and_oversized_bodies(api: TestClient) -> None:
    p = problem(api.post("/v1/jobs", content=b'{"identities": 3,', headers={
        **A, "Content-Type": "application/json"}), 400)
    assert p["code"] == "malformed_json"
    problem(api.post("/v1/jobs", content=b"[1, 2]", headers={
        **A, "Content-Type": "application/json"}), 422, "(body)")
    problem(api.post("/v1/jobs", content=b"identities=3", headers={
        **A, "Content-Type": "application/x-www-form-urlencoded"}), 415)
    big = {**SPEC, "metadata": {f"k{i}": "x" * 4000 for i in range(20)}}
    problem(api.post("/v1/jobs", json=big, headers=A), 413)


def test_auth_missing_wrong_and_other_team(api: TestClient) -> None:
    p = problem(api.post("/v1/jobs", json=SPEC), 401)
    assert p["code"] == "unauthorized"
    problem(api.get("/v1/jobs", headers={"Authorization": "Bearer nope"}), 401)
    problem(api.get("/v1/jobs", headers={"Authorization": "Basic a2V5"}), 401)
    jid = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/events"),
                         ("GET", "/artifacts")):
        problem(api.request(method, f"/v1/jobs/{jid}{path}", headers=B), 404)
    assert api.get("/v1/jobs", headers=B).json()["jobs"] == []
    problem(api.get("/v1/jobs/j..%2Fetc", headers=A), 404)


def test_idempotency_same_body_one_job_other_body_422(api: TestClient, store: JobStore) -> None:
    h = {**A, "Idempotency-Key": "ci-run-42"}
    first = api.post("/v1/jobs", json=SPEC, headers=h)
    second = api.post("/v1/jobs", json=dict(reversed(list(SPEC.items()))), headers=h)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    p = problem(api.post("/v1/jobs", json={**SPEC, "seed": 2}, headers=h), 422, "Idempotency-Key")
    assert p["code"] == "idempotency_key_reused"
    assert len(api.get("/v1/jobs", headers=A).json()["jobs"]) == 1
    assert store.r.llen("gpu") == 1


def test_idempotency_key_in_flight_is_409(api: TestClient, store: JobStore) -> None:
    from app.spec import JobSpec

    spec = JobSpec.model_validate(SPEC)
    store.create("alpha", spec.normalized(), spec.spec_hash(), identities=3, images=6,
                 idempotency_key="busy", body_hash=spec.spec_hash())
    p = problem(api.post("/v1/jobs", json=SPEC, headers={**A, "Idempotency-Key": "busy"}), 409)
    assert p["code"] == "idempotency_key_in_flight"


def test_list_pagination_and_status_filter(api: TestClient) -> None:
    ids = [api.post("/v1/jobs", json={**SPEC, "seed": i}, headers=A).json()["id"] for i in range(5)]
    page = api.get("/v1/jobs?limit=2", headers=A).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2] and page["has_more"]
    rest = api.get(f"/v1/jobs?limit=10&after={page['next']}", headers=A).json()
    assert [j["id"] for j in rest["jobs"]] == ids[::-1][2:] and not rest["has_more"]
    api.post(f"/v1/jobs/{ids[0]}/cancel", headers=A)
    canceled = api.get("/v1/jobs?status=canceled", headers=A).json()["jobs"]
    assert [j["id"] for j in canceled] == [ids[0]]
    problem(api.get("/v1/jobs?status=done", headers=A), 422, "query.status")
    problem(api.get("/v1/jobs?limit=0", headers=A), 422, "query.limit")


def test_cancel_queued_job_events_and_artifacts_conflict(api: TestClient) -> None:
    jid = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    r = api.post(f"/v1/jobs/{jid}/cancel", headers=A)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert "retry-after" not in r.headers  # terminal
    assert api.post(f"/v1/jobs/{jid}/cancel", headers=A).json()["status"] == "canceled"
    events = api.get(f"/v1/jobs/{jid}/events", headers=A).json()["events"]
    assert [e["to"] for e in events] == ["queued", "canceled"]
    p = problem(api.get(f"/v1/jobs/{jid}/artifacts", headers=A), 409)
    assert p["code"] == "job_not_succeeded"


def test_models_health_and_readiness(api: TestClient) -> None:
    models = {m["name"]: m for m in api.get("/v1/models", headers=A).json()["models"]}
    assert models["arc2face-tiny"]["kind"] == "generator"
    assert models["iresnet-tiny"]["available"] is None  # no worker has checked yet
    assert api.get("/healthz").json()["status"] == "ok"
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"redis": "ok", "storage": "ok", "broker": "ok"}


def test_readiness_fails_when_redis_is_down(tmp_path: Path) -> None:
    from app.servers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(redis_url=dead, api_keys=TEAM_KEYS, storage_dir=tmp_path)
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["redis"] != "ok"
        problem(c.get("/v1/jobs", headers=A), 503)
        problem(c.post("/v1/jobs", json=SPEC, headers=A), 503)


def test_openapi_documents_the_job_spec(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert "identities" in str(body) or "JobSpec" in str(doc["components"])


def test_events_stream_as_server_sent_events(api: TestClient) -> None:
    jid = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    api.post(f"/v1/jobs/{jid}/cancel", headers=A)
    with api.stream("GET", f"/v1/jobs/{jid}/events",
                    headers={**A, "Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())  # ends by itself: the job is terminal
    blocks = [b for b in text.split("\n\n") if b.startswith("id: ")]
    assert [b.splitlines()[1] for b in blocks] == ["event: status", "event: status"]
    assert '"to": "canceled"' in blocks[-1]
    # Resuming after the first event gives only the rest.
    first_id = blocks[0].splitlines()[0].removeprefix("id: ")
    rest = api.get(f"/v1/jobs/{jid}/events?after={first_id}", headers=A).json()["events"]
    assert [e["to"] for e in rest] == ["canceled"]


MAX_ID = "18446744073709551615-18446744073709551615"  # the largest id a Redis stream can hold
BAD_CURSORS = [
    "075-79099149165990222331",  # issue 13: the sequence overflows 64 bits
    "18446744073709551616-0",  # 2**64 ms
    "0-18446744073709551616",  # 2**64 seq
    "99999999999999999999999999999999999999-1",
    "-1-0", "0--1", "1", "1-", "-0", "abc", "1-x", "+", "$", ">", "01-0", "0-01", " 1-0",
    "\u0663-0", "0-\uff11",  # digits of other scripts: int() reads them, Redis does not
    "",
]


def _canceled_job(api: TestClient) -> str:
    jid: str = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    assert api.post(f"/v1/jobs/{jid}/cancel", headers=A).json()["status"] == "canceled"
    return jid


@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_events_malformed_cursor_is_422_naming_after(api: TestClient, cursor: str) -> None:
    jid = _canceled_job(api)
    for accept in ("application/json", "text/event-stream"):
        p = problem(api.get(f"/v1/jobs/{jid}/events", params={"after": cursor},
                            headers={**A, "Accept": accept}), 422, "query.after")
        assert p["code"] == "invalid_request" and "cursor" in p["detail"]


@pytest.mark.parametrize("cursor", [c for c in BAD_CURSORS if c])  # empty is the same as absent
def test_events_malformed_last_event_id_is_422_naming_it(api: TestClient, cursor: str) -> None:
    jid = _canceled_job(api)
    headers = [(b"Authorization", b"Bearer key-alpha"), (b"Accept", b"text/event-stream"),
               (b"Last-Event-ID", cursor.encode())]  # bytes: other scripts' digits go as UTF-8
    p = problem(api.get(f"/v1/jobs/{jid}/events", headers=headers), 422, "header.last-event-id")
    assert p["code"] == "invalid_request"


def test_events_well_formed_cursors_that_are_not_in_the_stream(api: TestClient) -> None:
    jid = _canceled_job(api)
    everything = api.get(f"/v1/jobs/{jid}/events", headers=A).json()["events"]
    assert [e["to"] for e in everything] == ["queued", "canceled"]
    for cursor in ("0-0", "1-0", "1-1", "18446744073709551615-0", "9223372036854775808-5", MAX_ID):
        r = api.get(f"/v1/jobs/{jid}/events", params={"after": cursor}, headers=A)
        assert r.status_code == 200, (cursor, r.text)
        ms = int(cursor.split("-")[0])
        expected = everything if ms < 10**12 else []
        assert r.json()["events"] == expected
        assert r.json()["next"] == (expected[-1]["id"] if expected else cursor)
    # A cursor between the two events (an id the stream does not hold) gives the second.
    ms, seq = (int(x) for x in everything[0]["id"].split("-"))
    between = f"{ms}-{seq + 1}" if everything[1]["id"] != f"{ms}-{seq + 1}" else everything[0]["id"]
    got = api.get(f"/v1/jobs/{jid}/events", params={"after": between}, headers=A).json()["events"]
    assert got == everything[1:]


def test_events_stream_resumes_from_last_event_id(api: TestClient) -> None:
    jid = _canceled_job(api)
    first = api.get(f"/v1/jobs/{jid}/events", headers=A).json()["events"][0]["id"]

    def stream(**headers: str) -> list[str]:
        with api.stream("GET", f"/v1/jobs/{jid}/events", params={"after": "-"},
                        headers={**A, "Accept": "text/event-stream", **headers}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
        return [b.splitlines()[0].removeprefix("id: ") for b in text.split("\n\n")
                if b.startswith("id: ")]

    everything = stream()
    assert len(everything) == 2 and everything[0] == first
    assert stream(**{"Last-Event-ID": first}) == everything[1:]  # wins over after=-
    assert stream(**{"Last-Event-ID": MAX_ID}) == []
    assert stream(**{"Last-Event-ID": ""}) == everything  # empty: as if absent


def test_every_query_and_header_value_that_reaches_redis_is_checked(api: TestClient) -> None:
    """Malformed list filters, limits and cursors are 422s naming the parameter, never 500s."""
    jid = _canceled_job(api)
    cases = [
        ("/v1/jobs", {"status": "done"}, "query.status"),
        ("/v1/jobs", {"status": ""}, "query.status"),
        ("/v1/jobs", {"limit": "0"}, "query.limit"),
        ("/v1/jobs", {"limit": "101"}, "query.limit"),
        ("/v1/jobs", {"limit": "99999999999999999999999"}, "query.limit"),
        ("/v1/jobs", {"limit": "1.5"}, "query.limit"),
        ("/v1/jobs", {"limit": "ten"}, "query.limit"),
        ("/v1/jobs", {"after": "J0123"}, "query.after"),
        ("/v1/jobs", {"after": ""}, "query.after"),
        ("/v1/jobs", {"after": "a\x00b"}, "query.after"),
        ("/v1/jobs", {"after": "\u0663"}, "query.after"),
        ("/v1/jobs", {"after": "a" * 65}, "query.after"),
        (f"/v1/jobs/{jid}/events", {"limit": "0"}, "query.limit"),
        (f"/v1/jobs/{jid}/events", {"limit": "1001"}, "query.limit"),
        (f"/v1/jobs/{jid}/events", {"limit": "-1"}, "query.limit"),
        (f"/v1/jobs/{jid}/events", {"after": "1-0" + "0" * 60}, "query.after"),
        (f"/v1/jobs/{jid}/artifacts", {"limit": "0"}, "query.limit"),
        (f"/v1/jobs/{jid}/artifacts", {"limit": "99999999999999999999999"}, "query.limit"),
    ]
    for path, params, field in cases:
        problem(api.get(path, params=params, headers=A), 422, field)
    # Well-formed values that match nothing are empty pages, not errors.
    page = api.get("/v1/jobs", params={"after": "0", "limit": "100"}, headers=A)
    assert page.status_code == 200 and page.json() == {"jobs": [], "has_more": False, "next": None}
    assert [j["id"] for j in api.get("/v1/jobs", params={"after": "z"}, headers=A).json()["jobs"]] == [jid]
    # Job ids that are not ids (non-ASCII letters, NUL, huge) are unknown jobs.
    for bad in ("j\u00e9", "%00", "J" + jid[1:], "a" * 5000):
        problem(api.get(f"/v1/jobs/{bad}/events", headers=A), 404)


@pytest.mark.parametrize(("raw", "status", "field"), [
    # A lone surrogate was stored, then every read of the job (and the team's list) was a 500.
    (b'{"identities": 1, "images_per_identity": 1, "metadata": {"run": "\\udc00x"}}', 422, "metadata.run"),
    (b'{"identities": 1, "images_per_identity": 1, "metadata": {"\\ud800": "x"}}', 422, "metadata.\\ud800"),
    (b'{"identities": 1, "images_per_identity": 1, "webhook": {"url": "http://a.example/\\ud800"}}', 422,
     "webhook.url"),
    # 1e400 parses as infinity: it was stored, and the 202 could not be written (a 500).
    (b'{"identities": 1, "images_per_identity": 1, "sampler": {"method": "hyperface", "alpha": 1e400}}', 422,
     "sampler.hyperface.alpha"),
    (b'{"identities": 1, "images_per_identity": 1, "variations": {"scale": -1e400}}', 422,
     "variations.embedding_noise.scale"),
    # Nesting past the parser's recursion limit (inside the body size limit) was a RecursionError.
    (b'{"identities": 1, "images_per_identity": 1, "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    (b'{"identities": 1, "images_per_identity": 1, "metadata": ' + b"[" * 600 + b"]" * 600 + b"}", 400, None),
])
def test_bodies_that_cannot_be_stored_are_refused_before_redis(api: TestClient, store: JobStore, raw: bytes,
                                                               status: int, field: str | None) -> None:
    p = problem(api.post("/v1/jobs", content=raw, headers={**A, "Content-Type": "application/json"}),
                status, field)
    assert p["code"] == ("malformed_json" if status == 400 else "invalid_spec")
    assert store.r.llen("gpu") == 0 and store.list_jobs("alpha")[0] == []  # nothing recorded
    listed = api.get("/v1/jobs", headers=A)
    assert listed.status_code == 200 and listed.json()["jobs"] == []


# ---- artifacts: paging the Parquet index ------------------------------------------------------------


def _succeeded_job(api: TestClient, store: JobStore, tmp_path: Path, *, shards: int = 3, per_shard: int = 7,
                   old_format: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """A succeeded job whose storage holds an index of `shards` row groups (each: `per_shard` kept
    images, then a filtered row) and a manifest pinning it; or an old manifest with `files` inline."""
    import hashlib

    from workers.outputs.index import ParquetIndexWriter

    jid = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    store.transition(jid, "running")
    root = tmp_path / "storage" / "jobs" / jid
    (root / "dataset").mkdir(parents=True)
    kept: list[dict[str, Any]] = []
    with (root / "dataset/index.parquet").open("wb") as f, ParquetIndexWriter(f) as w:
        for k in range(shards):
            rows = [{"path": f"dataset/imagefolder/{k:06d}/{s:03d}.jpg", "identity": k, "sample": s, "seed": s,
                     "shard": k, "size": 1, "sha256": f"{k * 100 + s:064d}", "aligned": True, "filtered": False,
                     "centre_cosine": 0.5} for s in range(per_shard)]
            rows.append({"identity": k, "sample": per_shard, "seed": 0, "shard": k, "aligned": True,
                         "filtered": True, "centre_cosine": 0.1})
            w.write_rows(rows)
            kept += rows[:-1]
    data = (root / "dataset/index.parquet").read_bytes()
    pin = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    # a tar per shard, listed by the shard-objects table the manifest pins
    (root / "dataset/webdataset").mkdir()
    lines = b""
    for k in range(shards):
        tar = f"tar {k}".encode()
        (root / f"dataset/webdataset/{k:06d}.tar").write_bytes(tar)
        lines += json.dumps({"path": f"dataset/webdataset/{k:06d}.tar", "shard": k, "size": len(tar),
                             "sha256": hashlib.sha256(tar).hexdigest()}).encode() + b"\n"
    (root / "dataset/objects.jsonl").write_bytes(lines)
    table = {"sha256": hashlib.sha256(lines).hexdigest(), "size": len(lines), "rows": shards}
    manifest: dict[str, Any] = {"format": "idforge.manifest/3", "manifest_version": 3, "job_id": jid,
                                "outputs": {"dataset/index.parquet": pin, "dataset/objects.jsonl": table},
                                "index": {"path": "dataset/index.parquet", **pin}}
    if old_format:
        manifest = {"format": "idforge.manifest/2", "job_id": jid, "outputs": {"dataset/index.parquet": pin},
                    "files": [{k: v for k, v in r.items() if k != "filtered"} for r in kept]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert store.transition(jid, "succeeded", result={"images": len(kept)})[0]
    return jid, kept


def _pages(api: TestClient, jid: str, limit: int) -> list[dict[str, Any]]:
    pages = [api.get(f"/v1/jobs/{jid}/artifacts", params={"limit": limit}, headers=A).json()]
    while pages[-1]["has_more"]:
        pages.append(api.get(f"/v1/jobs/{jid}/artifacts", params={"limit": limit, "after": pages[-1]["next"]},
                             headers=A).json())
    return pages


@pytest.mark.parametrize("old_format", [False, True])
@pytest.mark.parametrize("limit", [1, 5, 7, 8, 21, 1000])
def test_artifacts_page_every_image_once_in_order(api: TestClient, store: JobStore, tmp_path: Path,
                                                  limit: int, old_format: bool) -> None:
    jid, kept = _succeeded_job(api, store, tmp_path, old_format=old_format)
    pages = _pages(api, jid, limit)
    got = [f for p in pages for f in p["files"]]
    assert [(f["identity"], f["sample"]) for f in got] == [(r["identity"], r["sample"]) for r in kept]
    assert [f["sha256"] for f in got] == [r["sha256"] for r in kept]  # the filtered rows are not listed
    assert all(f["url"] and f["path"] for f in got)
    assert len(pages) == -(-len(kept) // limit) and all(len(p["files"]) == limit for p in pages[:-1])
    assert pages[-1]["next"] is None and not pages[-1]["has_more"]
    assert all(p["next"] for p in pages[:-1])
    assert "files" not in pages[0]["manifest"]


def test_artifacts_page_lists_the_tars_of_its_own_shards(api: TestClient, store: JobStore, tmp_path: Path) -> None:
    jid, _ = _succeeded_job(api, store, tmp_path, shards=3, per_shard=7)
    pages = _pages(api, jid, 5)  # rows 0-4 | 5-6 + 7-9 | 10-13 + 14 | 15-19 | 20
    job_level = {"dataset/index.parquet", "dataset/objects.jsonl"}
    for page in pages:
        objects = {o["path"]: o for o in page["objects"]}
        shards = sorted({f["shard"] for f in page["files"]})
        assert set(objects) == job_level | {f"dataset/webdataset/{k:06d}.tar" for k in shards}
        for k in shards:
            tar = objects[f"dataset/webdataset/{k:06d}.tar"]
            assert tar["shard"] == k and tar["sha256"] == hashlib.sha256(f"tar {k}".encode()).hexdigest()
            assert tar["url"]
    assert [sorted({f["shard"] for f in p["files"]}) for p in pages] == [[0], [0, 1], [1, 2], [2], [2]]
    # the manifest the API returns does not list the tars either
    assert not [k for k in pages[0]["manifest"]["outputs"] if k.startswith("dataset/webdataset/")]


def test_artifacts_cursor_that_is_not_this_listings_is_422_naming_after(api: TestClient, store: JobStore,
                                                                        tmp_path: Path) -> None:
    import base64

    from app import dataset_index

    jid, kept = _succeeded_job(api, store, tmp_path)
    other, _ = _succeeded_job(api, store, tmp_path)
    nxt = api.get(f"/v1/jobs/{jid}/artifacts", params={"limit": 3}, headers=A).json()["next"]
    raw = base64.urlsafe_b64decode(nxt + "=" * (-len(nxt) % 4)).decode()
    sha = json.loads((tmp_path / "storage/jobs" / jid / "manifest.json").read_text())["index"]["sha256"]
    edited = base64.urlsafe_b64encode(("0.4." + raw.split(".")[2]).encode()).decode().rstrip("=")
    for bad in ("x", "dataset/imagefolder/000000/000.jpg", "!!!", nxt + "A", edited, "0.0.0",
                dataset_index.encode_cursor(f"{jid}|{sha}", 3, 0),  # past the last row group
                dataset_index.encode_cursor(f"{jid}|{sha}", 0, 8),  # past the row group's rows
                base64.urlsafe_b64encode(b"\xff\xfe").decode()):
        p = problem(api.get(f"/v1/jobs/{jid}/artifacts", params={"after": bad}, headers=A), 422, "query.after")
        assert p["code"] == "invalid_request"
    # another job's cursor is not this one's
    problem(api.get(f"/v1/jobs/{other}/artifacts", params={"after": nxt}, headers=A), 422, "query.after")
    # the cursor resumes where the page ended
    rest = api.get(f"/v1/jobs/{jid}/artifacts", params={"after": nxt, "limit": 2}, headers=A).json()
    assert [(f["identity"], f["sample"]) for f in rest["files"]] == [(0, 3), (0, 4)]


def test_artifacts_old_manifest_still_takes_a_path_cursor(api: TestClient, store: JobStore, tmp_path: Path) -> None:
    jid, kept = _succeeded_job(api, store, tmp_path, old_format=True)
    page = api.get(f"/v1/jobs/{jid}/artifacts", params={"after": kept[2]["path"], "limit": 2}, headers=A).json()
    assert [f["path"] for f in page["files"]] == [kept[3]["path"], kept[4]["path"]] and page["has_more"]
    problem(api.get(f"/v1/jobs/{jid}/artifacts", params={"after": "no/such/path"}, headers=A), 422, "query.after")


def test_artifacts_page_reads_the_footer_once_and_one_row_group(api: TestClient, store: JobStore,
                                                                tmp_path: Path, monkeypatch: Any) -> None:
    """A page's reads: the footer once per job (cached), then one ranged read per row group it spans."""
    from app.api import jobs_service
    from app.storage import LocalStorage

    jid, kept = _succeeded_job(api, store, tmp_path, shards=40, per_shard=5)
    reads: list[tuple[int, int]] = []
    real = LocalStorage.get_range

    def counting(self: LocalStorage, key: str, start: int, length: int) -> bytes:
        reads.append((start, length))
        return real(self, key, start, length)

    monkeypatch.setattr(LocalStorage, "get_range", counting)
    jobs_service.FOOTERS._items.clear()
    first = api.get(f"/v1/jobs/{jid}/artifacts", params={"limit": 5}, headers=A).json()
    assert len(reads) == 2  # the footer (the tail) and row group 0
    reads.clear()
    after = first["next"]
    for _ in range(38):
        page = api.get(f"/v1/jobs/{jid}/artifacts", params={"limit": 5, "after": after}, headers=A).json()
        after = page["next"]
    assert len(reads) == 38  # one row group each, no footer again
    reads.clear()
    last = api.get(f"/v1/jobs/{jid}/artifacts", params={"limit": 5, "after": after}, headers=A).json()
    assert len(reads) == 1 and not last["has_more"] and last["files"][-1]["identity"] == 39
