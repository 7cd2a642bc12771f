"""A dataset's life after its job ends: deletion (a tombstone that keeps the record), retention
(expiry a set time after the job ends) and reuse of a team's identical succeeded job.

The kernel keeps the facts in Redis; the API requests deletions and looks up reuse, the workers
delete (`workers/lifecycle.py`) and sweep. What lives where:

- the job hash: `retention_s` (set at creation: the job's own, else its team's default),
  `expires_at_ms` (set when the job ends, by the transition script in `app/jobstore.py`),
  `deletion_requested_at`, `deletion_reason` (`requested` or `expired`) and `deleted_at`;
- `expiry`: a sorted set, job id -> the epoch milliseconds its data expires;
- `deleting`: a sorted set, job id -> when its deletion task was last sent (the sweep sends it
  again when it has waited a sweep interval: a lost message or a task that gave up is retried);
- `team:<owner>:reuse`: a hash, dataset hash -> the team's latest succeeded job of that dataset
  (set by the transition script, dropped when that job's deletion is requested);
- `lifecycle:sweep`: the sweep's lock (SET NX PX): one sweeper at a time across the pool, at most
  one sweep a `retention_sweep_s`.

A deletion is never undone: once requested, the job's artifacts are 410 Gone and reuse skips it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.jobstore import EVENTS_MAXLEN, TERMINAL, JobStore, job_key
from app.redis_client import PREFIX as P
from app.redis_client import now_iso, translate

EXPIRY = P + "expiry"
DELETING = P + "deleting"
SWEEP_LOCK = P + "lifecycle:sweep"
SWEEP_BATCH = 200  # jobs a sweep handles at most (the next sweep takes the rest)

# Request a job's deletion (KEYS: the job, its events, `deleting`; ARGV: now (ISO), now (epoch ms),
# reason, maxlen, the key prefix: the team's reuse hash is derived from the job's owner, as the job
# store's scripts derive its indexes). Returns 'deleted' (done before), 'pending' (requested before:
# sent again), 'requested' or '' (no such job).
_REQUEST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return '' end
if redis.call('HEXISTS', KEYS[1], 'deleted_at') == 1 then return 'deleted' end
local id = redis.call('HGET', KEYS[1], 'id')
local reuse = ARGV[5] .. 'team:' .. redis.call('HGET', KEYS[1], 'owner') .. ':reuse'
local dataset = redis.call('HGET', KEYS[1], 'dataset_hash')
if dataset and redis.call('HGET', reuse, dataset) == id then redis.call('HDEL', reuse, dataset) end
redis.call('ZADD', KEYS[3], tonumber(ARGV[2]), id)
if redis.call('HSETNX', KEYS[1], 'deletion_requested_at', ARGV[1]) == 0 then return 'pending' end
redis.call('HSET', KEYS[1], 'deletion_reason', ARGV[3], 'updated_at', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[4]), '*', 'type', 'deletion_requested',
           'reason', ARGV[3], 'at', ARGV[1])
return 'requested'
"""

# The deletion finished (KEYS: the job, its events, `expiry`, `deleting`; ARGV: now, objects, maxlen).
_DELETED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[4], id)
if redis.call('HSETNX', KEYS[1], 'deleted_at', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'type', 'deleted',
           'objects', ARGV[2], 'at', ARGV[1])
return 1
"""


def _ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Swept:
    """What one sweep did."""

    expired: list[str] = field(default_factory=list)  # deletions it requested (data past its time)
    resent: list[str] = field(default_factory=list)  # requested deletions whose task it sent again
    not_yet: list[str] = field(default_factory=list)  # listed as due, but the record says later


class Lifecycle:
    """Deletion requests and tombstones, the expiry index and the reuse index, over the job store's
    Redis."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.r: Any = store.r
        self._request = store.r.register_script(_REQUEST)
        self._deleted = store.r.register_script(_DELETED)

    # ---- deletion ---------------------------------------------------------------------------

    def request_delete(self, job_id: str, reason: str = "requested", now_ms: int | None = None) -> str:
        """Record that the job's data is to be deleted: `requested` the first time, `pending` when it
        was requested before and is not finished, `deleted` when it is, '' when there is no job. The
        job leaves the reuse index at once."""
        with translate():
            got: str = self._request(
                keys=[job_key(job_id), job_key(job_id, ":events"), DELETING],
                args=[now_iso(), now_ms if now_ms is not None else _ms(), reason, EVENTS_MAXLEN, P])
        return got

    def mark_deleted(self, job_id: str, objects: int) -> bool:
        """Every object of the job is gone: set `deleted_at` (once) and drop it from the indexes."""
        with translate():
            return bool(self._deleted(keys=[job_key(job_id), job_key(job_id, ":events"), EXPIRY, DELETING],
                                      args=[now_iso(), objects, EVENTS_MAXLEN]))

    def sent(self, job_id: str, now_ms: int | None = None) -> None:
        """The job's deletion task was (re)sent now."""
        with translate():
            self.r.zadd(DELETING, {job_id: now_ms if now_ms is not None else _ms()})

    # ---- reuse ------------------------------------------------------------------------------

    def reusable(self, owner: str, dataset_hash: str) -> str | None:
        """The team's latest succeeded job with this dataset hash whose deletion was never
        requested, or None."""
        with translate():
            job_id: str | None = self.r.hget(P + f"team:{owner}:reuse", dataset_hash)
        return job_id

    # ---- retention --------------------------------------------------------------------------

    def take_sweep(self, interval_s: float, holder: str) -> bool:
        """Whether this caller sweeps now: the lock is free, and it holds it for `interval_s` (so
        the pool sweeps once an interval, whoever's heartbeat comes first)."""
        with translate():
            return bool(self.r.set(SWEEP_LOCK, holder, nx=True, px=max(1, int(interval_s * 1000))))

    def sweep(self, send: Callable[[str], None], *, now_ms: int | None = None,
              resend_after_s: float = 300.0, limit: int = SWEEP_BATCH) -> Swept:
        """Request the deletion of every job whose data expired by `now_ms` (Redis' clock when None;
        tests pass their own) and send its task; send again the tasks of deletions requested earlier
        and not finished after `resend_after_s`. A job is deleted for expiry only when its own
        record says it expired: the index alone never deletes anything."""
        if now_ms is None:
            with translate():
                sec, usec = self.r.time()
            now_ms = int(sec) * 1000 + int(usec) // 1000
        out = Swept()
        with translate():
            due = self.r.zrangebyscore(EXPIRY, "-inf", now_ms, start=0, num=limit)
            stale = self.r.zrangebyscore(DELETING, "-inf", now_ms - int(resend_after_s * 1000),
                                         start=0, num=limit)
            pipe = self.r.pipeline(transaction=False)
            for job_id in due:
                pipe.hmget(job_key(job_id), "status", "expires_at_ms", "deleted_at")
            rows = pipe.execute() if due else []
        for job_id, (status, expires, deleted) in zip(due, rows, strict=True):
            if deleted or status is None:  # done, or the record is gone: nothing to delete
                with translate():
                    self.r.zrem(EXPIRY, job_id)
                continue
            if status not in TERMINAL or expires is None or int(expires) > now_ms:
                out.not_yet.append(job_id)
                continue
            if self.request_delete(job_id, "expired", now_ms) == "requested":  # 'pending': resent below
                out.expired.append(job_id)
                send(job_id)
        for job_id in stale:
            if job_id in out.expired:
                continue
            with translate():
                deleted = self.r.hget(job_key(job_id), "deleted_at")
            if deleted:
                with translate():
                    self.r.zrem(DELETING, job_id)
                continue
            self.sent(job_id, now_ms)
            out.resent.append(job_id)
            send(job_id)
        return out
