"""Redis footprint of one job: bytes per job at 100, 1,000 and 10,000 render shards, today's
layout beside the previous one (per-shard progress fields, sets of shard numbers and task keys, an
attempt counter per task, every task event kept), as ratios.

A job is simulated through the store's and the task ledger's own functions, with no rendering: the
identity task, then per shard what a worker writes (a lease, an attempt, `task_started`, two
progress reports, the shard's completion, its done mark, `task_ended`), then finalize, the stages,
the webhook messages and the terminal status. `--legacy` layout replays the Redis commands the
store and the ledger issued before the footprint was bounded (commit f98d1b9), so the two columns
are measured on the same server. Bytes are `MEMORY USAGE key SAMPLES 0` summed over `SCAN MATCH
idf:job:<id>*` (the job hash and every record of the job), measured before the job ends (the
records expire `IDFORGE_JOB_KEYS_TTL_S` after it ends; the legacy layout never expires them).

    python -m bench.redis_footprint [--shards 100,1000,10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from app.jobstore import JobStore, job_key
from app.redis_client import PREFIX as P
from app.redis_client import now_iso
from app.servers import RedisServer

SPEC = {"identities": 64, "images_per_identity": 50}
SHARD_IDS, IMAGES = 64, 50  # identities per shard, images per identity
WORKER = "w0@host:12345"


def footprint(r: Any, job_id: str) -> dict[str, int]:
    """Bytes of each Redis key of the job (MEMORY USAGE, every element counted)."""
    out = {}
    for key in r.scan_iter(match=job_key(job_id) + "*", count=1000):
        out[key] = int(r.memory_usage(key, samples=0) or 0)
    return out


def simulate(store: JobStore, shards: int, *, end: bool = True, redeliver: int = 0) -> str:
    """A job of `shards` shards through the store and the ledger (today's layout). `redeliver`:
    that many shards are delivered a second time after they finished (the done mark drops the
    copy, as `tasking.run_leased` does) and report their progress again (a stale copy)."""
    from workers.tasking import REPEATABLE, TaskLedger

    ledger = TaskLedger(store.r)
    job_id = store.create("alpha", SPEC, "h", identities=shards * SHARD_IDS,
                          images=shards * SHARD_IDS * IMAGES).job_id

    def task(key: str, work: Any) -> None:
        holder = f"{WORKER}:{key}"
        ledger.acquire_lease(job_id, key, holder, 60)
        if ledger.task_done(job_id, key):
            ledger.release_lease(job_id, key, holder)
            return
        n = ledger.incr_attempt(job_id, key)
        store.add_event(job_id, "task_started", task=key, attempt=n, worker=WORKER)
        work()
        if key not in REPEATABLE:  # as tasking.run_leased: finalize may run again
            ledger.mark_task_done(job_id, key)
        ledger.release_lease(job_id, key, holder)
        store.add_event(job_id, "task_ended", task=key, outcome="returned", worker=WORKER)

    def sample() -> None:
        store.transition(job_id, "running")
        store.set_stage(job_id, "sampling_identities")
        store.put_webhook(job_id, "stage:sampling_identities", f"msg_s{job_id}", "{}" * 100)
        store.set_stage_progress(job_id, 100, 100, "steps")
        store.set_totals(job_id, shards_total=shards)
        store.add_event(job_id, "identities_sampled", identities=shards * SHARD_IDS, shards=shards)
        store.set_stage(job_id, "rendering")

    def render(k: int) -> Any:
        def work() -> None:
            store.set_progress(job_id, f"shard{k}", identities=SHARD_IDS // 2,
                               images=SHARD_IDS // 2 * IMAGES)
            store.set_progress(job_id, f"shard{k}", identities=SHARD_IDS - 1,
                               images=(SHARD_IDS - 1) * IMAGES)
            store.shard_done(job_id, k, identities=SHARD_IDS, images=SHARD_IDS * IMAGES)
        return work

    task("sample_identities", sample)
    for k in range(shards):
        task(f"render_shard:{k}", render(k))
    for k in range(redeliver):
        store.set_progress(job_id, f"shard{k}", identities=1, images=1)  # a stale copy's report
        task(f"render_shard:{k}", render(k))

    def finalize() -> None:
        store.set_stage(job_id, "evaluating")
        store.set_stage(job_id, "packaging")
        if end:
            store.transition(job_id, "succeeded", result={"images": shards * SHARD_IDS * IMAGES})
            store.put_webhook(job_id, "completed", f"msg_c{job_id}", "{}" * 200)
            store.add_event(job_id, "completed", images=shards * SHARD_IDS * IMAGES)

    task("finalize", finalize)
    return job_id


def simulate_legacy(r: Any, shards: int) -> str:
    """The same job, replaying the commands of the earlier layout (f98d1b9): per-shard progress
    fields kept for good, a set of finished shard numbers, an attempt field and a done member per
    task, every event kept (XADD MAXLEN ~ 10000)."""
    store = JobStore(r)
    job_id = store.create("alpha", SPEC, "h", identities=shards * SHARD_IDS,
                          images=shards * SHARD_IDS * IMAGES).job_id
    job, progress = job_key(job_id), job_key(job_id, ":progress")

    def xadd(type_: str, **data: Any) -> None:
        r.xadd(job + ":events", {"type": type_, "at": now_iso(), **{k: str(v) for k, v in data.items()}},
               maxlen=10000, approximate=True)

    def task(key: str, work: Any) -> None:
        lease = f"{job}:lease:{key}"
        r.set(lease, WORKER, nx=True, px=60000)
        r.sismember(job + ":tasks_done", key)
        n = r.hincrby(job + ":attempts", key, 1)
        xadd("task_started", task=key, attempt=n, worker=WORKER)
        work()
        if key != "finalize":
            r.sadd(job + ":tasks_done", key)
        r.delete(lease)
        xadd("task_ended", task=key, outcome="returned", worker=WORKER)

    def set_progress(part: str, ids: int, imgs: int) -> None:
        old = r.hmget(progress, f"{part}:identities", f"{part}:images")
        r.hset(progress, mapping={f"{part}:identities": ids, f"{part}:images": imgs})
        r.hincrby(progress, "sum:identities", ids - int(old[0] or 0))
        r.hincrby(progress, "sum:images", imgs - int(old[1] or 0))

    def sample() -> None:
        r.hset(job, mapping={"status": "running", "stage": "sampling_identities"})
        xadd("status", **{"from": "queued", "to": "running"})
        xadd("stage", stage="sampling_identities")
        r.hset(f"{job}:webhooks", mapping={"once:stage:sampling_identities": "m1", "msg:m1": "{}" * 100})
        r.hset(job, mapping={"stage_done": 100, "stage_total": 100, "stage_unit": "steps",
                             "shards_total": shards})
        xadd("identities_sampled", identities=shards * SHARD_IDS, shards=shards)
        xadd("stage", stage="rendering")

    def render(k: int) -> Any:
        def work() -> None:
            set_progress(f"shard{k}", SHARD_IDS // 2, SHARD_IDS // 2 * IMAGES)
            set_progress(f"shard{k}", SHARD_IDS - 1, (SHARD_IDS - 1) * IMAGES)
            set_progress(f"shard{k}", SHARD_IDS, SHARD_IDS * IMAGES)
            r.sadd(job + ":shards_done", k)
        return work

    task("sample_identities", sample)
    for k in range(shards):
        task(f"render_shard:{k}", render(k))

    def finalize() -> None:
        for stage in ("evaluating", "packaging"):
            r.hset(job, "stage", stage)
            xadd("stage", stage=stage)

    task("finalize", finalize)
    return job_id


def measure(url: str, sizes: list[int]) -> list[str]:
    store = JobStore.from_url(url)
    r = store.r
    lines = [f"{'shards':>8} {'bytes/job now':>14} {'before':>12} {'ratio':>7} {'events now':>11} "
             f"{'before':>7} {'ended: keys with TTL':>21}"]
    for n in sizes:
        r.flushdb()
        t0 = time.perf_counter()
        new = simulate(store, n, end=False)
        now_b = footprint(r, new)
        now_events = r.xlen(job_key(new, ":events"))
        old = simulate_legacy(r, n)
        old_b = footprint(r, old)
        old_events = r.xlen(job_key(old, ":events"))
        ended = simulate(store, n, end=True)
        keys = footprint(r, ended)
        with_ttl = sum(1 for k in keys if r.pttl(k) > 0)
        lines.append(f"{n:>8} {sum(now_b.values()):>14,} {sum(old_b.values()):>12,} "
                     f"{sum(now_b.values()) / sum(old_b.values()):>7.3f} {now_events:>11,} "
                     f"{old_events:>7,} {with_ttl:>10}/{len(keys)} keys  ({time.perf_counter() - t0:.1f} s)")
        biggest = sorted(now_b.items(), key=lambda kv: -kv[1])[:4]
        lines.append("         now: " + ", ".join(f"{k.removeprefix(job_key(new))or 'job'} {v:,}"
                                                 for k, v in biggest))
        biggest = sorted(old_b.items(), key=lambda kv: -kv[1])[:4]
        lines.append("      before: " + ", ".join(f"{k.removeprefix(job_key(old)) or 'job'} {v:,}"
                                                 for k, v in biggest))
    assert P == "idf:"
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_footprint",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="100,1000,10000", help="comma-separated shard counts")
    a = parser.parse_args(argv)
    sizes = [int(x) for x in a.shards.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        srv = RedisServer(Path(tmp), appendonly=False).start()
        lines = []
        try:
            for line in measure(srv.url, sizes):
                print(line, flush=True)
                lines.append(line)
        finally:
            srv.stop()
    return lines


if __name__ == "__main__":
    main()
