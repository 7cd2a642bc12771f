"""Deleting a job's data, and the sweep that deletes expired datasets (the kernel's records:
`app/lifecycle.py`).

A deletion removes the manifest first: from then on nothing reads what is left as a whole dataset
(the dataset exists iff its manifest does). Then every object under the job's prefix goes (dataset,
report, checkpoints, shards' intermediates, spec), a listing page at a time, and a second listing
must find nothing before `deleted_at` is set. Every step is idempotent: a worker killed halfway, or
an S3 fault, leaves a deletion that the task's retry, its redelivery or the sweep finishes.
"""

from __future__ import annotations

import logging
from typing import Any

from app import queue as q
from app.errors import TRANSIENT, StorageError
from app.jobstore import TERMINAL
from app.layout import JobKeys
from app.lifecycle import Lifecycle, Swept
from workers.runtime import Runtime, get_runtime, worker_name

log = logging.getLogger("idforge.worker")

DELETE_RETRIES = 12  # a task's retries after an outage (backoff to 60 s) before it leaves it to the sweep
CANCEL_WAIT_RETRIES = 120  # retries while a deleted job's workers stop (1 s, then up to 10 s apart)


class StillLive(Exception):
    """The job is still stopping (canceling): its objects may still be written."""


def delete_job(rt: Runtime, job_id: str) -> int | None:
    """Delete every stored object of a job whose deletion was requested; the objects deleted, or
    None when there is nothing to do (no such job, no request, done before). StillLive while the job
    is not terminal; StorageError when S3 fails or an object is still there after the pass."""
    job = rt.store.get(job_id)
    if job is None or job.get("deleted_at") or not job.get("deletion_requested_at"):
        return None
    if job["status"] not in TERMINAL:
        raise StillLive(job["status"])
    keys = JobKeys.for_job(rt.settings.s3_prefix, job_id)
    n = rt.storage.delete_prefix(keys.manifest)  # the commit marker first
    root = keys.key("")
    n += rt.storage.delete_prefix(root)
    left = next(iter(rt.storage.list_keys(root)), None)
    if left is not None:  # written while the pass ran (a late writer): once more, then give up for now
        n += rt.storage.delete_prefix(root)
        left = next(iter(rt.storage.list_keys(root)), None)
        if left is not None:
            raise StorageError(f"job {job_id}: {left} is still there after deleting {root}")
    Lifecycle(rt.store).mark_deleted(job_id, n)
    log.info("job %s: deleted %d objects (%s)", job_id, n, job.get("deletion_reason") or "requested")
    return n


def delete_task(task: Any, job_id: str) -> None:
    """The body of `idforge.delete_job`: delete, or retry later while the job stops or S3 is out.
    Each attempt marks the deletion alive; after DELETE_RETRIES outages it gives up, and the sweep
    sends the task again once it has been quiet `IDFORGE_DELETION_RESEND_S`, so a requested deletion
    always finishes."""
    rt = get_runtime()
    tries = task.request.retries
    try:
        Lifecycle(rt.store).sent(job_id)  # alive: the sweep leaves it be for deletion_resend_s
        delete_job(rt, job_id)
    except StillLive as e:
        if tries >= CANCEL_WAIT_RETRIES:
            log.error("job %s: still %s after %d checks; the sweep retries its deletion", job_id, e, tries)
            return
        raise task.retry(countdown=min(10, 1 + tries // 10)) from e
    except TRANSIENT as e:
        if tries >= DELETE_RETRIES:
            log.error("job %s: deletion left to the sweep after %d attempts: %s", job_id, tries + 1, e)
            return
        log.warning("job %s: deletion attempt %d: %s", job_id, tries + 1, e)
        raise task.retry(countdown=min(60, 2 ** tries)) from e


def sweep_expired(rt: Runtime | None = None) -> Swept | None:
    """One sweep, when this process takes the sweep's lock (once a `retention_sweep_s` across the
    pool): request the deletion of expired jobs and send their tasks; send again deletions whose
    task has been quiet `deletion_resend_s`. Called from the heartbeat."""
    rt = rt or get_runtime()
    life = Lifecycle(rt.store)
    interval = rt.settings.retention_sweep_s
    if not life.take_sweep(interval, worker_name()):
        return None
    swept = life.sweep(lambda job_id: rt.queue.send(q.DELETE_JOB, job_id),
                       resend_after_s=rt.settings.deletion_resend_s)
    if swept.expired or swept.resent:
        log.info("retention sweep: %d expired, %d deletions sent again", len(swept.expired), len(swept.resent))
    return swept
