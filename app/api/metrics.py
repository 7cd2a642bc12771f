"""The Prometheus collector: a telemetry snapshot (`app/telemetry.py`) in the text exposition
format `GET /metrics` serves. No metric carries a team's name or anything about a job but counts."""

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


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def render(snap: Snapshot) -> bytes:
    """The snapshot in the Prometheus text exposition format (version 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)
