"""Running a job's task once: leases, attempts, retries, and failures turned into job errors.

Celery delivers a task at least once (a redelivery after a worker is killed, a copy racing a
crashed worker's lease). Per (job, task) this module keeps, in Redis:
- a lease: one running delivery at a time; renewed from a daemon thread, it lapses `ttl_s` after
  its holder dies, and a delivery that finds it held sends itself again for later;
- an attempt counter: Celery's redelivery after a crash is not a retry, so our own count stops a
  task that kills its worker every time (`max_task_attempts`);
- a done mark: a late redelivery of a finished task returns at once.
What that costs per job, however many shards it has (README "Operations"):
- leases `:lease:<task>`: one per task running now, deleted when it ends and expiring by
  themselves (`task_lease_s`): bounded by the workers, not the shards;
- attempts `:attempts` (a hash, task -> deliveries): a task that finishes at its first attempt
  drops its field (the done mark says it ran once), so the hash holds the running tasks, the
  restarted ones and `finalize`: it does not grow with the shards;
- done marks: one bit per numbered task (`:tasks_done:render_shard`, ceil(shards/8) bytes), the
  other tasks (`sample_identities`...) as members of the set `:tasks_done`.
All of them get the job's expiry when it ends (`app/jobstore.py`, IDFORGE_JOB_KEYS_TTL_S).
A transient outage (`app.errors.TRANSIENT`) is retried with backoff; any other exception fails the
job with the code it carries (`workers/errors.py`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from app.errors import TRANSIENT, JobStoreUnavailable
from app.jobstore import BITMAP_TASKS, KEEP_EXPIRY, job_key
from app.logs import log_context
from app.redis_client import translate
from app.settings import Settings
from workers import jobs
from workers.errors import Stopped, failure_code
from workers.runtime import get_runtime, trim_heap, worker_name

log = logging.getLogger("idforge.worker")

MAX_TRANSIENT_RETRIES = 5

# Extend the caller's lease; take it back if it lapsed (a Redis restart, a long pause) and is free.
_RENEW_LEASE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Count a delivery (KEYS: the job, `:attempts`; ARGV: task, by); a job that ended keeps its expiry.
_INCR_ATTEMPT = KEEP_EXPIRY + """
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], tonumber(ARGV[2]))
keep_expiry(KEYS[1], KEYS[2])
return n
"""

# Mark a task done (KEYS: the job, `:attempts`, the done set or bits; ARGV: task, bit or ''). A task
# done at its first attempt drops its attempt counter (`attempts` reads it back as 1).
_MARK_DONE = KEEP_EXPIRY + """
if ARGV[2] == '' then redis.call('SADD', KEYS[3], ARGV[1])
else redis.call('SETBIT', KEYS[3], tonumber(ARGV[2]), 1) end
if redis.call('HGET', KEYS[2], ARGV[1]) == '1' then redis.call('HDEL', KEYS[2], ARGV[1]) end
keep_expiry(KEYS[1], KEYS[2])
keep_expiry(KEYS[1], KEYS[3])
return 1
"""

# The bits set in KEYS[1] (a done-marks bitmap), as numbers.
_BITS = """
local v = redis.call('GET', KEYS[1]) or ''
local out = {}
for i = 1, #v do
  local byte = string.byte(v, i)
  for b = 0, 7 do
    if bit.band(byte, bit.rshift(128, b)) ~= 0 then out[#out + 1] = (i - 1) * 8 + b end
  end
end
return out
"""


def _done_key(job_id: str, task_key: str) -> tuple[str, str]:
    """Where a task's done mark lives: (key, bit) for a numbered task of BITMAP_TASKS
    (`render_shard:17`), else (the set, '')."""
    name, _, n = task_key.rpartition(":")
    if name in BITMAP_TASKS and n.isdigit():
        return job_key(job_id, f":tasks_done:{name}"), n
    return job_key(job_id, ":tasks_done"), ""


class TaskLedger:
    """Per (job, task) records in Redis: attempts, leases and done marks."""

    def __init__(self, client: redis.Redis) -> None:
        self.r: Any = client
        self._renew_lease = client.register_script(_RENEW_LEASE)
        self._release_lease = client.register_script(_RELEASE_LEASE)
        self._incr_attempt = client.register_script(_INCR_ATTEMPT)
        self._mark_done = client.register_script(_MARK_DONE)
        self._bits = client.register_script(_BITS)

    def incr_attempt(self, job_id: str, task_key: str, by: int = 1) -> int:
        """Count deliveries of one task of a job (our own counter: Celery's redelivery after a
        worker crash does not count as a retry)."""
        with translate():
            return int(self._incr_attempt(keys=[job_key(job_id), job_key(job_id, ":attempts")],
                                          args=[task_key, by]))

    def attempts(self, job_id: str) -> dict[str, int]:
        """The attempt counter of each task of a job that ran (a done task without a counter ran
        once)."""
        with translate():
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(job_key(job_id, ":attempts"))
            pipe.smembers(job_key(job_id, ":tasks_done"))
            for name in BITMAP_TASKS:
                self._bits(keys=[job_key(job_id, f":tasks_done:{name}")], client=pipe)
            counted, done, *bits = pipe.execute()
        out = {k: int(v) for k, v in counted.items()}
        for task in done:
            out.setdefault(task, 1)
        for name, numbers in zip(BITMAP_TASKS, bits, strict=True):
            for n in numbers:
                out.setdefault(f"{name}:{n}", 1)
        return out

    @staticmethod
    def _lease_key(job_id: str, task_key: str) -> str:
        return job_key(job_id, f":lease:{task_key}")

    def acquire_lease(self, job_id: str, task_key: str, holder: str, ttl_s: float) -> bool:
        """Take the lease on one task of a job for `ttl_s` seconds; False while another holds it."""
        with translate():
            return bool(self.r.set(self._lease_key(job_id, task_key), holder, nx=True,
                                   px=max(1, int(ttl_s * 1000))))

    def renew_lease(self, job_id: str, task_key: str, holder: str, ttl_s: float) -> bool:
        """Extend `holder`'s lease by `ttl_s` seconds from now, taking it back if it lapsed and
        nobody took it; False when another holder has it."""
        with translate():
            return bool(self._renew_lease(keys=[self._lease_key(job_id, task_key)],
                                               args=[holder, max(1, int(ttl_s * 1000))]))

    def release_lease(self, job_id: str, task_key: str, holder: str) -> bool:
        """Drop `holder`'s lease (never another holder's); False when it held none."""
        with translate():
            return bool(self._release_lease(keys=[self._lease_key(job_id, task_key)], args=[holder]))

    def lease_holder(self, job_id: str, task_key: str) -> str | None:
        with translate():
            holder: str | None = self.r.get(self._lease_key(job_id, task_key))
        return holder

    def mark_task_done(self, job_id: str, task_key: str) -> None:
        """Record that one task of a job ran to its end: later deliveries of it have nothing to do."""
        key, bit = _done_key(job_id, task_key)
        with translate():
            self._mark_done(keys=[job_key(job_id), job_key(job_id, ":attempts"), key],
                            args=[task_key, bit])

    def task_done(self, job_id: str, task_key: str) -> bool:
        key, bit = _done_key(job_id, task_key)
        with translate():
            if bit and self.r.getbit(key, int(bit)):
                return True
            # The set: other tasks, and a numbered task marked before the bits (a job in flight).
            return bool(self.r.sismember(job_key(job_id, ":tasks_done"), task_key))


def run(task: Task, job_id: str, key: str, fn: Any, *args: Any) -> None:
    """Run one job task with its log context (job_id, task name, shard) set."""
    shard = key.partition(":")[2]
    with log_context(job_id=job_id, task=task.name, shard=int(shard) if shard.isdigit() else None):
        t0 = time.perf_counter()
        log.info("job %s %s: delivered", job_id, key)
        try:
            run_leased(task, job_id, key, fn, *args)
        finally:
            log.info("job %s %s: left the worker after %.2f s", job_id, key, time.perf_counter() - t0)
            release_shards()
            trim_heap()


def release_shards() -> None:
    """Release the render shards the pool has room for (app/scheduler.py): after every task ends,
    and on every heartbeat. A failure is only logged: the next call releases them."""
    try:
        sent = get_runtime().scheduler.release()
    except Exception as e:  # noqa: BLE001 - Redis or the broker down: the next task or beat retries
        log.warning("cannot release render shards now: %s", e)
        return
    if sent:
        log.info("released %d render shard(s): %s", len(sent),
                 ", ".join(f"{j}:{k}" for j, k in sent[:8]) + (" ..." if len(sent) > 8 else ""))


# Tasks that may legitimately run again after returning: finalize returns early when a shard's
# outputs are not visible yet, and that shard sends it again; a finished job makes it a no-op.
REPEATABLE = frozenset({"finalize"})


class TaskLease:
    """This delivery's hold on one (job, task) in Redis, renewed from a daemon thread while the
    task runs, so that no two deliveries of a task run at once. A killed process stops renewing
    and its lease lapses after `ttl_s` seconds."""

    def __init__(self, ledger: TaskLedger, job_id: str, key: str, ttl_s: float) -> None:
        self.ledger, self.job_id, self.key, self.ttl_s = ledger, job_id, key, ttl_s
        self.holder = f"{worker_name()}:{secrets.token_hex(4)}"
        self.lost = False  # another holder took it while this one ran (it had lapsed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.ledger.acquire_lease(self.job_id, self.key, self.holder, self.ttl_s):
            return False
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.ledger.renew_lease(self.job_id, self.key, self.holder, self.ttl_s) \
                        and not self.lost:
                    self.lost = True
                    log.error("job %s %s: lease lapsed and was taken by another delivery",
                              self.job_id, self.key)
            except Exception as e:  # noqa: BLE001 - it keeps trying (Redis restarting); ttl_s to spare
                log.warning("job %s %s: cannot renew the task lease: %s", self.job_id, self.key, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.ledger.release_lease(self.job_id, self.key, self.holder)
        except JobStoreUnavailable as e:  # it lapses by itself
            log.warning("job %s %s: cannot release the task lease: %s", self.job_id, self.key, e)


def run_leased(task: Task, job_id: str, key: str, fn: Any, *args: Any) -> None:
    """Run the task under its lease, once: a delivery that finds the lease held by a running
    delivery sends itself again for later (instead of running the work in parallel), and one that
    finds the task done returns. Redis outages here requeue the message."""
    rt = get_runtime()
    ledger = TaskLedger(rt.store.r)
    lease = TaskLease(ledger, job_id, key, rt.settings.task_lease_s)
    try:
        held = lease.acquire()
    except JobStoreUnavailable as e:
        raise Reject(f"job store unreachable: {e.detail}", requeue=True) from e
    if not held:
        try:
            defer(task, rt.settings, job_id, key, args)
        except Exception as e:  # the broker is unreachable: keep this message instead
            raise Reject(f"cannot defer {key}: {e}", requeue=True) from e
        return
    ran, outcome = False, "returned"
    try:
        if ledger.task_done(job_id, key):
            log.info("job %s %s: already done; dropping a repeated delivery", job_id, key)
            return
        ran = True
        run_task(task, ledger, job_id, key, fn, *args)
        if key not in REPEATABLE:
            ledger.mark_task_done(job_id, key)
    except JobStoreUnavailable as e:  # from the bookkeeping around the work: try again later
        outcome = "requeued"
        raise Reject(f"job store unreachable: {e.detail}", requeue=True) from e
    except Reject as e:  # Celery's retry could not reach the broker: keep the message
        outcome = "requeued"
        raise Reject(e.reason, requeue=True) from e
    except BaseException as e:
        outcome = type(e).__name__.lower()  # retry, softtimelimitexceeded, ...
        raise
    finally:
        lease.release()
        if ran:
            try:
                rt.store.add_event(job_id, "task_ended", task=key, outcome=outcome, worker=worker_name())
            except JobStoreUnavailable:
                pass



def defer(task: Task, s: Settings, job_id: str, key: str, args: tuple[Any, ...]) -> None:
    """Another delivery of this task runs (a redelivery after visibility_timeout_s, or one racing
    a crashed worker's lease): send a copy to check again in a while, and let this one go."""
    countdown = max(1, min(s.task_lease_s // 2, s.visibility_timeout_s // 4))
    log.info("job %s %s: running elsewhere (lease held); checking again in %d s", job_id, key, countdown)
    task.apply_async(args=[job_id, *args], countdown=countdown, retries=task.request.retries)


def run_task(task: Task, ledger: TaskLedger, job_id: str, key: str, fn: Any, *args: Any) -> None:
    rt = get_runtime()
    attempts = ledger.incr_attempt(job_id, key)
    if attempts > rt.settings.max_task_attempts:
        jobs.fail(rt, job_id, "worker_lost",
                  f"task {key} was started {attempts - 1} times without finishing "
                  f"(max_task_attempts={rt.settings.max_task_attempts}); its worker process was "
                  "killed each time (out of memory, or past the hard time limit "
                  f"IDFORGE_TASK_TIME_LIMIT_S={rt.settings.task_time_limit_s})")
        return
    rt.store.add_event(job_id, "task_started", task=key, attempt=attempts, worker=worker_name())
    try:
        fn(rt, job_id, *args)
    except Stopped:
        if rt.store.status(job_id) == "canceling":
            jobs.finish_cancel(rt, job_id)
    except TRANSIENT as e:
        if task.request.retries >= MAX_TRANSIENT_RETRIES:
            jobs.fail(rt, job_id, e.code, f"{key}: {e.detail}")
            return
        log.warning("job %s %s: transient error, retrying: %s", job_id, key, e.detail)
        ledger.incr_attempt(job_id, key, by=-1)  # a retry is not a crash
        raise task.retry(countdown=min(30, 2 ** task.request.retries), exc=e,
                         max_retries=MAX_TRANSIENT_RETRIES) from e
    except SoftTimeLimitExceeded:
        jobs.fail(rt, job_id, "task_timeout",
                  f"{key}: ran past the soft time limit of {rt.settings.task_soft_time_limit_s} s "
                  "(IDFORGE_TASK_SOFT_TIME_LIMIT_S); raise it, or cut the work into smaller shards "
                  "(IDFORGE_SHARD_IDENTITIES)")
    except Exception as e:  # a failure carries its job error code (workers/errors.py)
        code = failure_code(e)
        if code == "task_error":
            log.exception("job %s %s failed", job_id, key)
            jobs.fail(rt, job_id, code, f"{key}: {type(e).__name__}: {e}")
        else:
            jobs.fail(rt, job_id, code, f"{key}: {e}")
