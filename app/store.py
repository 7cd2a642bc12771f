"""The Redis job store: one hash per job, the team's indexes, compare-and-set transitions, progress,
an event log (a Redis stream) and idempotency keys with a TTL.

Job ids sort by creation time (hex milliseconds first), so lexicographic order is newest-last and
the team indexes are sorted sets ranged by lex. Status changes go through one Lua script so the
check, the write, the index move and the event are atomic. Single Redis instance (no cluster):
the scripts derive the team's index keys from the job.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis

from app.errors import JobStoreUnavailable

Status = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]
STATUSES: tuple[Status, ...] = ("queued", "running", "canceling", "succeeded", "failed", "canceled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
STAGES = ("sampling_identities", "sampling_variations", "rendering", "evaluating", "packaging")
# Allowed predecessors of each status.
TRANSITIONS: dict[str, frozenset[str]] = {
    "running": frozenset({"queued", "running"}),
    "canceling": frozenset({"queued", "running"}),
    "canceled": frozenset({"queued", "running", "canceling"}),
    "succeeded": frozenset({"running"}),
    "failed": frozenset({"queued", "running", "canceling"}),
}

P = "idf:"

_TRANSITION = """
local job = KEYS[1]
local cur = redis.call('HGET', job, 'status')
if not cur then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return {0, cur} end
local to, now = ARGV[1], ARGV[2]
local id = redis.call('HGET', job, 'id')
local owner = redis.call('HGET', job, 'owner')
redis.call('HSET', job, 'status', to, 'updated_at', now)
if cur ~= to then redis.call('HSET', job, to .. '_at', now) end
for i = 5, #ARGV, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
redis.call('ZREM', ARGV[4] .. 'team:' .. owner .. ':status:' .. cur, id)
redis.call('ZADD', ARGV[4] .. 'team:' .. owner .. ':status:' .. to, 0, id)
if cur ~= to then
  redis.call('XADD', job .. ':events', 'MAXLEN', '~', 10000, '*', 'type', 'status',
             'from', cur, 'to', to, 'at', now)
end
return {1, cur}
"""

_CREATE = """
local job, idem = KEYS[1], KEYS[2]
if idem ~= '' then
  local v = redis.call('GET', idem)
  if v then return {'exists', v} end
  redis.call('SET', idem, cjson.encode({hash = ARGV[5], job = ARGV[1], state = 'pending'}),
             'EX', tonumber(ARGV[6]))
end
redis.call('HSET', job, 'id', ARGV[1], 'owner', ARGV[2], 'status', 'queued', 'spec', ARGV[3],
           'spec_hash', ARGV[4], 'created_at', ARGV[7], 'queued_at', ARGV[7],
           'updated_at', ARGV[7], 'identities_total', ARGV[8], 'images_total', ARGV[9])
redis.call('ZADD', ARGV[10] .. 'team:' .. ARGV[2] .. ':jobs', 0, ARGV[1])
redis.call('ZADD', ARGV[10] .. 'team:' .. ARGV[2] .. ':status:queued', 0, ARGV[1])
redis.call('XADD', job .. ':events', 'MAXLEN', '~', 10000, '*', 'type', 'status', 'from', '',
           'to', 'queued', 'at', ARGV[7])
return {'created', ARGV[1]}
"""

_SHARD_DONE = """
redis.call('SADD', KEYS[1], ARGV[1])
return redis.call('SCARD', KEYS[1])
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_last_us = 0


def new_job_id() -> str:
    """Sortable id: 14 hex digits of microseconds (strictly increasing within a process), then 8
    random hex digits."""
    global _last_us
    _last_us = max(time.time_ns() // 1000, _last_us + 1)
    return f"j{_last_us:014x}{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Created:
    job_id: str
    created: bool  # False: an earlier request with the same Idempotency-Key made it
    body_hash: str | None = None  # the earlier request's body hash (when created is False)
    pending: bool = False  # the earlier request is still being processed


@contextmanager
def _translate() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise JobStoreUnavailable(f"job store unreachable: {e}") from e
    except redis.ResponseError as e:
        if "LOADING" in str(e) or "READONLY" in str(e):
            raise JobStoreUnavailable(f"job store not ready: {e}") from e
        raise


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        # redis-py's annotations do not model decode_responses=True (str, not bytes): Any here.
        self.r: Any = client
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)
        self._shard_done = client.register_script(_SHARD_DONE)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                        socket_connect_timeout=5, health_check_interval=30,
                                        retry_on_timeout=True))

    def ping(self) -> bool:
        with _translate():
            return bool(self.r.ping())

    # ---- creation and reads -------------------------------------------------------------

    def create(self, owner: str, spec: dict[str, Any], spec_hash: str, *, identities: int,
               images: int, idempotency_key: str | None = None, body_hash: str | None = None,
               idempotency_ttl_s: int = 86400) -> Created:
        job_id = new_job_id()
        idem = self._idem_key(owner, idempotency_key) if idempotency_key else ""
        with _translate():
            kind, value = self._create(
                keys=[P + f"job:{job_id}", idem],
                args=[job_id, owner, json.dumps(spec, sort_keys=True), spec_hash,
                      body_hash or "", idempotency_ttl_s, now_iso(), identities, images, P],
            )
        if kind == "created":
            return Created(job_id, True)
        prior = json.loads(value)
        return Created(prior["job"], False, prior["hash"], prior["state"] == "pending")

    def confirm_idempotency(self, owner: str, key: str, job_id: str, body_hash: str) -> None:
        value = json.dumps({"hash": body_hash, "job": job_id, "state": "done"})
        with _translate():
            self.r.set(self._idem_key(owner, key), value, keepttl=True)

    def forget_idempotency(self, owner: str, key: str) -> None:
        with _translate():
            self.r.delete(self._idem_key(owner, key))

    @staticmethod
    def _idem_key(owner: str, key: str) -> str:
        import hashlib

        return P + f"idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record with decoded JSON fields and summed progress, or None."""
        with _translate():
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(P + f"job:{job_id}")
            pipe.hgetall(P + f"job:{job_id}:progress")
            raw, progress = pipe.execute()
        if not raw:
            return None
        return _decode(raw, progress)

    def status(self, job_id: str) -> str | None:
        with _translate():
            status: str | None = self.r.hget(P + f"job:{job_id}", "status")
        return status

    def list_jobs(self, owner: str, *, status: str | None = None, limit: int = 20,
             after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """The team's jobs, newest first; `after` is the last id of the previous page."""
        index = P + (f"team:{owner}:status:{status}" if status else f"team:{owner}:jobs")
        hi = f"({after}" if after else "+"
        with _translate():
            ids = self.r.zrevrangebylex(index, hi, "-", start=0, num=limit + 1)
            pipe = self.r.pipeline(transaction=False)
            for i in ids[:limit]:
                pipe.hgetall(P + f"job:{i}")
                pipe.hgetall(P + f"job:{i}:progress")
            rows = pipe.execute()
        jobs = [_decode(rows[k], rows[k + 1]) for k in range(0, len(rows), 2) if rows[k]]
        nxt = ids[limit - 1] if len(ids) > limit else None
        return jobs, nxt

    # ---- transitions and progress -----------------------------------------------------

    def transition(self, job_id: str, to: Status, *, allowed: frozenset[str] | None = None,
                   **fields: Any) -> tuple[bool, str | None]:
        """Compare-and-set: move to `to` if the current status is in `allowed` (default: every
        legal predecessor). Returns (done, previous status)."""
        args: list[Any] = [to, now_iso(), ",".join(allowed or TRANSITIONS[to]), P]
        for k, v in fields.items():
            args += [k, v if isinstance(v, str) else json.dumps(v)]
        with _translate():
            ok, prev = self._transition(keys=[P + f"job:{job_id}"], args=args)
        return bool(ok), (prev or None)

    def request_cancel(self, job_id: str) -> str | None:
        """Queued jobs cancel at once; running ones go to `canceling` until a worker stops."""
        if self.transition(job_id, "canceled", allowed=frozenset({"queued"}))[0]:
            return "canceled"
        self.transition(job_id, "canceling", allowed=frozenset({"running"}))
        return self.status(job_id)

    def set_stage(self, job_id: str, stage: str) -> None:
        key = P + f"job:{job_id}"
        with _translate():
            if self.r.hget(key, "stage") == stage:
                return
            pipe = self.r.pipeline()
            pipe.hset(key, mapping={"stage": stage, "updated_at": now_iso()})
            pipe.xadd(key + ":events", {"type": "stage", "stage": stage, "at": now_iso()},
                      maxlen=10000, approximate=True)
            pipe.execute()

    def set_totals(self, job_id: str, **totals: int) -> None:
        with _translate():
            self.r.hset(P + f"job:{job_id}", mapping={f"{k}": v for k, v in totals.items()})

    def set_stage_progress(self, job_id: str, done: int, total: int, unit: str) -> None:
        """Progress within the current stage (optimiser steps, gallery images...)."""
        with _translate():
            self.r.hset(P + f"job:{job_id}", mapping={
                "stage_done": done, "stage_total": total, "stage_unit": unit,
                "updated_at": now_iso()})

    def set_progress(self, job_id: str, part: str, *, identities: int, images: int) -> None:
        """Progress of one part (a shard, or sampling): set, not added, so redelivery can't
        double-count."""
        with _translate():
            self.r.hset(P + f"job:{job_id}:progress",
                        mapping={f"{part}:identities": identities, f"{part}:images": images})
            self.r.hset(P + f"job:{job_id}", "updated_at", now_iso())

    def add_event(self, job_id: str, type_: str, **data: Any) -> None:
        fields = {"type": type_, "at": now_iso()}
        fields.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()})
        with _translate():
            self.r.xadd(P + f"job:{job_id}:events", fields, maxlen=10000, approximate=True)

    def events(self, job_id: str, *, after: str = "-", limit: int = 1000,
               block_ms: int | None = None) -> list[dict[str, Any]]:
        key = P + f"job:{job_id}:events"
        with _translate():
            if block_ms is not None:
                got = self.r.xread({key: after if after != "-" else "0-0"}, count=limit,
                                   block=block_ms)
                items = got[0][1] if got else []
            else:
                start = f"({after}" if after != "-" else "-"
                items = self.r.xrange(key, start, "+", count=limit)
        return [{"id": eid, **fields} for eid, fields in items]

    def shard_done(self, job_id: str, shard: int) -> int:
        """Record shard completion; returns how many distinct shards are done."""
        with _translate():
            return int(self._shard_done(keys=[P + f"job:{job_id}:shards_done"], args=[shard]))

    def incr_attempt(self, job_id: str, task_key: str, by: int = 1) -> int:
        """Count deliveries of one task of a job (our own counter: Celery's redelivery after a
        worker crash does not count as a retry)."""
        with _translate():
            return int(self.r.hincrby(P + f"job:{job_id}:attempts", task_key, by))

    # ---- model status published by workers ----------------------------------------------

    def publish_models(self, worker: str, statuses: dict[str, dict[str, Any]]) -> None:
        with _translate():
            self.r.hset(P + "models", mapping={
                n: json.dumps({**s, "worker": worker, "at": now_iso()}) for n, s in statuses.items()
            })

    def model_statuses(self) -> dict[str, dict[str, Any]]:
        with _translate():
            return {k: json.loads(v) for k, v in self.r.hgetall(P + "models").items()}


_JSON_FIELDS = ("spec", "result", "error")
_INT_FIELDS = ("identities_total", "images_total", "shards_total")


def _decode(raw: dict[str, str], progress: dict[str, str]) -> dict[str, Any]:
    job: dict[str, Any] = dict(raw)
    for f in _JSON_FIELDS:
        if f in job:
            job[f] = json.loads(job[f])
    for f in _INT_FIELDS:
        if f in job:
            job[f] = int(job[f])
    done = {"identities": 0, "images": 0}
    for k, v in progress.items():
        part, _, what = k.rpartition(":")
        if part.startswith("shard") and what in done:
            done[what] += int(v)
    job["progress"] = {
        "identities_done": done["identities"],
        "identities_total": job.get("identities_total", 0),
        "images_done": done["images"],
        "images_total": job.get("images_total", 0),
        "stage": {"done": int(job.pop("stage_done", 0)), "total": int(job.pop("stage_total", 0)),
                  "unit": job.pop("stage_unit", None)},
    }
    return job
