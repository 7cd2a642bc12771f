"""The Redis job store against a real redis-server."""

from __future__ import annotations

import json
import threading

import pytest

from app.jobstore import JobStore

SPEC = {"identities": 2, "images_per_identity": 3}


def make(store: JobStore, owner: str = "alpha", **kw: object) -> str:
    made = store.create(owner, SPEC, "h1", identities=2, images=6, **kw)  # type: ignore[arg-type]
    assert made.created
    return made.job_id


def test_create_records_job_and_event(store: JobStore) -> None:
    jid = make(store)
    job = store.get(jid)
    assert job is not None
    assert (job["status"], job["owner"], job["spec"]) == ("queued", "alpha", SPEC)
    assert job["progress"]["images_total"] == 6 and job["progress"]["images_done"] == 0
    assert job["queued_at"] == job["created_at"]
    assert [e["to"] for e in store.events(jid)] == ["queued"]


def test_transitions_are_compare_and_set(store: JobStore) -> None:
    jid = make(store)
    assert store.transition(jid, "succeeded") == (False, "queued")  # must run first
    assert store.transition(jid, "running") == (True, "queued")
    assert store.transition(jid, "running") == (True, "running")  # a redelivered task
    assert store.transition(jid, "succeeded", result={"images": 6}) == (True, "running")
    for to in ("running", "failed", "canceled", "canceling"):
        assert store.transition(jid, to)[0] is False, f"terminal job moved to {to}"  # type: ignore[arg-type]
    job = store.get(jid)
    assert job is not None
    assert job["status"] == "succeeded" and job["result"] == {"images": 6}
    assert {"queued_at", "running_at", "succeeded_at"} <= job.keys()
    assert [e["to"] for e in store.events(jid)] == ["queued", "running", "succeeded"]


def test_only_one_of_racing_transitions_wins(store: JobStore) -> None:
    jid = make(store)
    store.transition(jid, "running")
    wins: list[str] = []

    def go(to: str) -> None:
        if store.transition(jid, to)[0]:  # type: ignore[arg-type]
            wins.append(to)

    threads = [threading.Thread(target=go, args=(t,)) for t in ["succeeded", "failed"] * 10]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_cancel_queued_is_immediate_running_goes_through_canceling(store: JobStore) -> None:
    queued = make(store)
    assert store.request_cancel(queued) == "canceled"
    assert store.request_cancel(queued) == "canceled"  # idempotent
    running = make(store)
    store.transition(running, "running")
    assert store.request_cancel(running) == "canceling"
    assert store.request_cancel(running) == "canceling"
    assert store.transition(running, "succeeded")[0] is False
    assert store.transition(running, "canceled") == (True, "canceling")


def test_team_index_newest_first_with_cursor_and_status_filter(store: JobStore) -> None:
    ids = [make(store) for _ in range(5)]
    other = make(store, owner="beta")
    store.transition(ids[1], "running")
    page1, nxt = store.list_jobs("alpha", limit=2)
    assert [j["id"] for j in page1] == ids[::-1][:2] and nxt == ids[3]
    page2, nxt2 = store.list_jobs("alpha", limit=2, after=nxt)
    page3, nxt3 = store.list_jobs("alpha", limit=2, after=nxt2)
    assert [j["id"] for j in page2 + page3] == ids[::-1][2:] and nxt3 is None
    running, _ = store.list_jobs("alpha", status="running")
    assert [j["id"] for j in running] == [ids[1]]
    queued, _ = store.list_jobs("alpha", status="queued")
    assert ids[1] not in [j["id"] for j in queued] and len(queued) == 4
    assert other not in [j["id"] for j in store.list_jobs("alpha", limit=100)[0]]


def test_progress_is_set_per_part_so_redelivery_cannot_double_count(store: JobStore) -> None:
    jid = make(store)
    store.set_progress(jid, "shard0", identities=1, images=3)
    store.set_progress(jid, "shard0", identities=1, images=3)  # redelivered shard
    store.set_progress(jid, "shard1", identities=1, images=2)
    p = store.get(jid)["progress"]  # type: ignore[index]
    assert (p["identities_done"], p["images_done"]) == (2, 5)


def test_idempotency_key_same_body_other_body_and_ttl(store: JobStore) -> None:
    first = store.create("alpha", SPEC, "h1", identities=2, images=6, idempotency_key="k",
                         body_hash="h1", idempotency_ttl_s=100)
    assert first.created
    again = store.create("alpha", SPEC, "h1", identities=2, images=6, idempotency_key="k",
                         body_hash="h1")
    assert (again.created, again.job_id, again.pending) == (False, first.job_id, True)
    store.confirm_idempotency("alpha", "k", first.job_id, "h1")
    done = store.create("alpha", SPEC, "h1", identities=2, images=6, idempotency_key="k",
                        body_hash="h1")
    assert (done.created, done.job_id, done.pending) == (False, first.job_id, False)
    other = store.create("alpha", SPEC, "h2", identities=2, images=6, idempotency_key="k",
                         body_hash="h2")
    assert not other.created and other.body_hash == "h1"
    # keys are per team, and expire
    assert store.create("beta", SPEC, "h1", identities=2, images=6, idempotency_key="k",
                        body_hash="h1").created
    ttl = store.r.ttl(store._idem_key("alpha", "k"))
    assert 0 < ttl <= 100
    assert len(store.list_jobs("alpha")[0]) == 1


def test_shard_completion_counts_distinct_shards(store: JobStore) -> None:
    jid = make(store)
    assert store.shard_done(jid, 0) == 1
    assert store.shard_done(jid, 0) == 1
    assert store.shard_done(jid, 1) == 2


def test_events_after_cursor_and_blocking_read(store: JobStore) -> None:
    jid = make(store)
    store.add_event(jid, "note", detail={"x": 1})
    first = store.events(jid)
    assert [e["type"] for e in first] == ["status", "note"]
    assert json.loads(first[1]["detail"]) == {"x": 1}
    assert store.events(jid, after=first[0]["id"]) == first[1:]
    assert store.events(jid, after=first[-1]["id"], block_ms=50) == []


@pytest.mark.parametrize("cursor", ["075-79099149165990222331", "18446744073709551616-0",
                                    "0-18446744073709551616", "-1-0", "1", "01-0", "\u0663-0", "", "$", "+"])
def test_events_refuse_a_malformed_cursor_before_redis(store: JobStore, cursor: str) -> None:
    jid = make(store)
    for block_ms in (None, 10):
        with pytest.raises(ValueError, match="not an event cursor"):
            store.events(jid, after=cursor, block_ms=block_ms)


def test_events_after_the_largest_id_are_none(store: JobStore) -> None:
    from app.jobstore import STREAM_ID_MAX

    jid = make(store)
    assert STREAM_ID_MAX == f"{2**64 - 1}-{2**64 - 1}"
    assert store.events(jid, after=STREAM_ID_MAX) == []
    assert store.events(jid, after=STREAM_ID_MAX, block_ms=10) == []
    assert [e["to"] for e in store.events(jid, after="0-0")] == ["queued"]
    assert store.events(jid, after=f"{2**64 - 1}-0") == []


def test_unreachable_redis_is_a_job_store_error() -> None:
    from app.errors import JobStoreUnavailable
    from app.servers import free_port

    dead = JobStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(JobStoreUnavailable):
        dead.get("j1")
