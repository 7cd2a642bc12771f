"""The Celery application and its named tasks. Tasks take ids, call one orchestration function,
and return nothing the caller reads; job state lives in our Redis records."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, Task
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown

from app import queue as q
from app.logs import log_context
from app.logs import setup_logging as setup_log_handlers
from app.settings import Settings
from workers import jobs, lifecycle, webhooks
from workers.runtime import Heartbeat, get_runtime, quiet_libraries, reset_runtime
from workers.tasking import release_shards, run

# The queues this worker consumes, as `idforge worker --queues` set them; its heartbeats say them,
# and the scheduler counts the live processes on `gpu` as its slots.
WORKER_QUEUES_ENV = "IDFORGE_WORKER_QUEUES"

log = logging.getLogger("idforge.worker")


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
        run(self, job_id, "sample_identities", jobs.sample_identities)

    @app.task(name=q.RENDER_SHARD, bind=True)
    def render_shard(self: Task, job_id: str, shard: int) -> None:
        run(self, job_id, f"render_shard:{shard}", jobs.render_shard, shard)

    @app.task(name=q.FINALIZE, bind=True)
    def finalize(self: Task, job_id: str) -> None:
        run(self, job_id, "finalize", jobs.finalize)

    @app.task(name=q.FINISH_CANCEL, bind=True)
    def finish_cancel(self: Task, job_id: str) -> None:
        run(self, job_id, "finish_cancel", jobs.stop_if_canceling)

    # Not through tasking.run: a deletion acts on an ended job, and retries by itself (then the sweep).
    @app.task(name=q.DELETE_JOB, bind=True, max_retries=None)
    def delete_job(self: Task, job_id: str) -> None:
        with log_context(job_id=job_id, task=self.name):
            lifecycle.delete_task(self, job_id)

    # Not through tasking.run: a webhook never fails its job, and it counts its own attempts.
    @app.task(name=q.DELIVER_WEBHOOK, bind=True, max_retries=None)
    def deliver_webhook(self: Task, job_id: str, msg_id: str) -> None:
        with log_context(job_id=job_id, task=self.name):
            webhooks.deliver_task(self, job_id, msg_id)

    return app


_heartbeat: Heartbeat | None = None


def _on_beat() -> None:
    """Each heartbeat: release the render shards the pool has room for, and sweep for expired
    datasets when this process takes the sweep's turn. Each failure is logged; the next beat retries."""
    release_shards()
    try:
        lifecycle.sweep_expired()
    except Exception as e:  # noqa: BLE001 - Redis or the broker down: the next beat retries
        log.warning("retention sweep not done now: %s", e)


@worker_process_init.connect
def _load_after_fork(**_: Any) -> None:
    """Each pool process builds its own clients, starts its heartbeat and loads models after the
    fork."""
    global _heartbeat
    reset_runtime()
    rt = get_runtime()
    queues = [x for x in os.environ.get(WORKER_QUEUES_ENV, "").split(",") if x] or None
    _heartbeat = Heartbeat(rt.telemetry, rt.settings.worker_heartbeat_s, queues=queues,
                           on_beat=_on_beat).start()
    rt.check_models()


@worker_process_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
