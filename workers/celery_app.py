"""The Celery application and its named tasks. Tasks take ids, call one orchestration function,
and return nothing the caller reads; job state lives in our Redis records."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init

from app import queue as q
from app.errors import (
    JobStoreUnavailable,
    QueueUnavailable,
    StorageError,
    StorageKeyMissing,
)
from app.settings import Settings
from models.modelspec import ModelUnavailable
from workers import jobs
from workers.package import ReferenceSetUnavailable
from workers.shard import Canceled, QualityShortfall
from workers.runtime import get_runtime, quiet_libraries, reset_runtime

log = logging.getLogger("idforge.worker")

TRANSIENT = (JobStoreUnavailable, StorageError, QueueUnavailable)
MAX_TRANSIENT_RETRIES = 5


def _run(task: Task, job_id: str, key: str, fn: Any, *args: Any) -> None:
    rt = get_runtime()
    attempts = rt.store.incr_attempt(job_id, key)
    if attempts > rt.settings.max_task_attempts:
        jobs.fail(rt, job_id, "worker_lost",
                  f"task {key} was started {attempts - 1} times without finishing "
                  f"(max_task_attempts={rt.settings.max_task_attempts}); the worker keeps dying "
                  "on it (out of memory?)")
        return
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
        raise task.retry(countdown=min(30, 2 ** task.request.retries), exc=e) from e
    except ModelUnavailable as e:  # not transient: the operator must place or pin the weights
        jobs.fail(rt, job_id, "model_unavailable", f"{key}: {e}")
    except ReferenceSetUnavailable as e:
        jobs.fail(rt, job_id, "reference_unavailable", f"{key}: {e}")
    except QualityShortfall as e:
        jobs.fail(rt, job_id, "quality_shortfall", f"{key}: {e}")
    except Exception as e:
        log.exception("job %s %s failed", job_id, key)
        jobs.fail(rt, job_id, "task_error", f"{key}: {type(e).__name__}: {e}")


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    quiet_libraries()
    app = Celery("idforge", set_as_current=True)
    app.conf.update(q.celery_config(settings))

    @app.task(name=q.SAMPLE_IDENTITIES, bind=True)
    def sample_identities(self: Task, job_id: str) -> None:
        _run(self, job_id, "sample_identities", jobs.sample_identities)

    @app.task(name=q.RENDER_SHARD, bind=True)
    def render_shard(self: Task, job_id: str, shard: int) -> None:
        _run(self, job_id, f"render_shard:{shard}", jobs.render_shard, shard)

    @app.task(name=q.FINALIZE, bind=True)
    def finalize(self: Task, job_id: str) -> None:
        _run(self, job_id, "finalize", jobs.finalize)

    return app


@worker_process_init.connect
def _load_after_fork(**_: Any) -> None:
    """Each pool process builds its own clients and loads models after the fork."""
    reset_runtime()
    rt = get_runtime()
    rt.check_models()
