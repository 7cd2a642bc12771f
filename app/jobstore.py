"""The Redis job store: one hash per job, the team's indexes, compare-and-set transitions, progress,
an event log (a Redis stream) and idempotency keys with a TTL.

Job ids sort by creation time (hex milliseconds first), so lexicographic order is newest-last and
the team indexes are sorted sets ranged by lex. Status changes go through one Lua script so the
check, the write, the index move and the event are atomic. Single Redis instance (no cluster):
the scripts derive the team's index keys from the job.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from app.redis_client import PREFIX as P
from app.redis_client import connect, now_iso, translate

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

# Sum the shards' progress fields (shard*:identities, shard*:images: what `_decode` sums) of the
# progress hash KEYS[2]; used once per job to seed the running sums, and by reads of jobs without them.
_SUM_SHARDS = """
local function sum_shards(key)
  local ids, imgs = 0, 0
  local progress = redis.call('HGETALL', key)
  for i = 1, #progress, 2 do
    local part, what = string.match(progress[i], '^(.*):([^:]*)$')
    if part and string.sub(part, 1, 5) == 'shard' then
      if what == 'identities' then ids = ids + tonumber(progress[i + 1])
      elseif what == 'images' then imgs = imgs + tonumber(progress[i + 1]) end
    end
  end
  return ids, imgs
end
"""

# Set one part's progress (KEYS[2] the progress hash, KEYS[1] the job) and move the running sums
# `sum:identities`/`sum:images` by the change, so reads need not add up every shard.
_RECORD_PROGRESS = _SUM_SHARDS + """
local part, ids, imgs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HEXISTS', KEYS[2], 'sum:identities') == 0 then
  local si, sm = sum_shards(KEYS[2])
  redis.call('HSET', KEYS[2], 'sum:identities', si, 'sum:images', sm)
end
local old_ids = tonumber(redis.call('HGET', KEYS[2], part .. ':identities') or '0')
local old_imgs = tonumber(redis.call('HGET', KEYS[2], part .. ':images') or '0')
redis.call('HSET', KEYS[2], part .. ':identities', ids, part .. ':images', imgs)
if string.sub(part, 1, 5) == 'shard' then
  redis.call('HINCRBY', KEYS[2], 'sum:identities', ids - old_ids)
  redis.call('HINCRBY', KEYS[2], 'sum:images', imgs - old_imgs)
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
return 1
"""

# A job's hash and its shards' summed progress, or an empty reply when there is no such job.
_READ = _SUM_SHARDS + """
local job = redis.call('HGETALL', KEYS[1])
if #job == 0 then return {} end
local sums = redis.call('HMGET', KEYS[2], 'sum:identities', 'sum:images')
if sums[1] then return {job, tonumber(sums[1]), tonumber(sums[2])} end
local ids, imgs = sum_shards(KEYS[2])
return {job, ids, imgs}
"""

_SHARD_DONE = """
redis.call('SADD', KEYS[1], ARGV[1])
return redis.call('SCARD', KEYS[1])
"""

# Quotas (app.api.limits), checked in the same script as the creation: this prelude runs first, then
# _CREATE's text. Its own arguments are the last five of ARGV (owner, images, prefix, max concurrent
# jobs, max images per UTC day; 0 = no limit), so _CREATE's stay as they are. An Idempotency-Key
# that exists is a replay (or a 409/422): it is never refused and counts nothing.
_QUOTA_PRELUDE = """
local qn = #ARGV
local q_team = ARGV[qn - 2] .. 'team:' .. ARGV[qn - 4]
local q_images, q_conc, q_daymax = tonumber(ARGV[qn - 3]), tonumber(ARGV[qn - 1]), tonumber(ARGV[qn])
local q_now = tonumber(redis.call('TIME')[1])
local q_day = math.floor(q_now / 86400)
local q_daykey = q_team .. ':images:' .. q_day
local q_conc_now = redis.call('ZCARD', q_team .. ':status:queued')
  + redis.call('ZCARD', q_team .. ':status:running') + redis.call('ZCARD', q_team .. ':status:canceling')
local q_used = tonumber(redis.call('GET', q_daykey) or '0')
local q_usage = {q_conc_now, q_used, q_day, 86400 - q_now % 86400}
if KEYS[2] == '' or redis.call('EXISTS', KEYS[2]) == 0 then
  if q_conc > 0 and q_conc_now >= q_conc then return {'quota', 'concurrent_jobs', unpack(q_usage)} end
  if q_daymax > 0 and q_used + q_images > q_daymax then
    return {'quota', 'images_per_day', unpack(q_usage)}
  end
  redis.call('INCRBY', q_daykey, q_images)
  redis.call('EXPIRE', q_daykey, 2 * 86400)
end
"""

_PUT_WEBHOOK = """
if redis.call('HSETNX', KEYS[1], 'once:' .. ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'msg:' .. ARGV[2], ARGV[3])
return 1
"""


def _uint64_pattern() -> str:
    """A regex (no anchors) for the decimal numbers 0 .. 2**64 - 1, written without leading zeros:
    exactly what Redis reads as one part of a stream id. ASCII digits only (Python's `\\d` and
    `int()` also take other scripts' digits, which Redis refuses)."""
    top = str(2**64 - 1)
    alts = ["0", f"[1-9][0-9]{{0,{len(top) - 2}}}"]  # 1 .. 19 digits
    for i, d in enumerate(top):  # 20 digits: equal to `top` up to i, then a smaller digit
        lo = 1 if i == 0 else 0
        if int(d) - 1 >= lo:
            rest = len(top) - i - 1
            digit = str(lo) if int(d) - 1 == lo else f"[{lo}-{int(d) - 1}]"
            alts.append(top[:i] + digit + ("[0-9]" if rest == 1 else f"[0-9]{{{rest}}}" if rest else ""))
    alts.append(top)
    return "(?:" + "|".join(alts) + ")"


UINT64 = _uint64_pattern()
STREAM_ID_MAX = f"{2**64 - 1}-{2**64 - 1}"
# An event cursor: `-` (from the start) or a stream id `<ms>-<seq>`, each part below 2**64.
EVENT_CURSOR_PATTERN = rf"^(?:-|{UINT64}-{UINT64})$"
EVENT_CURSOR_MAX_LENGTH = len(STREAM_ID_MAX)
_EVENT_CURSOR = re.compile(EVENT_CURSOR_PATTERN)


def check_event_cursor(after: str) -> str:
    """`after` when it is an event cursor (`-`, or `<ms>-<seq>` with both parts below 2**64 and no
    leading zeros); ValueError otherwise, before it reaches Redis. Any well-formed id is a cursor,
    whether or not the stream holds it."""
    if not isinstance(after, str) or not _EVENT_CURSOR.fullmatch(after):
        raise ValueError(f"not an event cursor: {after!r} (expected '-' or '<ms>-<seq>', each a "
                         f"decimal number below 2**64)")
    return after


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


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        # redis-py's annotations do not model decode_responses=True (str, not bytes): Any here.
        self.r: Any = client
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)
        self._shard_done = client.register_script(_SHARD_DONE)
        self._put_webhook = client.register_script(_PUT_WEBHOOK)
        self._create_quota = client.register_script(_QUOTA_PRELUDE + _CREATE)
        self._read = client.register_script(_READ)
        self._record_progress = client.register_script(_RECORD_PROGRESS)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(connect(url))

    def ping(self) -> bool:
        with translate():
            return bool(self.r.ping())

    # ---- creation and reads -------------------------------------------------------------

    def create(self, owner: str, spec: dict[str, Any], spec_hash: str, *, identities: int,
               images: int, idempotency_key: str | None = None, body_hash: str | None = None,
               idempotency_ttl_s: int = 86400) -> Created:
        job_id = new_job_id()
        idem = self._idem_key(owner, idempotency_key) if idempotency_key else ""
        with translate():
            kind, value = self._create(
                keys=[P + f"job:{job_id}", idem],
                args=[job_id, owner, json.dumps(spec, sort_keys=True), spec_hash,
                      body_hash or "", idempotency_ttl_s, now_iso(), identities, images, P],
            )
        if kind == "created":
            return Created(job_id, True)
        prior = json.loads(value)
        return Created(prior["job"], False, prior["hash"], prior["state"] == "pending")

    def create_within_quota(self, owner: str, spec: dict[str, Any], spec_hash: str, *, identities: int,
                            images: int, max_concurrent: int, max_images_per_day: int,
                            idempotency_key: str | None = None, body_hash: str | None = None,
                            idempotency_ttl_s: int = 86400) -> tuple[Created | None, dict[str, Any]]:
        """`create`, unless the team's quotas refuse it, checked and counted in the same script:
        `max_concurrent` non-terminal jobs, `max_images_per_day` images submitted in the current UTC
        day (0 = no limit). Returns (Created, usage) or (None, usage) when refused, where usage has
        `refused` ('concurrent_jobs', 'images_per_day' or ''), `concurrent`, `images_today`,
        `day` (days since the epoch) and `seconds_left` (until 00:00 UTC): as the refusal saw them,
        or after the creation."""
        script = self._create_quota
        job_id = new_job_id()
        idem = self._idem_key(owner, idempotency_key) if idempotency_key else ""
        with translate():
            got = script(keys=[P + f"job:{job_id}", idem], args=[
                job_id, owner, json.dumps(spec, sort_keys=True), spec_hash, body_hash or "",
                idempotency_ttl_s, now_iso(), identities, images, P,
                owner, images, P, max_concurrent, max_images_per_day])
        if got[0] == "quota":
            conc, used, day, left = (int(x) for x in got[2:6])
            return None, {"refused": got[1], "concurrent": conc, "images_today": used, "day": day,
                          "seconds_left": left}
        usage: dict[str, Any] = {**self.quota_usage(owner), "refused": ""}
        if got[0] == "created":
            return Created(job_id, True), usage
        prior = json.loads(got[1])
        return Created(prior["job"], False, prior["hash"], prior["state"] == "pending"), usage

    def quota_usage(self, owner: str) -> dict[str, int]:
        """The team's non-terminal jobs and today's (UTC) submitted images, by Redis' clock."""
        team = P + f"team:{owner}"
        with translate():
            now = int(self.r.time()[0])
            day = now // 86400
            pipe = self.r.pipeline(transaction=False)
            for s in ("queued", "running", "canceling"):
                pipe.zcard(f"{team}:status:{s}")
            pipe.get(f"{team}:images:{day}")
            *counts, used = pipe.execute()
        return {"concurrent": sum(counts), "images_today": int(used or 0), "day": day,
                "seconds_left": 86400 - now % 86400}

    def refund_images(self, owner: str, images: int, day: int) -> None:
        """Take back images counted by create_within_quota on `day` (a job that was not enqueued)."""
        with translate():
            self.r.decrby(P + f"team:{owner}:images:{day}", images)

    def confirm_idempotency(self, owner: str, key: str, job_id: str, body_hash: str) -> None:
        value = json.dumps({"hash": body_hash, "job": job_id, "state": "done"})
        with translate():
            self.r.set(self._idem_key(owner, key), value, keepttl=True)

    def forget_idempotency(self, owner: str, key: str) -> None:
        with translate():
            self.r.delete(self._idem_key(owner, key))

    @staticmethod
    def _idem_key(owner: str, key: str) -> str:
        import hashlib

        return P + f"idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record with decoded JSON fields and summed progress, or None."""
        with translate():
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(P + f"job:{job_id}")
            pipe.hgetall(P + f"job:{job_id}:progress")
            raw, progress = pipe.execute()
        if not raw:
            return None
        return _decode(raw, progress)

    def read(self, job_id: str) -> dict[str, Any] | None:
        """What `get` returns, in one round trip whose size does not grow with the job's shards:
        progress comes from the running sums that `set_progress` keeps (the status poll's read)."""
        with translate():
            got = self._read(keys=[P + f"job:{job_id}", P + f"job:{job_id}:progress"])
        if not got:
            return None
        flat, identities, images = got
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return _decode(raw, {"shards:identities": identities, "shards:images": images})

    def set_progress(self, job_id: str, part: str, *, identities: int, images: int) -> None:
        """Progress of one part (a shard, or sampling), and the job's running sums that `read`
        returns. Set, not added: a redelivered shard that starts again moves the sums back."""
        with translate():
            self._record_progress(keys=[P + f"job:{job_id}", P + f"job:{job_id}:progress"],
                                  args=[part, identities, images, now_iso()])

    def status(self, job_id: str) -> str | None:
        with translate():
            status: str | None = self.r.hget(P + f"job:{job_id}", "status")
        return status

    def list_jobs(self, owner: str, *, status: str | None = None, limit: int = 20,
             after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """The team's jobs, newest first; `after` is the last id of the previous page."""
        index = P + (f"team:{owner}:status:{status}" if status else f"team:{owner}:jobs")
        hi = f"({after}" if after else "+"
        with translate():
            ids = self.r.zrevrangebylex(index, hi, "-", start=0, num=limit + 1)
            pipe = self.r.pipeline(transaction=False)
            for i in ids[:limit]:
                pipe.hgetall(P + f"job:{i}")
                pipe.hgetall(P + f"job:{i}:progress")
            rows = pipe.execute()
        jobs = [_decode(rows[k], rows[k + 1]) for k in range(0, len(rows), 2) if rows[k]]
        nxt = ids[limit - 1] if len(ids) > limit else None
        return jobs, nxt

    def count_by_status(self, owners: list[str]) -> dict[str, int]:
        """Jobs in each status, summed over the teams `owners` (the sizes of their status indexes,
        one round trip)."""
        with translate():
            pipe = self.r.pipeline(transaction=False)
            for owner in owners:
                for s in STATUSES:
                    pipe.zcard(P + f"team:{owner}:status:{s}")
            sizes = pipe.execute() if owners else []
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for k, n in enumerate(sizes):
            counts[STATUSES[k % len(STATUSES)]] += int(n)
        return counts

    # ---- transitions and progress -----------------------------------------------------

    def transition(self, job_id: str, to: Status, *, allowed: frozenset[str] | None = None,
                   **fields: Any) -> tuple[bool, str | None]:
        """Compare-and-set: move to `to` if the current status is in `allowed` (default: every
        legal predecessor). Returns (done, previous status)."""
        args: list[Any] = [to, now_iso(), ",".join(allowed or TRANSITIONS[to]), P]
        for k, v in fields.items():
            args += [k, v if isinstance(v, str) else json.dumps(v)]
        with translate():
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
        with translate():
            if self.r.hget(key, "stage") == stage:
                return
            pipe = self.r.pipeline()
            pipe.hset(key, mapping={"stage": stage, "updated_at": now_iso()})
            pipe.xadd(key + ":events", {"type": "stage", "stage": stage, "at": now_iso()},
                      maxlen=10000, approximate=True)
            pipe.execute()

    def set_totals(self, job_id: str, **totals: int) -> None:
        with translate():
            self.r.hset(P + f"job:{job_id}", mapping={f"{k}": v for k, v in totals.items()})

    def set_stage_progress(self, job_id: str, done: int, total: int, unit: str) -> None:
        """Progress within the current stage (optimiser steps, gallery images...)."""
        with translate():
            self.r.hset(P + f"job:{job_id}", mapping={
                "stage_done": done, "stage_total": total, "stage_unit": unit,
                "updated_at": now_iso()})

    def add_event(self, job_id: str, type_: str, **data: Any) -> None:
        fields = {"type": type_, "at": now_iso()}
        fields.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()})
        with translate():
            self.r.xadd(P + f"job:{job_id}:events", fields, maxlen=10000, approximate=True)

    def events(self, job_id: str, *, after: str = "-", limit: int = 1000,
               block_ms: int | None = None) -> list[dict[str, Any]]:
        """The job's events after the cursor `after` (exclusive; `-`: from the first), at most
        `limit`; with `block_ms`, wait that long for one when there is none yet. A malformed
        cursor is a ValueError (see `check_event_cursor`)."""
        check_event_cursor(after)
        key = P + f"job:{job_id}:events"
        if after == STREAM_ID_MAX and block_ms is None:
            return []  # nothing comes after the largest id (and Redis refuses `(max` as a start)
        with translate():
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
        with translate():
            return int(self._shard_done(keys=[P + f"job:{job_id}:shards_done"], args=[shard]))

    # ---- webhook messages ------------------------------------------------------------------

    def put_webhook(self, job_id: str, once: str, msg_id: str, message: str) -> bool:
        """Store a webhook message unless one was already stored for `once` (an event name, or
        `stage:<stage>`); True when this call stored it. The message is re-read by id at each
        delivery attempt, so every attempt sends the same bytes."""
        with translate():
            return bool(self._put_webhook(keys=[P + f"job:{job_id}:webhooks"],
                                          args=[once, msg_id, message]))

    def get_webhook(self, job_id: str, msg_id: str) -> str | None:
        with translate():
            message: str | None = self.r.hget(P + f"job:{job_id}:webhooks", f"msg:{msg_id}")
        return message

    # ---- model status published by workers ----------------------------------------------

    def publish_models(self, worker: str, statuses: dict[str, dict[str, Any]]) -> None:
        with translate():
            self.r.hset(P + "models", mapping={
                n: json.dumps({**s, "worker": worker, "at": now_iso()}) for n, s in statuses.items()
            })

    def model_statuses(self) -> dict[str, dict[str, Any]]:
        with translate():
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
