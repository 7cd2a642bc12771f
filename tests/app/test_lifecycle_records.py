"""The lifecycle records against a real Redis: expiry set when a job ends, the sweep (driven by the
test's clock) never early, deletion requests and tombstones, the reuse index, and the list's
metadata and creation-time filters."""

from __future__ import annotations

import time
from typing import Any

from app.jobstore import JobStore, id_bound
from app.lifecycle import DELETING, EXPIRY, Lifecycle

SPEC: dict[str, Any] = {"identities": 2, "images_per_identity": 3, "metadata": {}}


def _job(store: JobStore, owner: str = "alpha", *, retention_s: int = 0, dataset: str | None = None,
         metadata: dict[str, str] | None = None, status: str | None = "succeeded") -> str:
    made = store.create(owner, {**SPEC, "metadata": metadata or {}}, "h", identities=2, images=6,
                        retention_s=retention_s, dataset_hash=dataset)
    if status is not None:
        store.transition(made.job_id, "running")
        store.transition(made.job_id, status)  # type: ignore[arg-type]
    return made.job_id


def _redis_ms(store: JobStore) -> int:
    sec, usec = store.r.time()
    return int(sec) * 1000 + int(usec) // 1000


def test_expiry_is_set_when_the_job_ends_and_the_sweep_is_never_early(store: JobStore) -> None:
    life = Lifecycle(store)
    kept = _job(store, retention_s=0)
    live = _job(store, retention_s=60, status=None)
    before = _redis_ms(store)
    job_id = _job(store, retention_s=3600)
    after = _redis_ms(store)
    job = store.get(job_id)
    assert job is not None and job["retention_s"] == 3600
    expires = int(store.r.zscore(EXPIRY, job_id))
    assert before + 3600_000 <= expires <= after + 3600_000
    assert job["expires_at"].endswith("Z")
    assert "expires_at" not in (store.get(kept) or {})
    assert store.r.zscore(EXPIRY, kept) is None and store.r.zscore(EXPIRY, live) is None  # kept; not ended

    sent: list[str] = []
    # One millisecond early: nothing. At its time: requested once, sent once.
    assert life.sweep(sent.append, now_ms=expires - 1).expired == [] and sent == []
    swept = life.sweep(sent.append, now_ms=expires)
    assert swept.expired == [job_id] and sent == [job_id]
    job = store.get(job_id)
    assert job is not None and job["deletion_reason"] == "expired" and job["deletion_requested_at"]
    assert life.sweep(sent.append, now_ms=expires + 1000).expired == [] and sent == [job_id]
    # A deletion that has waited longer than the resend interval is sent again.
    swept = life.sweep(sent.append, now_ms=expires + 301_000, resend_after_s=300)
    assert swept.resent == [job_id] and sent == [job_id, job_id]


def test_an_index_entry_alone_deletes_nothing(store: JobStore) -> None:
    """The sweep trusts the job's own record: an expiry entry whose job says later (or that is not
    ended) is left alone."""
    life = Lifecycle(store)
    job_id = _job(store, retention_s=3600)
    running = _job(store, status=None)
    store.r.zadd(EXPIRY, {job_id: 1, running: 1})
    sent: list[str] = []
    swept = life.sweep(sent.append, now_ms=_redis_ms(store))
    assert sent == [] and sorted(swept.not_yet) == sorted([job_id, running])
    assert "deletion_requested_at" not in (store.get(job_id) or {})


def test_deletion_request_is_idempotent_and_the_tombstone_is_set_once(store: JobStore) -> None:
    life = Lifecycle(store)
    job_id = _job(store, retention_s=10)
    assert life.request_delete("jmissing") == ""
    assert life.request_delete(job_id) == "requested"
    assert life.request_delete(job_id) == "pending"
    assert store.r.zscore(DELETING, job_id) is not None
    assert life.mark_deleted(job_id, 17) is True
    assert life.mark_deleted(job_id, 17) is False  # once
    assert life.request_delete(job_id) == "deleted"
    job = store.get(job_id)
    assert job is not None and job["deleted_at"] and job["status"] == "succeeded"
    assert store.r.zscore(EXPIRY, job_id) is None and store.r.zscore(DELETING, job_id) is None
    events = [e for e in store.events(job_id) if e["type"] in ("deletion_requested", "deleted")]
    assert [e["type"] for e in events] == ["deletion_requested", "deleted"] and events[1]["objects"] == "17"


def test_reuse_index_holds_the_latest_succeeded_job_of_the_team_until_its_deletion(store: JobStore) -> None:
    life = Lifecycle(store)
    assert life.reusable("alpha", "d1") is None
    failed = _job(store, dataset="d1", status="failed")
    assert life.reusable("alpha", "d1") is None and failed
    first = _job(store, dataset="d1")
    second = _job(store, dataset="d1")
    other_team = _job(store, "beta", dataset="d1")
    assert life.reusable("alpha", "d1") == second and life.reusable("beta", "d1") == other_team
    life.request_delete(first)  # not the one the index holds: it stays
    assert life.reusable("alpha", "d1") == second
    life.request_delete(second)
    assert life.reusable("alpha", "d1") is None


def test_list_filters_on_metadata_status_and_creation_time(store: JobStore) -> None:
    a1 = _job(store, metadata={"commit": "abc", "ci": "1"})
    a2 = _job(store, metadata={"commit": "abc"}, status="failed")
    time.sleep(0.01)
    mid = time.time()
    time.sleep(0.01)
    b = _job(store, metadata={"commit": "def"})
    c = _job(store, metadata={"commit": "abc"}, status=None)
    _job(store, "beta", metadata={"commit": "abc"})  # another team's

    def ids(**kw: Any) -> list[str]:
        jobs, nxt = store.list_jobs("alpha", **kw)
        assert nxt is None
        return [j["id"] for j in jobs]

    assert ids(metadata={"commit": "abc"}) == [c, a2, a1]
    assert ids(metadata={"commit": "abc", "ci": "1"}) == [a1]
    assert ids(metadata={"commit": "abc"}, status="succeeded") == [a1]
    assert ids(metadata={"commit": "nope"}) == []
    assert ids(created_after=mid) == [c, b]
    assert ids(created_before=mid) == [a2, a1]
    assert ids(created_after=mid, metadata={"commit": "abc"}) == [c]
    assert id_bound(mid) < b and a2 < id_bound(mid)


def test_filtered_pages_walk_every_match_once_even_when_the_scan_budget_cuts_a_page(store: JobStore) -> None:
    made = [_job(store, metadata={"k": "v" if i % 3 == 0 else "w"}) for i in range(30)]
    want = [j for i, j in enumerate(made) if i % 3 == 0][::-1]
    for limit, max_scan in ((2, 2000), (3, 4), (1, 1)):
        got: list[str] = []
        after = None
        for _ in range(100):
            jobs, after = store.list_jobs("alpha", metadata={"k": "v"}, status="succeeded", limit=limit,
                                          after=after, max_scan=max_scan)
            assert len(jobs) <= limit
            got += [j["id"] for j in jobs]
            if after is None:
                break
        assert got == want, (limit, max_scan)
