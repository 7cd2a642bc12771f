"""500 concurrent submissions, each retried with its Idempotency-Key, against a real uvicorn server
with two worker processes over one Redis: exactly one job per key.

Each key's first POST is raced by a retry (half at once, half after a short random delay, as a CI
job's retry after a timeout would); a 409 (the first attempt still in flight) or a dropped connection
is retried after a pause, as a client following Retry-After would. When every key has its job, each
key is replayed once more. Then: every 202 for a key names the same job, keys never share a job, the
team has exactly 500 jobs, the broker got exactly 500 tasks, and each job has its own key's body.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.servers import RedisServer, free_port, stop_group
from tests.conftest import TEAM_KEYS

pytestmark = pytest.mark.integration

KEYS = 500
AUTH = {"Authorization": "Bearer key-alpha"}


def spec(i: int) -> dict[str, Any]:
    return {"identities": 2, "images_per_identity": 2, "seed": i, "metadata": {"ci_run": str(i)}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(API URL, Redis URL): uvicorn with 2 processes, no worker consuming the queue."""
    root = tmp_path_factory.mktemp("concurrency")
    srv = RedisServer(root / "redis").start()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDFORGE_REDIS_URL": srv.url, "IDFORGE_API_KEYS": TEAM_KEYS,
           "IDFORGE_STORAGE_DIR": str(root / "storage"), "IDFORGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
           # The limiter and the quotas (tested elsewhere) would refuse a burst of 500 jobs.
           "IDFORGE_RATE_LIMIT_PER_S": "0", "IDFORGE_MAX_CONCURRENT_JOBS": "0", "IDFORGE_MAX_IMAGES_PER_DAY": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "2", "--no-access-log",
                             "--log-level", "warning", "--backlog", "4096"],
                            env=env, stdout=open(root / "api.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (root / "api.log").read_text()
            time.sleep(0.2)
        yield url, srv.url
    finally:
        stop_group(proc)
        srv.stop()


async def submit_until_done(client: httpx.AsyncClient, i: int, delay: float,
                            seen: dict[int, list[tuple[int, str | None]]]) -> None:
    """POST key i's body until a 202: after 409 (in flight) or a dropped connection, wait and retry."""
    await asyncio.sleep(delay)
    while True:
        try:
            r = await client.post("/v1/jobs", json=spec(i), headers={**AUTH, "Idempotency-Key": f"ci-run-{i}"})
        except httpx.TransportError:
            await asyncio.sleep(0.2)
            continue
        seen[i].append((r.status_code, r.json().get("id") if r.status_code == 202 else r.json().get("code")))
        if r.status_code == 202:
            return
        assert r.status_code == 409, r.text
        assert r.headers["retry-after"]
        await asyncio.sleep(0.1)


async def storm(url: str) -> dict[int, list[tuple[int, str | None]]]:
    seen: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=2 * KEYS, max_keepalive_connections=2 * KEYS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        attempts = []
        for i in range(KEYS):
            attempts.append(submit_until_done(client, i, 0.0, seen))  # the first attempt
            retry_after = 0.0 if i % 2 == 0 else rng.uniform(0.0, 0.05)  # a racing retry
            attempts.append(submit_until_done(client, i, retry_after, seen))
        rng.shuffle(attempts)
        await asyncio.gather(*attempts)
        # Every key settled: one more retry each, all at once.
        await asyncio.gather(*(submit_until_done(client, i, 0.0, seen) for i in range(KEYS)))
    return seen


def test_each_idempotency_key_makes_exactly_one_job(server: tuple[str, str]) -> None:
    url, redis_url = server
    seen = asyncio.run(storm(url))
    ids_by_key = {i: {v for status, v in seen[i] if status == 202} for i in range(KEYS)}
    assert all(len(ids) == 1 for ids in ids_by_key.values()), \
        {i: ids for i, ids in ids_by_key.items() if len(ids) != 1}
    job_ids = [next(iter(ids)) for ids in ids_by_key.values()]
    assert len(set(job_ids)) == KEYS  # no two keys share a job
    statuses = [s for attempts in seen.values() for s, _ in attempts]
    assert set(statuses) <= {202, 409} and statuses.count(202) == 3 * KEYS
    conflicts = sum(1 for attempts in seen.values() for s, code in attempts if s == 409)
    assert all(code == "idempotency_key_in_flight" for a in seen.values() for s, code in a if s == 409)

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert r.zcard("idf:team:alpha:jobs") == KEYS
    assert set(r.zrange("idf:team:alpha:jobs", 0, -1)) == set(job_ids)
    assert r.llen("gpu") == KEYS  # one sampling task per job: no key enqueued twice
    with httpx.Client(base_url=url, headers=AUTH) as c:
        for i in random.Random(1).sample(range(KEYS), 25):
            job = c.get(f"/v1/jobs/{job_ids[i]}").json()
            assert job["spec"]["metadata"] == {"ci_run": str(i)} and job["spec"]["seed"] == i
    print(f"\n{KEYS} keys, {len(statuses)} responses: {3 * KEYS} x 202, {conflicts} x 409 (in flight); "
          f"{KEYS} jobs, {KEYS} tasks")


def test_server_log_is_clean(server: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    log = next(Path(tmp_path_factory.getbasetemp()).glob("concurrency*/api.log")).read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
