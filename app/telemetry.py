"""Service telemetry: what workers record in Redis and what a snapshot of it reads back;
`app/api/metrics.py` turns a snapshot into the Prometheus text `GET /metrics` serves.

All state is in Redis, so every API process renders the same numbers:

- jobs by status: the size of each team's status index (kept by the store's transitions), summed
  over the teams with keys (remembered in a set, so a team whose key is later removed still counts);
- stage durations: a histogram per stage. Workers call `Telemetry.enter_stage` when a job changes
  stage and `end_stage` when it ends; a Lua script closes the previous stage against Redis' clock
  (no skew between hosts) and adds its duration to the histogram's buckets;
- images rendered: a counter the workers add to as shards report progress (`rate()` gives images/s);
- queue length per broker queue;
- worker heartbeats: each worker process writes its last-seen time (Redis' clock) every
  `worker_heartbeat_s`; it is live for 3 heartbeats, and forgotten an hour after its last one.
  It names the queues it consumes: the live ones on `gpu` are the scheduler's slots;
- queue waits: per (stage, team, priority), a histogram of the seconds from a stage's work being
  queued (or held by the scheduler) to a worker starting it, observed once per job and stage.

No metric carries anything about a job but counts; the queue waits and the scheduler's backlog
are labelled by team (the operator's configured teams, not anything a request names).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from app.jobstore import STAGES, JobStore
from app.redis_client import PREFIX as P
from app.redis_client import translate

log = logging.getLogger("idforge.metrics")

# Upper bounds (seconds) of the stage-duration histogram's buckets; +Inf is implied.
STAGE_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200,
                                    14400, 43200, 86400)
LIVE_BEATS = 3  # a worker is live while its last heartbeat is younger than this many intervals
FORGET_S = 3600  # a worker silent this long is dropped from the heartbeat table

IMAGES = P + "metrics:images"
STAGE = P + "metrics:stage:"  # + stage name: hash of b0..bN (per-bucket counts), sum, count
WORKERS = P + "workers"  # hash: worker name -> JSON {seen, ttl, pid, host, queues}
TEAMS = P + "metrics:teams"
WAIT = P + "metrics:wait:"  # + stage|team|priority: a histogram hash like STAGE's
WAITS = P + "metrics:waits"  # set of the stage|team|priority that have a wait histogram
WAIT_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200,
                                   14400, 43200, 86400)

# Add d seconds to the histogram hash h (b0..bN, sum, count); its bucket bounds are ARGV[3..].
_OBSERVE_FN = """
local function observe(h, d)
  local idx = #ARGV - 2
  for i = 3, #ARGV do
    if d <= tonumber(ARGV[i]) then idx = i - 3; break end
  end
  redis.call('HINCRBY', h, 'b' .. idx, 1)
  redis.call('HINCRBYFLOAT', h, 'sum', string.format('%.6f', d))
  redis.call('HINCRBY', h, 'count', 1)
end
"""

# Observe one queue wait. KEYS[1] the histogram, KEYS[2] the set of histograms; ARGV: its name,
# seconds, bounds...
_OBSERVE_WAIT = _OBSERVE_FN + """
observe(KEYS[1], tonumber(ARGV[2]))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# Move a job's stage clock: observe the time spent in the stage it leaves, start the new one.
# KEYS[1] = the job hash; ARGV = new stage ('' = stop the clock), histogram key prefix, bounds...
_STAGE_CLOCK = _OBSERVE_FN + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local prev = redis.call('HGET', KEYS[1], 'stage_clock')
if prev == ARGV[1] or (not prev and ARGV[1] == '') then return 0 end
if prev then
  local d = now - tonumber(redis.call('HGET', KEYS[1], 'stage_since'))
  if d < 0 then d = 0 end
  observe(ARGV[2] .. prev, d)
end
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'stage_clock', 'stage_since')
else
  redis.call('HSET', KEYS[1], 'stage_clock', ARGV[1], 'stage_since', string.format('%.6f', now))
end
return 1
"""

# Record a worker's heartbeat at Redis' time and drop workers silent for ARGV[3] seconds.
# KEYS[1] = the workers hash; ARGV = worker name, JSON info, forget-after seconds.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local info = cjson.decode(ARGV[2])
info['seen'] = now
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(info))
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, w = pcall(cjson.decode, all[i + 1])
  if not ok or type(w) ~= 'table' or not tonumber(w['seen'])
     or now - tonumber(w['seen']) > tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return 1
"""


@dataclass(frozen=True)
class StageHistogram:
    buckets: list[tuple[float, int]]  # (upper bound, cumulative count), the last bound +Inf
    sum: float
    count: int


@dataclass(frozen=True)
class WorkerBeat:
    name: str
    age_s: float  # seconds since its last heartbeat
    live: bool
    queues: tuple[str, ...] | None = None  # the queues it consumes (None: it did not say)

    @property
    def gpu(self) -> bool:
        return self.queues is None or "gpu" in self.queues


@dataclass(frozen=True)
class Snapshot:
    jobs: dict[str, int]  # status -> jobs
    stages: dict[str, StageHistogram]
    images: int
    queues: dict[str, int] | None  # None: the broker did not answer
    workers: list[WorkerBeat]
    waits: dict[tuple[str, str, str], StageHistogram] = field(default_factory=dict)  # (stage, team, priority)
    held: dict[tuple[str, str], int] | None = None  # the scheduler's held shards by (team, priority)
    in_flight: int | None = None  # shards released and not finished


class Telemetry:
    """The Redis side of the metrics: workers record, the API reads. Takes the job store's client."""

    def __init__(self, client: Any) -> None:
        self.r: Any = client
        self._clock = client.register_script(_STAGE_CLOCK)
        self._beat = client.register_script(_HEARTBEAT)
        self._wait = client.register_script(_OBSERVE_WAIT)

    # ---- recorded by workers -----------------------------------------------------------

    def enter_stage(self, job_id: str, stage: str) -> bool:
        """Start `stage`'s clock for the job, closing the previous stage's. Re-entering the
        current stage (a redelivered task) changes nothing. Returns whether the clock moved."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        return self._move_clock(job_id, stage)

    def end_stage(self, job_id: str) -> bool:
        """The job has ended: observe the time spent in its last stage and stop the clock."""
        return self._move_clock(job_id, "")

    def _move_clock(self, job_id: str, stage: str) -> bool:
        with translate():
            return bool(self._clock(keys=[P + f"job:{job_id}"],
                                    args=[stage, STAGE, *(repr(float(b)) for b in STAGE_BUCKETS)]))

    def count_images(self, n: int) -> None:
        """Add `n` rendered images to the service-wide counter."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n:
            with translate():
                self.r.incrby(IMAGES, n)

    def observe_wait(self, stage: str, team: str, priority: str, seconds: float) -> None:
        """A job's stage waited `seconds` from being queued to a worker starting it."""
        name = f"{stage}|{team}|{priority}"
        with translate():
            self._wait(keys=[WAIT + name, WAITS],
                       args=[name, repr(max(0.0, float(seconds))), *(repr(float(b)) for b in WAIT_BUCKETS)])

    def gpu_slots(self) -> int:
        """Live worker processes that consume the `gpu` queue (or do not say what they consume)."""
        return sum(1 for w in self.workers() if w.live and w.gpu)

    def heartbeat(self, worker: str, interval_s: float, **info: Any) -> None:
        """Worker `worker` is alive; it counts as live for LIVE_BEATS intervals."""
        body = json.dumps({**info, "ttl": LIVE_BEATS * interval_s})
        with translate():
            self._beat(keys=[WORKERS], args=[worker, body, FORGET_S])

    def goodbye(self, worker: str) -> None:
        """Worker `worker` is shutting down: drop it now rather than when its heartbeat goes stale."""
        with translate():
            self.r.hdel(WORKERS, worker)

    # ---- read by the API -----------------------------------------------------------------

    def workers(self) -> list[WorkerBeat]:
        with translate():
            pipe = self.r.pipeline(transaction=False)
            pipe.time()
            pipe.hgetall(WORKERS)
            (sec, usec), rows = pipe.execute()
        return _beats(sec + usec / 1e6, rows)

    def snapshot(self, store: JobStore, teams: Iterable[str],
                 queues: dict[str, int] | None, backlog: Any = None) -> Snapshot:
        """Every metric, read in two Redis round trips. `teams` are the teams with keys now."""
        teams = list(teams)
        with translate():
            pipe = self.r.pipeline(transaction=False)
            if teams:
                pipe.sadd(TEAMS, *teams)
            pipe.smembers(TEAMS)
            all_teams = sorted(pipe.execute()[-1])
            pipe = self.r.pipeline(transaction=False)
            pipe.time()
            pipe.hgetall(WORKERS)
            pipe.get(IMAGES)
            for s in STAGES:
                pipe.hgetall(STAGE + s)
            pipe.smembers(WAITS)
            (sec, usec), rows, images, *stages, wait_names = pipe.execute()
            wait_names = sorted(wait_names)
            pipe = self.r.pipeline(transaction=False)
            for name in wait_names:
                pipe.hgetall(WAIT + name)
            waits = pipe.execute() if wait_names else []
        return Snapshot(jobs=store.count_by_status(all_teams),
                        stages={s: _histogram(h) for s, h in zip(STAGES, stages, strict=True)},
                        images=int(images or 0), queues=queues, workers=_beats(sec + usec / 1e6, rows),
                        waits={_wait_labels(n): _histogram(h, WAIT_BUCKETS)
                               for n, h in zip(wait_names, waits, strict=True)},
                        held=None if backlog is None else dict(backlog.held),
                        in_flight=None if backlog is None else backlog.in_flight)


def _wait_labels(name: str) -> tuple[str, str, str]:
    stage, team, priority = name.split("|", 2)
    return stage, team, priority


def _histogram(h: dict[str, str], bounds_: tuple[float, ...] = STAGE_BUCKETS) -> StageHistogram:
    bounds = [*bounds_, float("inf")]
    running, buckets = 0, []
    for i, b in enumerate(bounds):
        running += int(h.get(f"b{i}", 0))
        buckets.append((b, running))
    return StageHistogram(buckets, float(h.get("sum", 0.0)), int(h.get("count", 0)))


def _beats(now: float, rows: dict[str, str]) -> list[WorkerBeat]:
    out = []
    for name, raw in sorted(rows.items()):
        try:
            w = json.loads(raw)
            age = max(0.0, now - float(w["seen"]))
            queues = w.get("queues")
            out.append(WorkerBeat(name, age, age <= float(w["ttl"]),
                                  tuple(str(q) for q in queues) if isinstance(queues, list) else None))
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable heartbeat of worker %s: %r", name, raw)
    return out

