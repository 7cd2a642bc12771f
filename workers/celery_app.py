"""The Celery application and its named tasks. Tasks take ids, call one orchestration function,
and return nothing the caller reads; job state lives in our Redis records."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown

from app import queue as q
from app.errors import (
    JobStoreUnavailable,
    QueueUnavailable,
    StorageError,
    StorageKeyMissing,
)
from app.logs import log_context
from app.logs import setup_logging as setup_log_handlers
from app.settings import Settings
from models.modelspec import ModelUnavailable
from workers import jobs, webhooks
from workers.package import ReferenceSetUnavailable
from workers.runtime import Heartbeat, get_runtime, quiet_libraries, reset_runtime
from workers.shard import Canceled, QualityShortfall

log = logging.getLogger("idforge.worker")

TRANSIENT = (JobStoreUnavailable, StorageError, QueueUnavailable)
MAX_TRANSIENT_RETRIES = 5


def _run(task: Task, job_id: str, key: str, fn: Any, *args: Any) -> None:
    """Run one job task with its log context (job_id, task name, shard) set."""
    shard = key.partition(":")[2]
    with log_context(job_id=job_id, task=task.name, shard=int(shard) if shard.isdigit() else None):
        t0 = time.perf_counter()
        log.info("job %s %s: delivered", job_id, key)
        try:
            _run_leased(task, job_id, key, fn, *args)
        finally:
            log.info("job %s %s: left the worker after %.2f s", job_id, key, time.perf_counter() - t0)


# Tasks that may legitimately run again after returning: finalize returns early when a shard's
# outputs are not visible yet, and that shard sends it again; a finished job makes it a no-op.
REPEATABLE = frozenset({"finalize"})


class TaskLease:
    """This delivery's hold on one (job, task) in Redis, renewed from a daemon thread while the
    task runs, so that no two deliveries of a task run at once. A killed process stops renewing
    and its lease lapses after `ttl_s` seconds."""

    def __init__(self, store: Any, job_id: str, key: str, ttl_s: float) -> None:
        self.store, self.job_id, self.key, self.ttl_s = store, job_id, key, ttl_s
        self.holder = f"{_worker_id()}:{secrets.token_hex(4)}"
        self.lost = False  # another holder took it while this one ran (it had lapsed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.store.acquire_lease(self.job_id, self.key, self.holder, self.ttl_s):
            return False
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.key, self.holder, self.ttl_s) \
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
            self.store.release_lease(self.job_id, self.key, self.holder)
        except JobStoreUnavailable as e:  # it lapses by itself
            log.warning("job %s %s: cannot release the task lease: %s", self.job_id, self.key, e)


def _run_leased(task: Task, job_id: str, key: str, fn: Any, *args: Any) -> None:
    """Run the task under its lease, once: a delivery that finds the lease held by a running
    delivery sends itself again for later (instead of running the work in parallel), and one that
    finds the task done returns. Redis outages here requeue the message."""
    rt = get_runtime()
    lease = TaskLease(rt.store, job_id, key, rt.settings.task_lease_s)
    try:
        held = lease.acquire()
    except JobStoreUnavailable as e:
        raise Reject(f"job store unreachable: {e.detail}", requeue=True) from e
    if not held:
        try:
            _defer(task, rt.settings, job_id, key, args)
        except Exception as e:  # the broker is unreachable: keep this message instead
            raise Reject(f"cannot defer {key}: {e}", requeue=True) from e
        return
    ran, outcome = False, "returned"
    try:
        if rt.store.task_done(job_id, key):
            log.info("job %s %s: already done; dropping a repeated delivery", job_id, key)
            return
        ran = True
        _run_task(task, job_id, key, fn, *args)
        if key not in REPEATABLE:
            rt.store.mark_task_done(job_id, key)
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
                rt.store.add_event(job_id, "task_ended", task=key, outcome=outcome, worker=_worker_id())
            except JobStoreUnavailable:
                pass


def _worker_id() -> str:
    """This pool process, as job events name it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _defer(task: Task, s: Settings, job_id: str, key: str, args: tuple[Any, ...]) -> None:
    """Another delivery of this task runs (a redelivery after visibility_timeout_s, or one racing
    a crashed worker's lease): send a copy to check again in a while, and let this one go."""
    countdown = max(1, min(s.task_lease_s // 2, s.visibility_timeout_s // 4))
    log.info("job %s %s: running elsewhere (lease held); checking again in %d s", job_id, key, countdown)
    task.apply_async(args=[job_id, *args], countdown=countdown, retries=task.request.retries)


def _run_task(task: Task, job_id: str, key: str, fn: Any, *args: Any) -> None:
    rt = get_runtime()
    attempts = rt.store.incr_attempt(job_id, key)
    if attempts > rt.settings.max_task_attempts:
        jobs.fail(rt, job_id, "worker_lost",
                  f"task {key} was started {attempts - 1} times without finishing "
                  f"(max_task_attempts={rt.settings.max_task_attempts}); its worker process was "
                  "killed each time (out of memory, or past the hard time limit "
                  f"IDFORGE_TASK_TIME_LIMIT_S={rt.settings.task_time_limit_s})")
        return
    rt.store.add_event(job_id, "task_started", task=key, attempt=attempts, worker=_worker_id())
    try:
        fn(rt, job_id, *args)
    except (jobs.JobGone, Canceled):
        if rt.store.status(job_id) == "canceling":
            jobs.finish_cancel(rt, job_id)
    except TRANSIENT as e:
        if isinstance(e, StorageKeyMissing) or task.request.retries >= MAX_TRANSIENT_RETRIES:
            jobs.fail(rt, job_id, e.code, f"{key}: {e.detail}")
            return
        log.warning("job %s %s: transient error, retrying: %s", job_id, key, e.detail)
        rt.store.incr_attempt(job_id, key, by=-1)  # a retry is not a crash
        raise task.retry(countdown=min(30, 2 ** task.request.retries), exc=e,
                         max_retries=MAX_TRANSIENT_RETRIES) from e
    except ModelUnavailable as e:  # not transient: the operator must place or pin the weights
        jobs.fail(rt, job_id, "model_unavailable", f"{key}: {e}")
    except ReferenceSetUnavailable as e:
        jobs.fail(rt, job_id, "reference_unavailable", f"{key}: {e}")
    except QualityShortfall as e:
        jobs.fail(rt, job_id, "quality_shortfall", f"{key}: {e}")
    except SoftTimeLimitExceeded:
        jobs.fail(rt, job_id, "task_timeout",
                  f"{key}: ran past the soft time limit of {rt.settings.task_soft_time_limit_s} s "
                  "(IDFORGE_TASK_SOFT_TIME_LIMIT_S); raise it, or cut the work into smaller shards "
                  "(IDFORGE_SHARD_IDENTITIES)")
    except Exception as e:
        log.exception("job %s %s failed", job_id, key)
        jobs.fail(rt, job_id, "task_error", f"{key}: {type(e).__name__}: {e}")


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    quiet_libraries()
    app = Celery("idforge", set_as_current=True)
    app.conf.update(q.celery_config(settings))

    def _logging(**_: Any) -> None:  # a receiver here means Celery configures no logging itself
        setup_log_handlers(settings.log_format, settings.log_level)

    setup_logging.connect(_logging, weak=False, dispatch_uid="idforge-logging")

    @app.task(name=q.SAMPLE_IDENTITIES, bind=True)
    def sample_identities(self: Task, job_id: str) -> None:
        _run(self, job_id, "sample_identities", jobs.sample_identities)

    @app.task(name=q.RENDER_SHARD, bind=True)
    def render_shard(self: Task, job_id: str, shard: int) -> None:
        _run(self, job_id, f"render_shard:{shard}", jobs.render_shard, shard)

    @app.task(name=q.FINALIZE, bind=True)
    def finalize(self: Task, job_id: str) -> None:
        _run(self, job_id, "finalize", jobs.finalize)

    # Not through _run: a webhook never fails its job, and it counts its own attempts.
    @app.task(name=q.DELIVER_WEBHOOK, bind=True, max_retries=None)
    def deliver_webhook(self: Task, job_id: str, msg_id: str) -> None:
        with log_context(job_id=job_id, task=self.name):
            webhooks.deliver_task(self, job_id, msg_id)

    return app


_heartbeat: Heartbeat | None = None


@worker_process_init.connect
def _load_after_fork(**_: Any) -> None:
    """Each pool process builds its own clients, starts its heartbeat and loads models after the
    fork."""
    global _heartbeat
    reset_runtime()
    rt = get_runtime()
    _heartbeat = Heartbeat(rt.telemetry, rt.settings.worker_heartbeat_s).start()
    rt.check_models()


@worker_process_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
