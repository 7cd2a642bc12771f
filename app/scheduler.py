"""Fair shard scheduling: which render shard the GPU pool runs next (docs/scheduling.md).

A job's render shards are not sent to Celery all at once. When its identities are sampled the job
is *held* here, in Redis, and its shards are *released* (sent as Celery tasks) as the pool has
room: at most `slots` shards are released and unfinished at any time (the live worker processes
that consume `gpu`, from their heartbeats, or IDFORGE_SCHED_SLOTS), and at most
IDFORGE_SCHED_JOB_MAX_IN_FLIGHT of one job's. Who goes next (`plan`):

1. across teams, weighted fair queuing on virtual time (start-time fair queuing): each release
   advances its team's virtual time by the shard's estimated GPU-seconds over the team's weight,
   and the team with held work and the least virtual time goes next. A team that comes back from
   idle starts at the clock (the virtual time of the last release), so idling banks no credit.
   Shares are GPU time in proportion to weight, whatever each team's shard sizes and models; plain
   round-robin over teams would share shards instead, and a team of Arc2Face shards would get a
   hundred times the GPU of a team of StyleGAN2 shards;
2. within a team, `interactive` jobs before `batch` ones;
3. among a team's jobs of one priority, round-robin (the least recently served first).

A release is one optimistic Redis transaction (WATCH on the schedule's state hash, which every
change bumps), so concurrent releasers never release a shard twice; the Celery send follows the
commit. A released shard is tracked until its task finishes (`finished`); one whose send failed,
or whose sender died before sending, is sent again by a later release once `resend_s` have passed
with no delivery started. A duplicate delivery is harmless: the task ledger (workers/tasking.py)
runs a shard once. Nothing is preempted: shards are the unit of fairness, so a runnable job waits
at most for the first running shard to end (docs/scheduling.md, "Shard size").

Redis keys (all small; the held shards of a job are a counter, not a list):
- `sched:state` hash: `version` (bumped by every change), `clock`, `seq` (round-robin stamps);
- `sched:jobs` set, and `sched:job:<id>` hash per job in the schedule: team, priority, total,
  next (the next shard to release), in_flight, cost (GPU-seconds a shard), served, held_at;
- `sched:in_flight` hash: `<job>:<shard>` -> `<released at>|sent` or `|started`;
- `sched:vtime` hash: team -> virtual time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import redis

from app.errors import JobStoreUnavailable
from app.redis_client import PREFIX as P
from app.redis_client import translate
from app.settings import Settings
from app.telemetry import Telemetry

log = logging.getLogger("idforge.scheduler")

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")  # first runs first, within a team
RANK = {p: i for i, p in enumerate(PRIORITIES)}

STATE = P + "sched:state"
JOBS = P + "sched:jobs"
IN_FLIGHT = P + "sched:in_flight"
VTIME = P + "sched:vtime"
POSITION_LIMIT = 2000  # releases simulated to find a job's place; past it the place is unknown
MAX_RETRIES = 50  # optimistic transactions retried on a conflict


def job_hash(job_id: str) -> str:
    return P + f"sched:job:{job_id}"


@dataclass
class HeldJob:
    id: str
    team: str
    priority: Priority
    total: int  # shards
    next: int  # the next shard to release; shards next..total-1 are held
    in_flight: int  # released and not finished
    cost: float  # estimated GPU-seconds of one shard
    served: int = 0  # round-robin stamp of its last release (0: never released)
    held_at: float = 0.0  # when it entered the schedule (Redis time, seconds)

    @property
    def held(self) -> int:
        return self.total - self.next


@dataclass
class Schedule:
    """A consistent snapshot of the schedule."""

    jobs: dict[str, HeldJob] = field(default_factory=dict)
    vtime: dict[str, float] = field(default_factory=dict)
    clock: float = 0.0
    seq: int = 0
    in_flight: dict[str, tuple[float, str]] = field(default_factory=dict)  # job:shard -> (at, state)
    now: float = 0.0
    version: int = 0

    def copy(self) -> Schedule:
        return replace(self, jobs={k: replace(j) for k, j in self.jobs.items()}, vtime=dict(self.vtime),
                       in_flight=dict(self.in_flight))


def _next_job(s: Schedule, job_cap: int) -> HeldJob | None:
    """The job whose shard goes next: the team with the least virtual time (then its name), within
    it the highest priority, then the least recently served job (then the oldest, then its id)."""
    best: tuple[Any, ...] | None = None
    pick = None
    for j in s.jobs.values():
        if j.next >= j.total or (job_cap and j.in_flight >= job_cap):
            continue
        key = (max(s.vtime.get(j.team, 0.0), s.clock), j.team, RANK[j.priority], j.served, j.held_at, j.id)
        if best is None or key < best:
            best, pick = key, j
    return pick


def _release(s: Schedule, j: HeldJob, weights: Mapping[str, float]) -> int:
    """Release `j`'s next shard in `s`: advance the clock, the team's virtual time and the stamps."""
    start = max(s.vtime.get(j.team, 0.0), s.clock)
    s.clock = start
    s.vtime[j.team] = start + j.cost / weights.get(j.team, 1.0)
    s.seq += 1
    shard = j.next
    j.next, j.in_flight, j.served = j.next + 1, j.in_flight + 1, s.seq
    s.in_flight[f"{j.id}:{shard}"] = (s.now, "sent")
    return shard


def plan(s: Schedule, *, slots: int, job_cap: int = 0, weights: Mapping[str, float] | None = None
         ) -> list[tuple[str, int]]:
    """Release shards in `s` (changed in place) until `slots` are in flight or nothing is held that
    may run; returns (job, shard) in release order. `job_cap` > 0 caps one job's shards in flight."""
    weights = weights or {}
    picks: list[tuple[str, int]] = []
    while len(s.in_flight) < slots:
        j = _next_job(s, job_cap)
        if j is None:
            break
        picks.append((j.id, _release(s, j, weights)))
    return picks


def shards_ahead(s: Schedule, job_id: str, weights: Mapping[str, float] | None = None,
                 limit: int = POSITION_LIMIT) -> int | None:
    """How many shards of other jobs are released before `job_id`'s next one (no caps, nothing
    finishing meanwhile); None when it has nothing held or more than `limit` go first."""
    sim = s.copy()
    target = sim.jobs.get(job_id)
    if target is None or target.held == 0:
        return None
    for n in range(limit + 1):
        j = _next_job(sim, 0)
        if j is None:
            return None
        if j.id == job_id:
            return n
        _release(sim, j, weights or {})
    return None


# ---- Redis -----------------------------------------------------------------------------------------

# Everything `plan` needs, in one round trip: state, Redis time, virtual times, in-flight table,
# then per job its hash (flattened).
_READ = """
local st = redis.call('HMGET', KEYS[1], 'version', 'clock', 'seq')
local t = redis.call('TIME')
local out = {st[1] or '0', st[2] or '0', st[3] or '0', t[1] .. '.' .. string.format('%06d', tonumber(t[2])),
             redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
local jobs = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  jobs[#jobs + 1] = id
  jobs[#jobs + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
out[7] = jobs
return out
"""

# KEYS: state, jobs, the job's hash. ARGV: id, team, priority, shards, cost. Returns 1 when held
# now, 0 when it already was (a redelivered sampling task).
_HOLD = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[3], 'team', ARGV[2], 'priority', ARGV[3], 'total', ARGV[4], 'next', 0,
           'in_flight', 0, 'cost', ARGV[5], 'served', 0, 'held_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'version', 1)
return 1
"""

# KEYS: state, jobs, the job's hash, in-flight. ARGV: id, shard. A shard's task ended: drop it
# from the in-flight table (once) and the job once nothing of it is held or in flight.
_FINISHED = """
if redis.call('HDEL', KEYS[4], ARGV[1] .. ':' .. ARGV[2]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then
  local left = redis.call('HINCRBY', KEYS[3], 'in_flight', -1)
  local h = redis.call('HMGET', KEYS[3], 'next', 'total')
  if left <= 0 and tonumber(h[1]) >= tonumber(h[2]) then
    redis.call('DEL', KEYS[3])
    redis.call('SREM', KEYS[2], ARGV[1])
  end
end
redis.call('HINCRBY', KEYS[1], 'version', 1)
return 1
"""

# KEYS: state, in-flight. ARGV: job:shard. A delivery started the shard (it is no longer resent).
_STARTED = """
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], string.match(v, '^[^|]*') .. '|started')
redis.call('HINCRBY', KEYS[1], 'version', 1)
return 1
"""

# KEYS: state, jobs, the job's hash, in-flight. ARGV: id. The job left the schedule (it ended, or
# is being canceled). Returns {was it there, shards it had in flight, shards it had held}.
_FORGET = """
local there = redis.call('EXISTS', KEYS[3])
local held = 0
if there == 1 then
  local h = redis.call('HMGET', KEYS[3], 'next', 'total')
  held = tonumber(h[2]) - tonumber(h[1])
end
local n = 0
local prefix = ARGV[1] .. ':'
for _, k in ipairs(redis.call('HKEYS', KEYS[4])) do
  if string.sub(k, 1, #prefix) == prefix then redis.call('HDEL', KEYS[4], k); n = n + 1 end
end
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[2], ARGV[1])
if there == 1 or n > 0 then redis.call('HINCRBY', KEYS[1], 'version', 1) end
return {there, n, held}
"""


def _parse(raw: list[Any]) -> Schedule:
    version, clock, seq, now, in_flight, vtime, jobs = raw
    s = Schedule(clock=float(clock), seq=int(seq), now=float(now), version=int(version))
    s.vtime = {vtime[i]: float(vtime[i + 1]) for i in range(0, len(vtime), 2)}
    for i in range(0, len(in_flight), 2):
        at, _, state = in_flight[i + 1].partition("|")
        s.in_flight[in_flight[i]] = (float(at), state or "sent")
    for i in range(0, len(jobs), 2):
        h = {jobs[i + 1][k]: jobs[i + 1][k + 1] for k in range(0, len(jobs[i + 1]), 2)}
        if not h:
            continue
        s.jobs[jobs[i]] = HeldJob(
            id=jobs[i], team=h["team"], priority=h["priority"], total=int(h["total"]), next=int(h["next"]),
            in_flight=int(h["in_flight"]), cost=float(h["cost"]), served=int(h["served"]),
            held_at=float(h["held_at"]))
    return s


@dataclass(frozen=True)
class Backlog:
    """Shards waiting in the schedule, by (team, priority), and released ones not finished."""

    held: dict[tuple[str, str], int]
    in_flight: int

    @property
    def held_total(self) -> int:
        return sum(self.held.values())


class Scheduler:
    """The schedule in Redis. `send(job_id, shard)` enqueues a render shard's task; `slots()` is
    the pool's room (shards released at once); `weights` maps teams to their weight (default 1)."""

    def __init__(self, client: redis.Redis, *, send: Callable[[str, int], None] | None = None,
                 slots: Callable[[], int] = lambda: 1, job_cap: int = 0,
                 weights: Mapping[str, float] | None = None, resend_s: float = 3600.0) -> None:
        self.r: Any = client
        self.send, self.slots, self.job_cap = send, slots, job_cap
        self.weights = dict(weights or {})
        self.resend_s = resend_s
        self._hold = client.register_script(_HOLD)
        self._finished = client.register_script(_FINISHED)
        self._started = client.register_script(_STARTED)
        self._forget = client.register_script(_FORGET)

    @classmethod
    def for_service(cls, client: redis.Redis, s: Settings,
                    send: Callable[[str, int], None] | None = None) -> Scheduler:
        """The settings' scheduler: slots from IDFORGE_SCHED_SLOTS or the live `gpu` workers."""
        telemetry = Telemetry(client)
        slots: Callable[[], int] = (lambda: s.sched_slots) if s.sched_slots else telemetry.gpu_slots
        return cls(client, send=send, slots=slots, job_cap=s.sched_job_max_in_flight,
                   weights=s.team_weights, resend_s=float(s.visibility_timeout_s))

    def snapshot(self, client: Any = None) -> Schedule:
        """The schedule as one read; `client`: a pipeline in WATCH (immediate) mode. EVAL, not
        EVALSHA: a watching pipeline cannot load a script that a restarted Redis forgot."""
        with translate():
            return _parse((client or self.r).eval(_READ, 4, STATE, JOBS, IN_FLIGHT, VTIME, P + "sched:job:"))

    def hold(self, job_id: str, team: str, priority: Priority, shards: int, cost: float) -> bool:
        """Put a job's shards 0..shards-1 in the schedule; False when it is there already."""
        if priority not in RANK:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        with translate():
            return bool(self._hold(keys=[STATE, JOBS, job_hash(job_id)],
                                   args=[job_id, team, priority, shards, repr(float(cost))]))

    def started(self, job_id: str, shard: int) -> None:
        with translate():
            self._started(keys=[STATE, IN_FLIGHT], args=[f"{job_id}:{shard}"])

    def finished(self, job_id: str, shard: int) -> bool:
        """A shard's task ended (done, or its job ended): its slot is free. False when it was not
        in flight (a repeated delivery, or a job that left the schedule)."""
        with translate():
            return bool(self._finished(keys=[STATE, JOBS, job_hash(job_id), IN_FLIGHT], args=[job_id, shard]))

    def in_flight_of(self, job_id: str) -> int:
        """How many of the job's shards are released and not finished (the in-flight table holds at
        most the pool's slots, so this reads little)."""
        with translate():
            return sum(1 for _ in self.r.hscan_iter(IN_FLIGHT, match=f"{job_id}:*"))

    def forget(self, job_id: str) -> tuple[bool, int, int]:
        """Take the job out of the schedule (it ended or is being canceled): its held shards are
        never released. Returns (it was there, shards it had in flight, shards it had held)."""
        with translate():
            there, n, held = self._forget(keys=[STATE, JOBS, job_hash(job_id), IN_FLIGHT], args=[job_id])
        return bool(there), int(n), int(held)

    def release(self) -> list[tuple[str, int]]:
        """Release what the pool has room for, fairly, and send it; also send again the released
        shards whose send was lost (no delivery started them within resend_s). Returns what was
        sent. Safe to call from any number of processes at once."""
        slots = max(1, self.slots())
        for _ in range(MAX_RETRIES):
            try:
                picks, resend = self._commit(slots)
                break
            except redis.WatchError:
                continue
        else:
            log.warning("schedule: %d conflicting releases in a row; leaving it to the next one", MAX_RETRIES)
            return []
        sent = []
        for job_id, shard in [*resend, *picks]:
            try:
                if self.send is None:
                    raise RuntimeError("this scheduler has no way to send tasks")
                self.send(job_id, shard)
                sent.append((job_id, shard))
            except Exception as e:  # noqa: BLE001 - the broker: the shard is resent by a later release
                log.warning("schedule: cannot send shard %d of job %s (resent later): %s", shard, job_id, e)
                self._mark_unsent(job_id, shard)
        return sent

    def _commit(self, slots: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        with translate(), self.r.pipeline() as p:
            p.watch(STATE)
            s = self.snapshot(p)
            before = {k: (j.next, j.in_flight, j.served) for k, j in s.jobs.items()}
            vtime_before = dict(s.vtime)
            resend = []
            for key, (at, state) in s.in_flight.items():
                if state == "sent" and s.now - at >= self.resend_s:
                    job_id, _, shard = key.rpartition(":")
                    resend.append((job_id, int(shard)))
                    s.in_flight[key] = (s.now, "sent")
            picks = plan(s, slots=slots, job_cap=self.job_cap, weights=self.weights)
            if not picks and not resend:
                p.unwatch()
                return [], []
            p.multi()
            for k, j in s.jobs.items():
                if before[k] != (j.next, j.in_flight, j.served):
                    p.hset(job_hash(k), mapping={"next": j.next, "in_flight": j.in_flight, "served": j.served})
            changed = {t: v for t, v in s.vtime.items() if vtime_before.get(t) != v}
            if changed:
                p.hset(VTIME, mapping={t: repr(v) for t, v in changed.items()})
            entries = [f"{j}:{n}" for j, n in [*picks, *resend]]
            p.hset(IN_FLIGHT, mapping={k: f"{s.in_flight[k][0]:.6f}|sent" for k in entries})
            p.hset(STATE, mapping={"clock": repr(s.clock), "seq": s.seq})
            p.hincrby(STATE, "version", 1)
            p.execute()
        return picks, resend

    def _mark_unsent(self, job_id: str, shard: int) -> None:
        """The send failed: date the release back so that the next release sends it again."""
        try:
            with translate():
                key = f"{job_id}:{shard}"
                if self.r.hget(IN_FLIGHT, key) is not None:
                    self.r.hset(IN_FLIGHT, key, "0|sent")
        except JobStoreUnavailable as e:
            log.warning("schedule: cannot mark shard %d of job %s unsent: %s", shard, job_id, e)

    def backlog(self) -> Backlog:
        s = self.snapshot()
        held: dict[tuple[str, str], int] = {}
        for j in s.jobs.values():
            if j.held:
                held[(j.team, j.priority)] = held.get((j.team, j.priority), 0) + j.held
        return Backlog(held, len(s.in_flight))

    def place(self, job_id: str) -> dict[str, Any] | None:
        """Where the job stands in the schedule: shards held and in flight, shards of other jobs
        released before its next one, and an estimate of when that one starts (seconds from now:
        0 when the pool has room now). None when the job is not in the schedule."""
        s = self.snapshot()
        j = s.jobs.get(job_id)
        if j is None:
            return None
        out: dict[str, Any] = {"priority": j.priority, "shards_held": j.held, "shards_in_flight": j.in_flight,
                               "shards_ahead": None, "next_start_in_s": None}
        if j.held == 0:
            return out
        ahead = shards_ahead(s, job_id, self.weights)
        out["shards_ahead"] = ahead
        if ahead is None:
            return out
        slots = max(1, self.slots())
        # Shards that must end first: everything in flight and ahead, less the free room.
        wait = len(s.in_flight) + ahead - slots + 1
        if wait <= 0:
            out["next_start_in_s"] = 0.0
        else:
            costs = [s.jobs[k.rpartition(":")[0]].cost for k in s.in_flight if k.rpartition(":")[0] in s.jobs]
            mean = sum(costs) / len(costs) if costs else j.cost
            out["next_start_in_s"] = round(wait * mean / slots, 1)
        return out
