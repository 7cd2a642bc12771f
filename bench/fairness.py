"""Sharing the GPUs: small jobs posted while a bulk job renders, under the fair scheduler and under
first-in-first-out (every shard sent at once, as before the scheduler), through the real service
(Redis, SeaweedFS S3, one Celery worker process, the API under uvicorn) with the tiny latent
generator.

Team `bulk` posts a job of at least 100 render shards. While it renders, team `ci` posts a small
job (its team's default priority) and team `bulk` a small `interactive` one, `--repeats` times,
spaced out. For each setting it prints:

- the bulk job's shard time (the median time from one of its shards starting to the next
  starting: what a shard holds the worker for, overheads included; and its tasks' median) and
  its total time;
- per small job, seconds from submission to its first task (identity sampling started), to its
  first render shard, and to success; their p95 in shard times;
- the bulk job's slowdown against the same job run alone, beside the small jobs' own work (the
  sum of their task times): fairness must not cost the bulk job more than that.

It also runs the bulk job alone under both, for the scheduler's own cost (a release, a Redis
transaction and a send, per shard). Targets (issue 16): under the fair scheduler each small job starts within one shard time of its
submission (p95), and the bulk job's time grows by no more than the small jobs' share.

    python -m bench.fairness [--quick] [--repeats 5] [--shards 120]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench import emit
from bench.scale import service

TEAMS = "bulk:key-bulk,ci:key-ci"
SHARD_IDENTITIES = 2
LATENT = {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"}


def _auth(team: str) -> dict[str, str]:
    return {"Authorization": f"Bearer key-{team}"}


def bulk_spec(shards: int) -> dict[str, Any]:
    return {"identities": shards * SHARD_IDENTITIES, "images_per_identity": 50, "seed": 1, "models": LATENT,
            "variations": {"method": "dispersion", "iterations": 0}, "priority": "batch",
            "output": {"formats": ["webdataset"]}}


def small_spec(seed: int, priority: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"identities": 2, "images_per_identity": 4, "seed": seed, "models": LATENT,
                            "variations": {"method": "dispersion", "iterations": 0},
                            "output": {"formats": ["webdataset"]}}
    if priority:
        spec["priority"] = priority
    return spec


def _t(at: str) -> float:
    return datetime.fromisoformat(at).timestamp()


def _events(c: httpx.Client, job_id: str, team: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = "-"
    while True:
        page = c.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000, "after": after}, headers=_auth(team)).json()
        events += page["events"]
        if not page["events"]:
            return events
        after = page["next"]


def _task_times(events: list[dict[str, Any]]) -> dict[str, float]:
    """Each task's seconds on the worker, from the job's task_started/task_ended events."""
    began: dict[str, float] = {}
    out: dict[str, float] = {}
    for e in events:
        if e["type"] == "task_started":
            began[e["task"]] = _t(e["at"])
        elif e["type"] == "task_ended" and e["task"] in began:
            out[e["task"]] = _t(e["at"]) - began.pop(e["task"])
    return out


def _shard_cycle(events: list[dict[str, Any]]) -> float:
    """The median time from one of the job's render shards starting to the next one starting: what
    a shard holds the worker for, its task's overheads included (the median leaves out the gaps
    where another job's task ran in between)."""
    starts = sorted(_t(e["at"]) for e in events if e["type"] == "task_started"
                    and e["task"].startswith("render_shard:"))
    return statistics.median(b - a for a, b in itertools.pairwise(starts))


def _wait(c: httpx.Client, job_id: str, team: str, timeout: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}", headers=_auth(team)).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']}")
        time.sleep(0.1)


def run(base: str, shards: int, repeats: int, with_small: bool) -> dict[str, Any]:
    """One bulk job, with (or without) small jobs posted while it renders."""
    with httpx.Client(base_url=base, timeout=60) as c:
        bulk = c.post("/v1/jobs", json=bulk_spec(shards), headers=_auth("bulk")).json()["id"]
        t_bulk = time.time()
        smalls: list[tuple[str, str, float]] = []
        if with_small:  # pair i goes in once the bulk job is (i + 1) / (repeats + 2) of the way
            total = bulk_spec(shards)["identities"] * bulk_spec(shards)["images_per_identity"]
            for i in range(repeats):
                while c.get(f"/v1/jobs/{bulk}", headers=_auth("bulk")).json()["progress"]["images_done"] \
                        < total * (i + 1) / (repeats + 2):
                    time.sleep(0.05)
                for team, priority in (("ci", None), ("bulk", "interactive")):
                    made = c.post("/v1/jobs", json=small_spec(100 + 2 * i + (team == "bulk"), priority),
                                  headers=_auth(team))
                    smalls.append((made.json()["id"], team, time.time()))
        done = {job_id: _wait(c, job_id, team) for job_id, team, _ in smalls}
        bulk_job = _wait(c, bulk, "bulk")
        bulk_s = _t(bulk_job["timestamps"]["succeeded"]) - t_bulk
        bulk_events = _events(c, bulk, "bulk")
        shard_s = _shard_cycle(bulk_events)
        task_s = statistics.median(v for k, v in _task_times(bulk_events).items() if k.startswith("render_shard:"))
        rows = []
        small_work = 0.0
        for job_id, team, t0 in smalls:
            job = done[job_id]
            st = job["stages"]
            rows.append({"team": team, "priority": job["priority"],
                         "first_task_s": _t(st["sampling_identities"]["started_at"]) - t0,
                         "first_shard_s": _t(st["rendering"]["started_at"]) - t0,
                         "finish_s": _t(job["timestamps"]["succeeded"]) - t0})
            small_work += sum(_task_times(_events(c, job_id, team)).values())
    return {"bulk_s": bulk_s, "shard_s": shard_s, "task_s": task_s, "smalls": rows, "small_work_s": small_work}


def warm_up(base: str) -> None:
    """One small job first, so that no measured run pays for loading the models."""
    with httpx.Client(base_url=base, timeout=60) as c:
        _wait(c, c.post("/v1/jobs", json=small_spec(99, None), headers=_auth("ci")).json()["id"], "ci")


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(0.95 * len(xs) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 shards, 3 repeats")
    p.add_argument("--shards", type=int, default=120, help="the bulk job's render shards (>= 100)")
    p.add_argument("--repeats", type=int, default=5, help="pairs of small jobs posted during the bulk job")
    p.add_argument("--model-dir", type=Path, default=Path(".idforge/models"))
    args = p.parse_args(argv)
    shards, repeats = (100, 3) if args.quick else (args.shards, args.repeats)
    if shards < 100:
        p.error("--shards: the issue's bulk job has at least 100 shards")
    lines: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    for name, slots in (("fair", "0"), ("fifo", "1000000")):
        env = {"IDFORGE_SHARD_IDENTITIES": str(SHARD_IDENTITIES), "IDFORGE_SCHED_SLOTS": slots,
               "IDFORGE_WORKER_HEARTBEAT_S": "2"}
        with tempfile.TemporaryDirectory(prefix=f"idforge-fair-{name}-") as tmp, \
                service(Path(tmp), args.model_dir.resolve(), keys=TEAMS, env_extra=env) as svc:
            warm_up(svc["base"])
            alone = run(svc["base"], shards, repeats, with_small=False)
            mixed = run(svc["base"], shards, repeats, with_small=True)
        results[name] = {"alone": alone, "mixed": mixed}
        m = mixed
        shard_s = m["shard_s"]
        first = [r["first_task_s"] for r in m["smalls"]]
        first_shard = [r["first_shard_s"] for r in m["smalls"]]
        finish = [r["finish_s"] for r in m["smalls"]]
        lines.append(
            f"fairness {name:4}: bulk job {shards} shards, shard time {shard_s:.2f} s (task {m['task_s']:.2f} s), "
            f"total {m['bulk_s']:.1f} s | "
            f"{len(first)} small jobs: first task p95 {_p95(first):.2f} s ({_p95(first) / shard_s:.2f} shard times), "
            f"first shard p95 {_p95(first_shard):.2f} s ({_p95(first_shard) / shard_s:.2f}), "
            f"finish p95 {_p95(finish):.2f} s ({_p95(finish) / shard_s:.2f}); "
            f"max first task {max(first):.2f} s")
    fair, fifo = results["fair"], results["fifo"]
    alone_s, mixed_s = fair["alone"]["bulk_s"], fair["mixed"]["bulk_s"]
    lines.append(f"the scheduler's own cost: the bulk job alone {alone_s:.1f} s fair vs {fifo['alone']['bulk_s']:.1f} s "
                 f"first-in-first-out ({alone_s / fifo['alone']['bulk_s']:.3f}x; a release and a send per shard)")
    share = fair["mixed"]["small_work_s"]
    p95_shards = _p95([r["first_task_s"] for r in fair["mixed"]["smalls"]]) / fair["mixed"]["shard_s"]
    lines.append(f"fair vs fifo: small jobs' first task p95 {_p95([r['first_task_s'] for r in fair['mixed']['smalls']]):.2f} s "
                 f"vs {_p95([r['first_task_s'] for r in fifo['mixed']['smalls']]):.2f} s; "
                 f"finish p95 {_p95([r['finish_s'] for r in fair['mixed']['smalls']]):.2f} s "
                 f"vs {_p95([r['finish_s'] for r in fifo['mixed']['smalls']]):.2f} s")
    lines.append(f"target: small jobs start within 1 shard time (p95): {p95_shards:.2f} "
                 f"({'met' if p95_shards <= 1.0 else 'NOT met'}); bulk job alone {alone_s:.1f} s, with the small "
                 f"jobs {mixed_s:.1f} s (+{mixed_s - alone_s:.1f} s) against their own work {share:.1f} s "
                 f"({'met' if mixed_s - alone_s <= share else 'NOT met'})")
    return emit(lines, "1 worker process")


if __name__ == "__main__":
    main()
