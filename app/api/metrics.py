"""The Prometheus collector: a telemetry snapshot (`app/telemetry.py`) in the text exposition
format `GET /metrics` serves. No metric carries anything about a job but counts; the queue waits
and the scheduler's backlog are labelled by team (the operator's configured teams)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from app.jobstore import STATUSES
from app.telemetry import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _SnapshotCollector(Collector):
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterable[Any]:
        s = self.snap
        jobs = GaugeMetricFamily("idforge_jobs", "Jobs in each status, all teams", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], s.jobs.get(status, 0))
        yield jobs
        hist = HistogramMetricFamily("idforge_stage_duration_seconds",
                                     "Time jobs spent in each stage", labels=["stage"])
        for stage, h in s.stages.items():
            hist.add_metric([stage], [(_le(b), c) for b, c in h.buckets], sum_value=h.sum)
        yield hist
        yield CounterMetricFamily("idforge_images_rendered", "Images rendered by the workers "
                                  "(rate() gives images per second)", value=s.images)
        if s.queues is not None:
            q = GaugeMetricFamily("idforge_queue_length", "Tasks waiting in each broker queue",
                                  labels=["queue"])
            for name, n in sorted(s.queues.items()):
                q.add_metric([name], n)
            yield q
        yield GaugeMetricFamily("idforge_broker_up", "1 when the broker answered the queue-length "
                                "query", value=0 if s.queues is None else 1)
        seen = GaugeMetricFamily("idforge_worker_last_seen_seconds",
                                 "Seconds since each worker process's last heartbeat", labels=["worker"])
        for w in s.workers:
            seen.add_metric([w.name], round(w.age_s, 3))
        yield seen
        yield GaugeMetricFamily("idforge_workers_live", "Worker processes with a recent heartbeat",
                                value=sum(w.live for w in s.workers))
        wait = HistogramMetricFamily("idforge_queue_wait_seconds", "Seconds from a job's stage being queued "
                                     "(or its shards held by the scheduler) to a worker starting it, "
                                     "once per job and stage", labels=["stage", "team", "priority"])
        for (stage, team, priority), h in sorted(s.waits.items()):
            wait.add_metric([stage, team, priority], [(_le(b), c) for b, c in h.buckets], sum_value=h.sum)
        yield wait
        if s.held is not None:
            held = GaugeMetricFamily("idforge_shards_held", "Render shards the scheduler holds (not yet "
                                     "released to the queue)", labels=["team", "priority"])
            for (team, priority), n in sorted(s.held.items()):
                held.add_metric([team, priority], n)
            yield held
            yield GaugeMetricFamily("idforge_shards_in_flight", "Render shards released and not finished",
                                    value=s.in_flight or 0)
            if s.queues is not None:
                yield GaugeMetricFamily("idforge_gpu_backlog", "GPU work waiting: held shards plus tasks "
                                        "in the gpu queue (what KEDA scales on)",
                                        value=sum(s.held.values()) + s.queues.get("gpu", 0))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def render(snap: Snapshot) -> bytes:
    """The snapshot in the Prometheus text exposition format (version 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)
