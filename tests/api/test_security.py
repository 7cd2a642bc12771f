"""Security and limits against a real Redis and the real API: hashed keys and their scopes, team
isolation on every job route, presigned URLs (local and S3) that expire and resist tampering, rate
limits, per-team quotas, oversized bodies, and storage keys no spec field can steer."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.api import limits
from app.api.auth import KeyRing
from app.api.main import create_app
from app.credentials import SCOPES, effective_scopes, key_digest, key_id, parse_key_entries
from app.errors import TooManyRequests
from app.jobstore import JobStore
from app.layout import JobKeys
from app.servers import RedisServer, free_port
from app.settings import Settings
from app.spec import JobSpec, plan_shards
from app.storage import LocalStorage, S3Storage, Storage, sha256_hex
from tests.conftest import TEAM_KEYS
from workers.cli import main as cli_main

A = {"Authorization": "Bearer key-alpha"}
B = {"Authorization": "Bearer key-beta"}
SPEC: dict[str, Any] = {"identities": 3, "images_per_identity": 2, "seed": 1}  # 6 images
SECRET = "security-test-secret"
BASE: dict[str, Any] = {"api_keys": TEAM_KEYS, "secret_key": SECRET, "public_url": "http://testserver",
                        "max_identities": 1000, "max_images_per_identity": 64,
                        "max_total_images": 10_000}

MakeApi = Callable[..., TestClient]


def settings_for(redis_server: RedisServer, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(**{**BASE, "redis_url": redis_server.url, "storage_dir": tmp_path / "storage",
                       **overrides})


@pytest.fixture
def make_api(redis_server: RedisServer, store: JobStore, tmp_path: Path) -> Iterator[MakeApi]:
    """TestClients of the real app on the (flushed) test Redis; settings overridable."""
    with ExitStack() as stack:
        def make(**overrides: Any) -> TestClient:
            app = create_app(settings_for(redis_server, tmp_path, **overrides))
            return stack.enter_context(TestClient(app))
        yield make


def problem(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    if code is not None:
        assert body["code"] == code, body
    return body


def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage", signing_key=SECRET.encode(), base_url="http://testserver")


def seed_succeeded(store: JobStore, storage: Storage, owner: str, seed: int = 5) -> str:
    """A succeeded job of `owner` with one image and its manifest in storage (no worker)."""
    spec = JobSpec.model_validate({**SPEC, "seed": seed})
    job_id = store.create(owner, spec.normalized(), spec.spec_hash(), identities=3, images=6).job_id
    keys = JobKeys.for_job("jobs", job_id)
    image = f"image of {owner}".encode()
    storage.put_bytes(keys.key("dataset/imagefolder/000000/000.jpg"), image)
    files = [{"path": "dataset/imagefolder/000000/000.jpg", "identity": 0, "sample": 0,
              "sha256": sha256_hex(image), "bytes": len(image)}]
    storage.put_bytes(keys.manifest, json.dumps({"job_id": job_id, "files": files}).encode())
    store.transition(job_id, "running")
    store.transition(job_id, "succeeded", result={"manifest": keys.manifest, "images": 1})
    return job_id


def redis_dump(r: Any) -> str:
    """Every key and value in the database, as text."""
    out = []
    for k in r.scan_iter(count=1000):
        kind = r.type(k)
        value: Any = {"string": r.get, "hash": r.hgetall, "set": r.smembers,
                      "zset": lambda x: r.zrange(x, 0, -1), "list": lambda x: r.lrange(x, 0, -1),
                      "stream": lambda x: r.xrange(x)}.get(kind, lambda x: None)(k)
        out.append(f"{k} {value}")
    return "\n".join(out)


# ---- keys: hashed, scoped, revocable ---------------------------------------------------------

def test_key_entries_plaintext_digest_and_scopes() -> None:
    ops_key = "ops-key-1234567890"
    entries = parse_key_entries(f"alpha:k1, ops:sha256:{key_digest(ops_key).upper()}:read+submit,"
                                "ci:k3:read")
    assert [(e.team, sorted(e.scopes)) for e in entries] == [
        ("alpha", sorted(SCOPES)), ("ops", ["read", "submit"]), ("ci", ["read"])]
    assert entries[1].digest == key_digest(ops_key) and entries[1].plaintext is None
    assert entries[0].digest == hashlib.sha256(b"k1").hexdigest()
    assert "k1" not in repr(entries[0])  # the plaintext stays out of reprs and logs
    assert effective_scopes({"submit"}) == {"submit", "read"}
    assert effective_scopes({"admin"}) == {"admin"}


@pytest.mark.parametrize(("text", "message"), [
    ("alpha", "entry 1: expected"),
    ("alpha:", "entry 1: expected"),
    ("ok:k0,al/pha:k-secret-value", "entry 2: team"),
    ("alpha:k-secret-value:write", "entry 1: unknown scope 'write'"),
    ("alpha:k-secret-value:", "entry 1: a key needs at least one scope"),
    ("alpha:sha256:abc123", "entry 1: a sha256 digest is 64 hex digits"),
    ("alpha:k-secret-value:read:more", "entry 1: too many ':'"),
    ("alpha:k-secret-value,beta:k-secret-value", "entry 2: the same key is already entry 1"),
])
def test_bad_key_entries_are_refused_without_echoing_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_key_entries(text)
    assert "k-secret-value" not in str(info.value)
    with pytest.raises(ValidationError) as v:
        Settings(api_keys=text)
    assert "k-secret-value" not in str(v.value) and "IDFORGE_API_KEYS" in str(v.value)


def test_keys_are_stored_hashed_shown_once_and_revocable(make_api: MakeApi, store: JobStore) -> None:
    api = make_api()
    r = api.post("/v1/keys", json={"scopes": ["read"], "name": "dashboard"}, headers=A)
    assert r.status_code == 201, r.text
    made = r.json()
    key, kid = made["key"], made["id"]
    assert r.headers["cache-control"] == "no-store"
    assert made["team"] == "alpha" and made["scopes"] == ["read"] and made["name"] == "dashboard"
    assert kid == key_id(key_digest(key)) and made["active"]
    # Redis holds the digest and the record, never the key.
    dump = redis_dump(store.r)
    assert key not in dump and "key-alpha" not in dump
    record = store.r.hgetall(f"idf:apikey:{key_digest(key)}")
    assert record["team"] == "alpha" and record["scopes"] == "read" and record["created_at"]
    listing = api.get("/v1/keys", headers=A)
    assert key not in listing.text
    ids = {k["id"]: k for k in listing.json()["keys"]}
    assert ids[kid]["source"] == "redis" and "key" not in ids[kid]
    assert ids[key_id(key_digest("key-alpha"))]["source"] == "env"
    # The new key reads but does not submit.
    mine = {"Authorization": f"Bearer {key}"}
    assert api.get("/v1/jobs", headers=mine).status_code == 200
    p = problem(api.post("/v1/jobs", json=SPEC, headers=mine), 403, "insufficient_scope")
    assert "'submit'" in p["detail"]
    # Revoked: refused at once, by every API process (the revocation is in Redis).
    other_process = make_api()
    gone = api.delete(f"/v1/keys/{kid}", headers=A)
    assert gone.status_code == 200 and gone.json()["revoked_at"] and not gone.json()["active"]
    p = problem(other_process.get("/v1/jobs", headers=mine), 401, "unauthorized")
    assert "revoked" in p["detail"]
    assert api.delete(f"/v1/keys/{kid}", headers=A).json()["revoked_at"] == gone.json()["revoked_at"]


def test_digest_entries_authenticate_and_name_the_missing_scope(make_api: MakeApi) -> None:
    key = "ops-plaintext-never-in-env"
    api = make_api(api_keys=f"ops:sha256:{key_digest(key)}:read")
    ops = {"Authorization": f"Bearer {key}"}
    assert api.get("/v1/jobs", headers=ops).status_code == 200
    r = api.post("/v1/jobs", json=SPEC, headers=ops)
    p = problem(r, 403, "insufficient_scope")
    assert "'submit'" in p["detail"] and "read" in p["detail"]
    assert 'scope="submit"' in r.headers["www-authenticate"]
    problem(api.get("/v1/jobs", headers={"Authorization": f"Bearer {key_digest(key)}"}), 401)


# route, method, the scope it needs
ROUTES = [
    ("GET", "/v1/jobs", "read"),
    ("GET", "/v1/jobs/{job}", "read"),
    ("GET", "/v1/jobs/{job}/events", "read"),
    ("GET", "/v1/jobs/{job}/artifacts", "read"),
    ("GET", "/v1/models", "read"),
    ("GET", "/v1/quota", "read"),
    ("POST", "/v1/jobs", "submit"),
    ("POST", "/v1/jobs/{job}/cancel", "submit"),
    ("GET", "/v1/keys", "admin"),
    ("POST", "/v1/keys", "admin"),
    ("DELETE", "/v1/keys/key_0000000000000000", "admin"),
]


@pytest.mark.parametrize("scopes", [("read",), ("submit",), ("admin",), ("read", "admin")])
def test_each_route_requires_its_scope(make_api: MakeApi, store: JobStore, tmp_path: Path,
                                       scopes: tuple[str, ...]) -> None:
    api = make_api()
    job = seed_succeeded(store, local_storage(tmp_path), "alpha")
    key, _ = KeyRing(store.r).create("alpha", scopes, "scope test")
    h = {"Authorization": f"Bearer {key}"}
    bodies = {"/v1/jobs": SPEC, "/v1/keys": {"scopes": ["read"]}}
    for method, path, needs in ROUTES:
        r = api.request(method, path.format(job=job), headers=h, json=bodies.get(path) if method == "POST"
                        else None)
        if needs in effective_scopes(scopes):
            assert r.status_code in (200, 201, 202, 404 if method == "DELETE" else 200), (path, r.text)
        else:
            p = problem(r, 403, "insufficient_scope")
            assert f"'{needs}'" in p["detail"], (path, p)


# ---- isolation -------------------------------------------------------------------------------

def test_another_team_finds_nothing_on_any_job_route(make_api: MakeApi, store: JobStore,
                                                     tmp_path: Path) -> None:
    api = make_api()
    done = seed_succeeded(store, local_storage(tmp_path), "alpha")
    queued = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
    visited: set[tuple[str, str]] = set()
    for job in (done, queued):
        for method, suffix in (("GET", ""), ("POST", "/cancel"), ("GET", "/events"),
                               ("GET", "/artifacts")):
            problem(api.request(method, f"/v1/jobs/{job}{suffix}", headers=B), 404, "not_found")
            visited.add((method, "/v1/jobs/{job_id}" + suffix))
        problem(api.get(f"/v1/jobs/{job}/events?after=0-0", headers=B), 404)
        with api.stream("GET", f"/v1/jobs/{job}/events",
                        headers={**B, "Accept": "text/event-stream"}) as r:
            assert r.status_code == 404
    # Every route under a job id was walked (a new one must be added here, and be isolated).
    job_routes = {(m, route.path) for route in api.app.routes  # type: ignore[attr-defined]
                  if "{job_id}" in getattr(route, "path", "") for m in getattr(route, "methods", ())}
    assert job_routes <= visited, job_routes - visited
    for status in ("", "?status=queued", "?status=succeeded"):
        assert api.get(f"/v1/jobs{status}", headers=B).json()["jobs"] == []
    # Beta's cancel changed nothing; alpha still sees both jobs.
    assert api.get(f"/v1/jobs/{queued}", headers=A).json()["status"] == "queued"
    assert {j["id"] for j in api.get("/v1/jobs", headers=A).json()["jobs"]} == {done, queued}
    # Quotas are the team's own: alpha's queued job is not beta's.
    assert api.get("/v1/quota", headers=B).json()["concurrent_jobs"]["used"] == 0
    assert api.get("/v1/quota", headers=A).json()["concurrent_jobs"]["used"] == 1
    # Keys too: beta's admin cannot see or revoke alpha's.
    alpha_kid = key_id(key_digest("key-alpha"))
    assert alpha_kid not in api.get("/v1/keys", headers=B).text
    problem(api.delete(f"/v1/keys/{alpha_kid}", headers=B), 404)
    assert api.get("/v1/jobs", headers=A).status_code == 200


def test_local_download_urls_go_to_the_owner_expire_and_resist_tampering(
        make_api: MakeApi, store: JobStore, tmp_path: Path) -> None:
    api = make_api(presign_expiry_s=600)
    storage = local_storage(tmp_path)
    job, other = seed_succeeded(store, storage, "alpha"), seed_succeeded(store, storage, "beta", 6)
    problem(api.get(f"/v1/jobs/{job}/artifacts", headers=B), 404)  # issued only to the owner
    t0 = time.time()
    art = api.get(f"/v1/jobs/{job}/artifacts", headers=A).json()
    assert art["expires_in"] == 600
    url = art["files"][0]["url"]
    assert api.get(url).content == b"image of alpha"
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert 599 <= int(q["expires"]) - t0 <= 601
    sig, expires = q["sig"], int(q["expires"])
    mine = f"jobs/{job}/dataset/imagefolder/000000/000.jpg"
    theirs = f"jobs/{other}/dataset/imagefolder/000000/000.jpg"
    tampered = [
        f"/v1/files/{quote(theirs)}?expires={expires}&sig={sig}",  # the signature, on beta's object
        f"/v1/files/jobs/{job}/manifest.json?expires={expires}&sig={sig}",  # on another object
        f"/v1/files/{quote(mine)}?expires={expires + 3600}&sig={sig}",  # a later expiry
        f"/v1/files/{quote(mine)}?expires={expires}&sig={sig[:-1]}{'0' if sig[-1] != '0' else '1'}",
        # signed correctly, but expired a second ago
        (f"/v1/files/{quote(mine)}?expires={int(time.time()) - 1}"
         f"&sig={storage.signature(mine, int(time.time()) - 1)}"),
    ]
    for path in tampered:
        problem(api.get(path), 401, "bad_signature")
    problem(api.get(f"/v1/files/{quote(mine)}?expires={expires}"), 422)  # no signature at all


@pytest.mark.integration
def test_s3_presigned_urls_carry_the_expiry_and_the_server_enforces_it(
        make_api: MakeApi, store: JobStore, tmp_path: Path) -> None:
    from tests.servers import S3_KEY, S3_SECRET, SeaweedS3

    s3 = SeaweedS3(tmp_path / "weed")
    try:
        s3.start(bucket="sec")
        api = make_api(storage="s3", s3_bucket="sec", s3_endpoint_url=s3.endpoint,
                       s3_access_key_id=S3_KEY, s3_secret_access_key=S3_SECRET, presign_expiry_s=2)
        job = seed_succeeded(store, S3Storage("sec", client=s3.client()), "alpha")
        problem(api.get(f"/v1/jobs/{job}/artifacts", headers=B), 404)
        art = api.get(f"/v1/jobs/{job}/artifacts", headers=A).json()
        url = art["files"][0]["url"]
        assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["2"]
        assert httpx.get(url).content == b"image of alpha"
        time.sleep(3.5)
        late = httpx.get(url)
        assert late.status_code == 403 and b"image of alpha" not in late.content
    finally:
        s3.stop()


# ---- rate limits -----------------------------------------------------------------------------

def test_rate_limit_answers_429_with_retry_after_per_key(make_api: MakeApi) -> None:
    api = make_api(rate_limit_per_s=0.5, rate_limit_burst=3)
    assert [api.get("/v1/jobs", headers=A).status_code for _ in range(3)] == [200, 200, 200]
    r = api.get("/v1/jobs", headers=A)
    p = problem(r, 429, "rate_limited")
    assert r.headers["retry-after"] in ("1", "2") and "0.5 requests/s" in p["detail"]
    problem(api.get("/v1/jobs", headers=A), 429)  # a refused request takes no token...
    assert api.get("/v1/jobs", headers=B).status_code == 200  # ...and other keys have their own
    time.sleep(int(r.headers["retry-after"]))
    assert api.get("/v1/jobs", headers=A).status_code == 200
    problem(api.get("/v1/jobs", headers={"Authorization": "Bearer nope"}), 401)


def test_exempt_teams_and_a_zero_rate_are_not_limited(make_api: MakeApi) -> None:
    api = make_api(rate_limit_per_s=0.5, rate_limit_burst=1, rate_limit_exempt_teams="ci,beta")
    assert {api.get("/v1/jobs", headers=B).status_code for _ in range(15)} == {200}
    assert [api.get("/v1/jobs", headers=A).status_code for _ in range(2)] == [200, 429]
    off = make_api(rate_limit_per_s=0, rate_limit_burst=1)
    assert {off.get("/v1/models", headers=A).status_code for _ in range(15)} == {200}


class CountingConnection(redis.Connection):
    """Counts round trips: one send per command, or per pipeline."""

    sent: ClassVar[list[str]] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        first = command[0] if isinstance(command, list) else command
        CountingConnection.sent.append(bytes(first).split(b"\r\n")[2].decode().upper())
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def test_a_status_poll_costs_one_round_trip_for_key_and_limit(redis_server: RedisServer, store: JobStore,
                                                              tmp_path: Path) -> None:
    pool = redis.ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection,
                                         decode_responses=True)
    counted = JobStore(redis.Redis(connection_pool=pool))
    settings = settings_for(redis_server, tmp_path, rate_limit_per_s=1000, rate_limit_burst=2000)
    with TestClient(create_app(settings, store=counted)) as api:
        job = api.post("/v1/jobs", json=SPEC, headers=A).json()["id"]
        assert api.get(f"/v1/jobs/{job}", headers=A).status_code == 200  # scripts loaded
        CountingConnection.sent.clear()
        for _ in range(20):
            assert api.get(f"/v1/jobs/{job}", headers=A).status_code == 200
        sent = list(CountingConnection.sent)
    # Per poll, two round trips: one script for the key lookup and token bucket together, one
    # for the job record with its progress sums (JobStore.read).
    assert sent == ["EVALSHA"] * 40, sent
    assert store.r.exists(f"idf:ratelimit:{key_id(key_digest('key-alpha'))}")


# ---- quotas ----------------------------------------------------------------------------------

def test_concurrent_jobs_quota(make_api: MakeApi, store: JobStore) -> None:
    api = make_api(max_concurrent_jobs=2, team_quotas={"beta": {"concurrent_jobs": 1}})
    first = api.post("/v1/jobs", json=SPEC, headers={**A, "Idempotency-Key": "one"}).json()["id"]
    api.post("/v1/jobs", json={**SPEC, "seed": 2}, headers=A)
    r = api.post("/v1/jobs", json={**SPEC, "seed": 3}, headers=A)
    p = problem(r, 429, "quota_concurrent_jobs")
    assert r.headers["retry-after"] == str(limits.CONCURRENT_RETRY_AFTER_S)
    assert "2 unfinished jobs" in p["detail"] and "quota of concurrent jobs is 2" in p["detail"]
    assert store.r.llen("gpu") == 2 and len(api.get("/v1/jobs", headers=A).json()["jobs"]) == 2
    # A replay of an accepted request is not a new job: it answers even at the limit.
    replay = api.post("/v1/jobs", json=SPEC, headers={**A, "Idempotency-Key": "one"})
    assert replay.status_code == 202 and replay.json()["id"] == first
    # Beta has its own count, and its own (overridden) quota.
    assert api.post("/v1/jobs", json=SPEC, headers=B).status_code == 202
    problem(api.post("/v1/jobs", json={**SPEC, "seed": 2}, headers=B), 429, "quota_concurrent_jobs")
    # A finished (here: canceled) job frees its place.
    api.post(f"/v1/jobs/{first}/cancel", headers=A)
    assert api.post("/v1/jobs", json={**SPEC, "seed": 3}, headers=A).status_code == 202
    assert api.get("/v1/quota", headers=A).json()["concurrent_jobs"] == {"limit": 2, "used": 2}


def test_images_per_day_quota(make_api: MakeApi, store: JobStore) -> None:
    api = make_api(max_images_per_day=20)
    ok = [api.post("/v1/jobs", json=body, headers={**A, "Idempotency-Key": f"k{i}"})
          for i, body in enumerate(({**SPEC, "seed": 1}, {**SPEC, "identities": 6, "seed": 2}))]
    assert [r.status_code for r in ok] == [202, 202]  # 6 + 12 images
    replay = api.post("/v1/jobs", json={**SPEC, "seed": 1}, headers={**A, "Idempotency-Key": "k0"})
    assert replay.headers["idempotent-replayed"] == "true"  # counted once
    assert api.get("/v1/quota", headers=A).json()["images_per_day"]["used"] == 18
    before = 86400 - int(time.time()) % 86400
    r = api.post("/v1/jobs", json=SPEC, headers=A)  # 6 more: 24 > 20
    after = 86400 - int(time.time()) % 86400
    p = problem(r, 429, "quota_images_per_day")
    assert "needs 6 images" in p["detail"] and "used 18 of its 20" in p["detail"]
    retry = int(r.headers["retry-after"])
    assert after - 2 <= retry <= before + 2 or after > before  # until 00:00 UTC (or it just passed)
    too_big = api.post("/v1/jobs", json={**SPEC, "identities": 7, "images_per_identity": 3}, headers=A)
    p = problem(too_big, 403, "quota_images_per_day")
    assert "needs 21 images" in p["detail"] and "larger than the whole daily quota" in p["detail"]
    # Refusals counted nothing: a 2-image job still fits exactly.
    assert api.post("/v1/jobs", json={**SPEC, "identities": 1}, headers=A).status_code == 202
    assert api.get("/v1/quota", headers=A).json()["images_per_day"]["used"] == 20
    assert store.r.llen("gpu") == 3
    assert api.post("/v1/jobs", json=SPEC, headers=B).status_code == 202  # beta's own day


def test_quotas_hold_under_parallel_submissions(redis_server: RedisServer, store: JobStore,
                                                tmp_path: Path) -> None:
    settings = settings_for(redis_server, tmp_path, max_concurrent_jobs=3, max_images_per_day=0)
    spec = JobSpec.model_validate(SPEC)
    start = threading.Barrier(12)

    def submit(i: int) -> str:
        start.wait()
        try:
            limits.admit(JobStore.from_url(redis_server.url), settings, "alpha", spec.normalized(),
                         spec.spec_hash(), identities=3, images=6, idempotency_key=None,
                         body_hash=spec.spec_hash())
            return "created"
        except TooManyRequests as e:
            return e.code

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(submit, range(12)))
    assert got.count("created") == 3 and got.count("quota_concurrent_jobs") == 9
    assert len(store.list_jobs("alpha")[0]) == 3
    assert store.quota_usage("alpha")["images_today"] == 18


def test_a_job_that_cannot_be_enqueued_gives_its_images_back(redis_server: RedisServer, store: JobStore,
                                                             tmp_path: Path) -> None:
    settings = settings_for(redis_server, tmp_path, max_images_per_day=100,
                            broker_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    with TestClient(create_app(settings)) as api:
        problem(api.post("/v1/jobs", json=SPEC, headers=A), 503, "queue_unavailable")
        assert api.get("/v1/quota", headers=A).json()["images_per_day"]["used"] == 0
        assert api.get("/v1/quota", headers=A).json()["concurrent_jobs"]["used"] == 0


# ---- bodies ----------------------------------------------------------------------------------

def test_oversized_bodies_are_413_with_or_without_content_length(
        make_api: MakeApi, redis_server: RedisServer, store: JobStore, tmp_path: Path) -> None:
    api = make_api(max_body_bytes=2048)
    big = json.dumps({**SPEC, "metadata": {"note": "x" * 3000}}).encode()
    small = json.dumps(SPEC).encode()
    json_h = {**A, "Content-Type": "application/json"}
    problem(api.post("/v1/jobs", content=big, headers=json_h), 413, "payload_too_large")
    problem(api.post("/v1/keys", content=b'{"scopes": ["read"], "name": "' + b"n" * 5000 + b'"}',
                     headers=json_h), 413)

    def chunks(data: bytes) -> Iterator[bytes]:
        yield from (data[i:i + 500] for i in range(0, len(data), 500))

    # Over real HTTP: a chunked body declares no length and is cut off as it streams.
    from tests.ui_fixtures import serve

    url = f"http://127.0.0.1:{free_port()}"
    settings = settings_for(redis_server, tmp_path, max_body_bytes=2048, public_url=url)
    with serve(settings, store, local_storage(tmp_path)), httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/jobs", content=chunks(big), headers=json_h)
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in r.request.headers
        problem(r, 413, "payload_too_large")
        assert store.list_jobs("alpha")[0] == [] and store.r.llen("gpu") == 0
        assert c.post("/v1/jobs", content=chunks(small), headers=json_h).status_code == 202


# ---- storage keys ----------------------------------------------------------------------------

def test_local_storage_refuses_every_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    s = LocalStorage(root, signing_key=b"k" * 32)
    (tmp_path / "outside").mkdir()
    root.mkdir()
    (root / "jobs").mkdir()
    (root / "jobs" / "link").symlink_to(tmp_path / "outside")
    for bad in ("../x", "/etc/passwd", "jobs/../../x", "jobs/j1/../../../x", "", ".", "jobs/..",
                "jobs/link/x", "a\x00b", "jobs/\x00/../../x"):
        with pytest.raises(ValueError):
            s.put_bytes(bad, b"x")
        with pytest.raises(ValueError):
            s.get_bytes(bad)
    assert list((tmp_path / "outside").iterdir()) == [] and not (tmp_path / "x").exists()
    for bad_id in ("../other", "a/b", "j1\x00", "", "j1.", "j 1"):
        with pytest.raises(ValueError, match="job_id"):
            JobKeys.for_job("jobs", bad_id)


def test_download_route_serves_nothing_outside_storage_even_when_signed(make_api: MakeApi,
                                                                        tmp_path: Path) -> None:
    api = make_api()
    (tmp_path / "secret.txt").write_text("not yours")
    storage = local_storage(tmp_path)
    expires = int(time.time()) + 60
    for key in ("../secret.txt", "jobs/../../secret.txt"):
        r = api.get(f"/v1/files/{quote(key, safe='')}",
                    params={"expires": expires, "sig": storage.signature(key, expires)})
        problem(r, 404, "not_found")  # a valid signature: the key itself was refused
        assert "not yours" not in r.text


class RecordingStorage:
    """A real LocalStorage that records every key it is asked to touch."""

    def __init__(self, inner: LocalStorage) -> None:
        self.inner = inner
        self.keys: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def call(key: str, *args: Any, **kwargs: Any) -> Any:
            self.keys.append(key)
            return method(key, *args, **kwargs)
        return call


HOSTILE = ["../../escape", "/etc/passwd", "..\\..\\win", "a\x00b", "\u202e../\u2215x", "%2e%2e%2fx", "~/x"]


@pytest.mark.parametrize(("body", "field"), [
    ({**SPEC, "models": {"generator": "../../etc/passwd"}}, "models.generator"),
    ({**SPEC, "models": {"embedder": "/abs/path"}}, "models.embedder"),
    ({**SPEC, "quality": {"leakage": {"reference": "../../etc/passwd"}}}, "quality.leakage.reference"),
    ({**SPEC, "quality": {"leakage": {"reference": "ok\n"}}}, "quality.leakage.reference"),
    ({**SPEC, "quality": {"leakage": {"reference": "a\x00b"}}}, "quality.leakage.reference"),
    ({**SPEC, "output": {"formats": ["imagefolder", "../x"]}}, "output.formats.1"),
    ({**SPEC, "output": {"image_format": "../jpeg"}}, "output.image_format"),
])
def test_path_like_spec_fields_are_refused(make_api: MakeApi, store: JobStore, body: dict[str, Any],
                                           field: str) -> None:
    r = make_api().post("/v1/jobs", json=body, headers=A)
    assert r.status_code == 422, r.text
    assert any(e["field"] == field for e in r.json()["errors"]), r.json()
    assert store.list_jobs("alpha")[0] == []


def test_no_spec_field_steers_a_storage_key_outside_the_job(
        make_api: MakeApi, redis_server: RedisServer, store: JobStore, tmp_path: Path, model_dir: Path) -> None:
    from app.queue import TaskQueue
    from models.registry import Registry
    from workers import artifacts, jobs
    from workers.runtime import ModelCache, Runtime

    body = {"identities": 2, "images_per_identity": 1, "seed": 3, "render": {"steps": 1},
            "metadata": {h: h for h in HOSTILE}}
    submitted = make_api().post("/v1/jobs", json=body, headers=A)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.json()["spec"]["metadata"] == {h: h for h in HOSTILE}  # kept verbatim, as data
    settings = settings_for(redis_server, tmp_path, model_dir=model_dir)
    storage = RecordingStorage(LocalStorage(tmp_path / "storage", signing_key=b"k" * 32))
    # The tasks land on the real broker lists; this test runs each step itself.
    rt = Runtime(settings=settings, store=store, storage=storage,
                 queue=TaskQueue.from_settings(settings), models=ModelCache(Registry(model_dir), "cpu"))
    jobs.sample_identities(rt, job_id)
    for k in range(len(plan_shards(2, settings.shard_identities))):
        jobs.render_shard(rt, job_id, k)
    jobs.finalize(rt, job_id)
    job = store.get(job_id)
    assert job is not None and job["status"] == "succeeded", job
    prefix = f"jobs/{job_id}/"
    assert len(storage.keys) > 10 and all(k.startswith(prefix) for k in storage.keys), [
        k for k in storage.keys if not k.startswith(prefix)]
    on_disk = [p.relative_to(tmp_path / "storage").as_posix()
               for p in (tmp_path / "storage").rglob("*") if p.is_file()]
    assert on_disk and all(p.startswith(prefix) for p in on_disk)
    assert not any(h in "".join(on_disk) for h in HOSTILE)


# ---- the CLI ---------------------------------------------------------------------------------

def test_cli_keys_create_list_revoke(make_api: MakeApi, redis_server: RedisServer) -> None:
    api = make_api()
    env = {"IDFORGE_REDIS_URL": redis_server.url, "IDFORGE_API_KEYS": TEAM_KEYS}
    runner = CliRunner()
    made = runner.invoke(cli_main, ["keys", "create", "--team", "ci", "--scopes", "submit",
                                    "--name", "nightly"], env=env)
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert key.startswith("idf_") and "not shown again" in made.stderr
    ci = {"Authorization": f"Bearer {key}"}
    assert api.post("/v1/jobs", json=SPEC, headers=ci).status_code == 202  # submit implies read
    assert len(api.get("/v1/jobs", headers=ci).json()["jobs"]) == 1
    listed = runner.invoke(cli_main, ["keys", "list", "--json"], env=env)
    assert listed.exit_code == 0 and key not in listed.output
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    kid = key_id(key_digest(key))
    assert rows[kid]["team"] == "ci" and rows[kid]["scopes"] == ["submit"] and rows[kid]["active"]
    assert {r["team"] for r in rows.values()} == {"alpha", "beta", "ci"}
    only_ci = runner.invoke(cli_main, ["keys", "list", "--team", "ci"], env=env)
    assert kid in only_ci.stdout and "alpha" not in only_ci.stdout
    bad = runner.invoke(cli_main, ["keys", "create", "--team", "ci", "--scopes", "everything"], env=env)
    assert bad.exit_code == 2 and "unknown scope 'everything'" in bad.output
    # Revoking a made key and a bootstrap key: the running API refuses both at once.
    for revoked, headers in ((kid, ci), (key_id(key_digest("key-beta")), B)):
        out = runner.invoke(cli_main, ["keys", "revoke", revoked], env=env)
        assert out.exit_code == 0 and "revoked" in out.stdout, out.output
        assert "revoked" in problem(api.get("/v1/jobs", headers=headers), 401)["detail"]
    assert api.get("/v1/jobs", headers=A).status_code == 200
    missing = runner.invoke(cli_main, ["keys", "revoke", "key_ffffffffffffffff"], env=env)
    assert missing.exit_code == 1 and "no key key_ffffffffffffffff" in missing.output


def test_the_client_waits_out_rate_limits_on_idempotent_calls(make_api: MakeApi, store: JobStore) -> None:
    from app.client import Client

    api = make_api(rate_limit_per_s=1, rate_limit_burst=1)
    api.headers["Authorization"] = "Bearer key-alpha"
    client = Client("http://testserver", "key-alpha")
    client.http = api  # the real app, in process
    job_id = store.create("alpha", {"identities": 1, "images_per_identity": 1}, "h", identities=1, images=1).job_id
    t0 = time.monotonic()
    assert client.job(job_id)["id"] == job_id
    assert client.job(job_id)["id"] == job_id  # 429 first: waits Retry-After, then gets it
    assert time.monotonic() - t0 >= 0.9
