"""The task queue client: sends named tasks to Celery over the Redis broker.

The API never imports `workers/`; it names tasks. The Celery configuration lives here so the API
and the workers agree on it (broker, visibility timeout, routing).
"""

from __future__ import annotations

import json
from typing import Any

from celery import Celery

from app.errors import QueueUnavailable
from app.settings import Settings

SAMPLE_IDENTITIES = "idforge.sample_identities"
RENDER_SHARD = "idforge.render_shard"
FINALIZE = "idforge.finalize"
# Sends one webhook event (args: job id, message id); retries itself with backoff.
DELIVER_WEBHOOK = "idforge.deliver_webhook"
# Ends the cancel of a job that has nothing running to see it (its shards were all held).
FINISH_CANCEL = "idforge.finish_cancel"
# Deletes every stored object of a job whose deletion was requested (DELETE, or its retention).
DELETE_JOB = "idforge.delete_job"

# GPU work on `gpu`; bookkeeping on `cpu`. A CPU worker with tiny presets consumes both.
ROUTES = {
    SAMPLE_IDENTITIES: {"queue": "gpu"},
    RENDER_SHARD: {"queue": "gpu"},
    FINALIZE: {"queue": "cpu"},
    DELIVER_WEBHOOK: {"queue": "cpu"},
    FINISH_CANCEL: {"queue": "cpu"},
    DELETE_JOB: {"queue": "cpu"},
}


def celery_config(s: Settings) -> dict[str, Any]:
    return {
        "broker_url": s.celery_broker_url,
        # Job state lives in our Redis records; tasks return nothing the caller reads.
        "result_backend": None,
        "task_ignore_result": True,
        "task_routes": ROUTES,
        "task_default_queue": "cpu",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A hard time limit kills the pool process: requeue the task like any lost worker, so the
        # attempt counter (not a silent ack) decides when the job fails.
        "task_acks_on_timeout": False,
        "task_time_limit": s.task_time_limit_s,
        "task_soft_time_limit": s.task_soft_time_limit_s,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Should exceed the longest task (shards are sized to minutes). A task redelivered while
            # its first delivery still runs finds that delivery's lease and waits (celery_app._run).
            "visibility_timeout": s.visibility_timeout_s,
            # Sweep for unacknowledged tasks past the visibility timeout every few seconds (kombu's
            # default sweeps every 100 s, which would dominate a short visibility timeout).
            "unacked_restore_interval": max(1, min(10, s.visibility_timeout_s // 5)),
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        "broker_connection_timeout": 5,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


class TaskQueue:
    def __init__(self, app: Celery) -> None:
        self.app = app

    @classmethod
    def from_settings(cls, s: Settings) -> TaskQueue:
        app = Celery("idforge-client", set_as_current=False)
        app.conf.update(celery_config(s))
        return cls(app)

    def send(self, task: str, *args: Any) -> None:
        try:
            self.app.send_task(task, args=list(args), retry=True,
                               retry_policy={"max_retries": 3, "interval_start": 0.2,
                                             "interval_step": 0.5, "interval_max": 2})
        except Exception as e:  # kombu raises many types for an unreachable broker
            raise QueueUnavailable(f"cannot enqueue {task}: {e}") from e

    def ping(self) -> None:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=3)
        except Exception as e:
            raise QueueUnavailable(f"broker unreachable: {e}") from e

    def position(self, queue: str, task: str, job_id: str, limit: int = 1000) -> int | None:
        """Tasks ahead of the job's oldest `task` message in `queue` (Celery's Redis transport pushes
        on the left and pops on the right); None when it is not among the next `limit`."""
        try:
            with self.app.connection_for_read() as conn:
                raw = conn.default_channel.client.lrange(queue, -limit, -1)
        except Exception as e:
            raise QueueUnavailable(f"broker unreachable: {e}") from e
        for ahead, item in enumerate(reversed(raw)):
            try:
                headers = json.loads(item).get("headers") or {}
            except (ValueError, AttributeError):
                continue
            if headers.get("task") == task and job_id in str(headers.get("argsrepr", "")):
                return ahead
        return None

    def queue_lengths(self) -> dict[str, int]:
        with self.app.connection_for_read() as conn:
            client = conn.default_channel.client
            return {q: int(client.llen(q)) for q in ("gpu", "cpu")}
