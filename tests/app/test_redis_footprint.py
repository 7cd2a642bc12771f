"""A job's Redis footprint stays bounded however many shards it has, against a real redis-server:
jobs of 500 and 2,000 shards simulated through the store's and the task ledger's own functions
(`bench/redis_footprint.py`, no rendering); progress exact under redelivered shards; event paging
across a compaction; every record of an ended job but its hash expires."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.jobstore import (
    EVENTS_FOLD_BATCH,
    EVENTS_KEEP_FIRST,
    EVENTS_KEEP_LAST,
    EVENTS_TASK_CAP,
    JOB_KEY_SUFFIXES,
    JobStore,
    foldable,
    job_key,
)
from bench.redis_footprint import footprint, simulate, simulate_legacy

# The stated bound: a job's keys hold at most this many bytes, plus 2 bits per shard (the shards'
# and the render tasks' done bits). Measured: ~45 kB with the stream at its cap (EVENTS_TASK_CAP
# task events of ~130 bytes each, the job's other events, the job hash, webhook messages).
JOB_BYTES_CAP = 80 * 1024
EVENT_BYTES = 200  # one task event in the stream, generously (measured ~130)


def job_cap(shards: int) -> int:
    return JOB_BYTES_CAP + 2 * (shards // 8 + 1) * 2  # a bitmap may take up to twice its bytes


def _sid(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def task_events(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    return [e for e in store.events(job_id, limit=100_000) if foldable(e["type"], e)]


def test_footprint_is_bounded_and_does_not_grow_with_the_shards(store: JobStore) -> None:
    from workers.tasking import TaskLedger

    r = store.r
    sizes: dict[int, dict[str, int]] = {}
    for n in (500, 2000):
        jid = simulate(store, n, end=False)  # measured while it runs: nothing has expired yet
        sizes[n] = footprint(r, jid)
        total = sum(sizes[n].values())
        assert total <= job_cap(n), (n, total, sizes[n])
        # Constant-size records: the job hash, the progress hash (sums and folded totals only, the
        # live fields went with their shards), the attempt counters (finalize, still running).
        assert r.hlen(job_key(jid, ":progress")) == 4, r.hkeys(job_key(jid, ":progress"))
        assert r.hkeys(job_key(jid, ":attempts")) == ["finalize"]
        assert r.smembers(job_key(jid, ":tasks_done")) == {"sample_identities"}
        assert not list(r.scan_iter(match=job_key(jid, ":lease:*")))
        assert sizes[n][job_key(jid)] < 2048
        assert len(task_events(store, jid)) <= EVENTS_TASK_CAP
        assert r.xlen(job_key(jid, ":events")) <= EVENTS_TASK_CAP + 20
        # The ledger still reads back every task's attempts.
        attempts = TaskLedger(r).attempts(jid)
        assert len(attempts) == n + 2 and set(attempts.values()) == {1}
        job = store.read(jid)
        assert job == store.get(jid)
        assert job is not None and job["progress"]["images_done"] == n * 64 * 50
        legacy = footprint(r, simulate_legacy(r, n))
        assert total < 0.25 * sum(legacy.values()), (total, sum(legacy.values()))
    grew = sum(sizes[2000].values()) - sum(sizes[500].values())
    # From 500 to 2,000 shards: the bits, and the stream anywhere between its two fold points.
    assert grew <= EVENTS_FOLD_BATCH * EVENT_BYTES + 2 * (1500 // 8 + 1) * 2, grew


def test_progress_is_exact_under_redelivered_and_stale_shards(store: JobStore) -> None:
    jid = store.create("alpha", {"identities": 8}, "h", identities=8, images=24).job_id

    def done() -> tuple[int, int]:
        job = store.read(jid)
        assert job == store.get(jid)
        assert job is not None
        return job["progress"]["identities_done"], job["progress"]["images_done"]

    store.set_progress(jid, "shard0", identities=1, images=3)
    store.set_progress(jid, "shard0", identities=1, images=3)  # the same report twice
    store.set_progress(jid, "shard1", identities=2, images=6)
    assert done() == (3, 9)
    store.set_progress(jid, "shard1", identities=0, images=0)  # killed, redelivered: starts again
    assert done() == (1, 3)
    assert store.shard_done(jid, 0, identities=2, images=6) == 1
    assert done() == (2, 6)
    assert store.shard_done(jid, 0, identities=2, images=6) == 1  # a redelivered finished shard
    assert store.set_progress(jid, "shard0", identities=1, images=3) is False  # a stale copy's report
    assert done() == (2, 6)
    store.set_progress(jid, "shard1", identities=1, images=3)
    assert store.shard_done(jid, 1, identities=2, images=6) == 2
    assert store.shard_done(jid, 1, identities=2, images=6) == 2
    store.set_progress(jid, "shard2", identities=2, images=6)
    assert store.shard_done(jid, 2) == 3  # no final figures: as it last reported
    store.set_progress(jid, "shard3", identities=1, images=3)
    store.set_progress(jid, "sampling", identities=9, images=9)  # not a shard: not summed
    assert done() == (7, 21)
    progress = store.r.hgetall(job_key(jid, ":progress"))
    assert sorted(progress) == ["folded:identities", "folded:images", "sampling:identities",
                                "sampling:images", "shard3:identities", "shard3:images",
                                "sum:identities", "sum:images"]
    # Through a whole simulated job, with 50 finished shards redelivered (their copies report first).
    big = simulate(store, 300, end=True, redeliver=50)
    job = store.get(big)
    assert job is not None and job["progress"]["images_done"] == 300 * 64 * 50
    assert job["progress"]["identities_done"] == 300 * 64


def test_a_job_started_under_the_per_shard_layout_carries_on(store: JobStore) -> None:
    """Written by the earlier code (a set of shard numbers, per-shard fields, no folded totals)."""
    jid = store.create("alpha", {"identities": 9}, "h", identities=9, images=27).job_id
    r, progress = store.r, job_key(jid, ":progress")
    r.hset(progress, mapping={"shard0:identities": 3, "shard0:images": 9, "shard1:identities": 3,
                              "shard1:images": 9, "shard2:identities": 1, "shard2:images": 3})
    r.sadd(job_key(jid, ":shards_done"), 0, 1)
    assert store.get(jid)["progress"]["images_done"] == 21  # type: ignore[index]
    assert store.read(jid)["progress"]["images_done"] == 21  # type: ignore[index]
    assert store.shard_done(jid, 1, identities=3, images=9) == 2  # counted already: no change
    assert store.shard_done(jid, 2, identities=3, images=9) == 3
    assert not r.exists(job_key(jid, ":shards_done"))
    assert store.read(jid)["progress"]["images_done"] == 27  # type: ignore[index]
    assert store.get(jid)["progress"]["images_done"] == 27  # type: ignore[index]
    assert r.hlen(progress) == 4


def test_event_paging_across_a_compaction_returns_each_remaining_event_once(store: JobStore) -> None:
    from workers.tasking import TaskLedger

    shards = 400  # 800 task events: well past the first fold
    jid = store.create("alpha", {"identities": 1}, "h", identities=1, images=1).job_id
    store.transition(jid, "running")
    store.set_stage(jid, "rendering")
    ledger = TaskLedger(store.r)
    cursors: list[str] = []
    for k in range(shards):
        key = f"render_shard:{k}"
        attempts = 2 if k in (100, 101) else 1  # two shards restarted after a crash
        for a in range(1, attempts + 1):
            store.add_event(jid, "task_started", task=key, attempt=a, worker="w")
        store.add_event(jid, "task_ended", task=key, outcome="returned", worker="w")
        ledger.mark_task_done(jid, key)
        if k in (80, 150):  # a reader part-way: its cursor points at events folded later
            page = store.events(jid, after=cursors[-1] if cursors else "-", limit=1000)
            cursors.append(page[-1]["id"])
        if k == 200:
            store.add_event(jid, "webhook", msg_id="m", outcome="retrying")  # not foldable
    store.set_stage(jid, "packaging")
    everything = store.r.xrange(job_key(jid, ":events"))
    ids = [eid for eid, _ in everything]
    markers = [f for _, f in everything if f["type"] == "compacted"]
    assert len(markers) == 1, markers
    marker = markers[0]
    remaining = [f for _, f in everything if foldable(f["type"], f)]
    written = 2 * shards + 2
    assert int(marker["folded"]) == written - len(remaining)
    assert EVENTS_KEEP_FIRST + EVENTS_KEEP_LAST <= len(remaining) <= EVENTS_TASK_CAP
    assert json.loads(marker["counts"]) == {
        "task_started": (shards + 2) - sum(1 for f in remaining if f["type"] == "task_started"),
        "task_ended": shards - sum(1 for f in remaining if f["type"] == "task_ended")}
    assert json.loads(marker["outcomes"]) == {"returned": json.loads(marker["counts"])["task_ended"]}
    assert marker["restarts"] == "2" and json.loads(marker["restarted"]) == ["render_shard:100",
                                                                             "render_shard:101"]
    marker_id = next(eid for eid, f in everything if f["type"] == "compacted")
    assert marker["first"] not in ids and marker["last"] not in ids
    assert _sid(marker["first"]) < _sid(marker["last"]) < _sid(marker_id)
    # The first task events are kept verbatim, and every event that is not a task's.
    assert [f["task"] for f in remaining[:4]] == ["render_shard:0"] * 2 + ["render_shard:1"] * 2
    assert [f.get("stage") or f.get("to") or f["type"] for _, f in everything
            if not foldable(f["type"], f) and f["type"] != "compacted"] == [
        "queued", "running", "rendering", "webhook", "packaging"]
    # Paging with a small limit: every remaining event once, in order, the marker among them.
    paged, after = [], "-"
    while page := store.events(jid, after=after, limit=37):
        paged += page
        after = page[-1]["id"]
    assert [e["id"] for e in paged] == ids and len(set(ids)) == len(ids)
    # A reader whose cursor points at a folded event goes on from there: the later events, once.
    for cursor in cursors:
        assert cursor not in ids  # it was folded
        rest = store.events(jid, after=cursor, limit=100_000)
        assert [e["id"] for e in rest] == [i for i in ids if _sid(i) > _sid(cursor)] and rest
        assert any(e["type"] == "compacted" for e in rest)
    # Blocking reads (the SSE stream) from a folded cursor too.
    got = store.events(jid, after=cursors[0], block_ms=10, limit=5)
    assert [e["id"] for e in got] == [i for i in ids if _sid(i) > _sid(cursors[0])][:5]


def test_compaction_keeps_the_stream_at_its_cap_over_many_shards(store: JobStore) -> None:
    jid = store.create("alpha", {"identities": 1}, "h", identities=1, images=1).job_id
    lengths = []
    for k in range(1500):
        store.add_event(jid, "task_started", task=f"render_shard:{k}", attempt=1, worker="w")
        store.add_event(jid, "task_ended", task=f"render_shard:{k}", outcome="returned", worker="w")
        lengths.append(store.r.xlen(job_key(jid, ":events")))
    assert max(lengths) <= 1 + EVENTS_TASK_CAP + 1  # the queued status, the tasks', the marker
    marker = [e for e in store.events(jid, limit=10_000) if e["type"] == "compacted"]
    assert len(marker) == 1 and int(marker[0]["folded"]) == 3000 - len(task_events(store, jid))
    # The tasks that are not a shard's (sample_identities, finalize) are never folded.
    store.add_event(jid, "task_started", task="finalize", attempt=1, worker="w")
    assert not foldable("task_started", {"task": "finalize"})
    assert foldable("task_ended", {"task": "render_shard:12"}) and not foldable("stage", {"task": "x:1"})


def _keys(store: JobStore, job_id: str) -> list[str]:
    return sorted(store.r.scan_iter(match=job_key(job_id) + "*"))


def test_every_record_but_the_job_hash_expires_when_the_job_ends(redis_server: Any) -> None:
    from workers.tasking import TaskLedger

    store = JobStore.from_url(redis_server.url, keys_ttl_s=100)
    store.r.flushdb()
    jid = simulate(store, 40, end=True)
    r = store.r
    before = store.get(jid)
    assert before is not None and before["status"] == "succeeded"
    keys = _keys(store, jid)
    assert {job_key(jid, s) for s in (":progress", ":shards_done_bits", ":events", ":webhooks",
                                      ":attempts", ":tasks_done", ":tasks_done:render_shard")} <= set(keys)
    for k in keys:
        ttl = r.pttl(k)
        assert (ttl == -1) if k == job_key(jid) else (0 < ttl <= 100_000), (k, ttl)
    # Late writes (a redelivery, a webhook attempt, a stale report) keep the same expiry.
    ledger = TaskLedger(r)
    r.delete(job_key(jid, ":attempts"), job_key(jid, ":tasks_done:render_shard"), job_key(jid, ":webhooks"))
    ledger.incr_attempt(jid, "render_shard:3")
    ledger.mark_task_done(jid, "render_shard:99")
    store.add_event(jid, "webhook", msg_id="m", outcome="delivered")
    store.put_webhook(jid, "canceled", "m2", "{}")
    assert store.set_progress(jid, "shard3", identities=1, images=1) is False  # a stale copy
    assert store.get(jid) == before
    for k in _keys(store, jid):
        assert k == job_key(jid) or 0 < r.pttl(k) <= 100_000, (k, r.pttl(k))
    # When they have expired, the job reads the same: it kept its progress when it ended.
    r.delete(*[job_key(jid, s) for s in JOB_KEY_SUFFIXES])
    after = store.get(jid)
    assert after == before and store.read(jid) == before
    assert after is not None and after["progress"]["images_done"] == 40 * 64 * 50


def test_with_no_retention_nothing_expires(redis_server: Any) -> None:
    store = JobStore.from_url(redis_server.url, keys_ttl_s=0)
    store.r.flushdb()
    jid = simulate(store, 5, end=True)
    assert all(store.r.pttl(k) == -1 for k in _keys(store, jid))
    assert "keys_expire_at" not in store.r.hkeys(job_key(jid))
    # A canceled queued job ends too: its events expire with a retention set.
    timed = JobStore.from_url(redis_server.url, keys_ttl_s=100)
    queued = timed.create("alpha", {"identities": 1}, "h", identities=1, images=1).job_id
    assert timed.request_cancel(queued) == "canceled"
    assert 0 < timed.r.pttl(job_key(queued, ":events")) <= 100_000
    assert timed.r.pttl(job_key(queued)) == -1


def test_the_retention_setting() -> None:
    from app.jobstore import DEFAULT_KEYS_TTL_S
    from app.settings import Settings

    assert Settings().job_keys_ttl_s == DEFAULT_KEYS_TTL_S == 30 * 86400
    assert Settings(job_keys_ttl_s=0).job_keys_ttl_s == 0
    with pytest.raises(ValueError, match="IDFORGE_JOB_KEYS_TTL_S"):
        Settings(job_keys_ttl_s=60)
