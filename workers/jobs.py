"""Job orchestration: what each Celery task does, against the job store and storage.

Each function loads the job by id, checks it is still live, runs one pipeline step, records
progress and moves the job on. All are safe to run twice: outputs have deterministic keys,
finished shards are skipped, and status changes are compare-and-set.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from app import catalog, estimates, webhooks
from app import queue as q
from app.jobstore import TERMINAL
from app.layout import JobKeys
from app.spec import JobSpec
from workers import artifacts, pipelines, preview
from workers.errors import Incomplete, JobGone
from workers.exclusion import load_excluded
from workers.finalize import finish, reference_for
from workers.runtime import Runtime

log = logging.getLogger("idforge.worker")


def _live(rt: Runtime, job_id: str) -> tuple[dict[str, Any], JobSpec, JobKeys]:
    job = rt.store.get(job_id)
    if job is None:
        log.warning("job %s: no record; dropping the task", job_id)
        rt.scheduler.forget(job_id)
        raise JobGone()
    if job["status"] in TERMINAL:
        rt.scheduler.forget(job_id)
        raise JobGone()
    if job["status"] == "canceling":
        finish_cancel(rt, job_id)
        raise JobGone()
    return job, JobSpec.model_validate(job["spec"]), JobKeys.for_job(rt.settings.s3_prefix, job_id)


def _should_stop(rt: Runtime, job_id: str) -> Any:
    return lambda: rt.store.status(job_id) in ("canceling", "canceled", "failed")


def stop_if_canceling(rt: Runtime, job_id: str) -> None:
    """The `finish_cancel` task: a job being canceled that had nothing running ends here (`_live`
    finishes the cancel); a job in any other state is left alone."""
    try:
        _live(rt, job_id)
    except JobGone:
        return


def finish_cancel(rt: Runtime, job_id: str) -> None:
    """Mark partial outputs and move `canceling` to `canceled`."""
    rt.scheduler.forget(job_id)
    keys = JobKeys.for_job(rt.settings.s3_prefix, job_id)
    rt.storage.put_bytes(keys.canceled, b"this job was canceled; outputs are partial\n",
                         "text/plain")
    if rt.store.transition(job_id, "canceled")[0]:
        rt.telemetry.end_stage(job_id)
        log.info("job %s canceled", job_id)
        webhooks.notify(rt.store, rt.queue, job_id, "canceled", {"status": "canceled"})


def fail(rt: Runtime, job_id: str, code: str, message: str) -> None:
    rt.scheduler.forget(job_id)  # its held shards never run
    stage = (rt.store.get(job_id) or {}).get("stage")
    error = {"code": code, "message": message, "stage": stage}
    if rt.store.transition(job_id, "failed", error=error)[0]:
        rt.telemetry.end_stage(job_id)
        log.error("job %s failed at %s: %s", job_id, stage, message)
        webhooks.notify(rt.store, rt.queue, job_id, "failed", {"status": "failed", "error": error})


def enter_stage(rt: Runtime, job_id: str, stage: str) -> None:
    """Set the job's stage and move its stage clock (the stage-duration histogram of /metrics)."""
    rt.store.set_stage(job_id, stage)
    rt.telemetry.enter_stage(job_id, stage)
    webhooks.notify(rt.store, rt.queue, job_id, "stage", {"status": "running", "stage": stage})


def shard_progress(rt: Runtime, job_id: str, part: str) -> Callable[[int, int], None]:
    """A shard's progress callback: records the shard's progress and adds the images rendered since
    the last report to the service's images counter."""
    reported = [0]

    def report(identities_done: int, images_done: int) -> None:
        rt.store.set_progress(job_id, part, identities=identities_done, images=images_done)
        rt.telemetry.count_images(max(0, images_done - reported[0]))
        reported[0] = max(reported[0], images_done)

    return report


def sample_identities(rt: Runtime, job_id: str) -> None:
    job, spec, keys = _live(rt, job_id)
    m = spec.models
    generators = (m.generator, m.gallery_generator or m.generator) if spec.sampler.method == "hyperface" \
        else (m.generator,)
    # Fast mode is the diffusion generators' (a StyleGAN2 gallery renders no differently).
    diffusion = tuple(g for g in generators if catalog.CATALOG[g].conditioning == "embedding")
    rt.models.require(*generators, m.embedder,  # fail fast
                      fast=diffusion if spec.render.mode == "fast" else ())
    reference_for(spec, rt.settings.model_dir)  # fail fast: the leakage check's reference set
    rt.store.transition(job_id, "running")
    enter_stage(rt, job_id, "sampling_identities")
    started(rt, job, "sampling_identities")
    t0 = time.perf_counter()
    rt.storage.put_bytes(keys.spec, json.dumps(spec.normalized(), indent=1).encode(),
                         "application/json")
    if not rt.storage.exists(keys.identities) and preview.take_identities(spec, rt.storage, rt.settings.s3_prefix,
                                                                           keys):
        rt.store.add_event(job_id, "identities_reused", preview=preview.source_id(spec))
    if not rt.storage.exists(keys.identities):  # a redelivered task resumes from the saved set
        hooks = pipelines.Hooks(
            progress=lambda done, total, unit: rt.store.set_stage_progress(job_id, done, total, unit),
            event=lambda type_, **data: rt.store.add_event(job_id, type_, **data),
            should_stop=_should_stop(rt, job_id))
        excluded = load_excluded(spec, rt.storage, rt.settings.s3_prefix, rt.settings.model_dir)
        got = pipelines.sample_identities(spec, rt.models, rt.storage, keys,
                                          checkpoint_steps=rt.settings.checkpoint_steps,
                                          gallery_chunk=rt.settings.gallery_chunk, hooks=hooks,
                                          excluded=excluded)
        artifacts.save_identities(rt.storage, keys, got.embeddings,
                                  {**got.stats, "seconds": round(time.perf_counter() - t0, 3)},
                                  latents=got.latents)
        rt.throughput.observe(estimates.sample_key(spec),
                              (time.perf_counter() - t0) / estimates.sampler_units(spec))
    shards = spec.shard_plan(rt.settings.shard_identities)
    rt.store.set_totals(job_id, shards_total=len(shards))
    rt.store.add_event(job_id, "identities_sampled", identities=spec.identities,
                       shards=len(shards), seconds=round(time.perf_counter() - t0, 3))
    enter_stage(rt, job_id, "rendering")
    # Held, not sent: the scheduler releases them as the pool has room, fairly across teams
    # (tasking.release_shards runs when this task ends).
    cost = estimates.shard_seconds(spec, rt.settings.shard_identities, rt.throughput.table())
    rt.store.stage_queued(job_id, "rendering")
    rt.scheduler.hold(job_id, job["owner"], _priority(rt, job), len(shards), cost)


def render_shard(rt: Runtime, job_id: str, shard: int) -> None:
    job, spec, keys = _live(rt, job_id)
    shards = spec.shard_plan(rt.settings.shard_identities)
    if not 0 <= shard < len(shards):
        raise ValueError(f"shard {shard} out of range 0..{len(shards) - 1}")
    ids = shards[shard]
    part = f"shard{shard}"
    rt.scheduler.started(job_id, shard)
    started(rt, job, "rendering")
    if not rt.storage.exists(keys.shard_done(shard)) and \
            preview.take_shard(spec, rt.storage, rt.settings.s3_prefix, keys, shard, ids) is not None:
        rt.store.add_event(job_id, "shard_reused", shard=shard, preview=preview.source_id(spec))
    if not rt.storage.exists(keys.shard_done(shard)):
        result = pipelines.render_shard(spec, shard, ids, rt.models, rt.storage, keys, hooks=pipelines.Hooks(
            shard_progress=shard_progress(rt, job_id, part), should_stop=_should_stop(rt, job_id)))
        observe_shard(rt, spec, result)
    # The shard's final progress, folded into the job's totals once (a redelivery adds nothing).
    last = rt.store.shard_done(job_id, shard, identities=len(ids),
                               images=len(ids) * spec.images_per_identity) == len(shards)
    rt.scheduler.finished(job_id, shard)
    if rt.store.status(job_id) == "canceling" and not rt.scheduler.in_flight_of(job_id):
        # Canceled while this shard ran, and it finished without seeing it: nothing else runs to end it.
        finish_cancel(rt, job_id)
        return
    if last:
        rt.store.stage_queued(job_id, _finalize_stage(spec))
        rt.queue.send(q.FINALIZE, job_id)


def _finalize_stage(spec: JobSpec) -> str:
    return "evaluating" if spec.quality.report else "packaging"


def started(rt: Runtime, job: dict[str, Any], stage: str) -> None:
    """A worker began the stage: the first time, its queue wait goes to the team's histogram."""
    wait = rt.store.stage_started(job["id"], stage)
    if wait is not None:
        rt.telemetry.observe_wait(stage, job["owner"], _priority(rt, job), wait)


def _priority(rt: Runtime, job: dict[str, Any]) -> Any:
    """The priority the job runs at (a job recorded before priorities: its team's default)."""
    return job.get("priority") or rt.settings.team_priority(job["owner"])


def observe_shard(rt: Runtime, spec: JobSpec, result: Any) -> None:
    """What the shard cost, into the throughput table: seconds per image-unit and image bytes."""
    if result.rendered:
        rt.throughput.observe(estimates.render_key(spec),
                              result.seconds / (result.rendered * estimates.image_units(spec)))
    sizes = [f["size"] for f in result.files if f.get("size")]
    if sizes:
        rt.throughput.observe(estimates.bytes_key(spec), sum(sizes) / len(sizes))


def finalize(rt: Runtime, job_id: str) -> None:
    job, spec, keys = _live(rt, job_id)
    started(rt, job, _finalize_stage(spec))
    n_shards = len(spec.shard_plan(rt.settings.shard_identities))
    # Read lazily, one shard's file list at a time (finalize's memory does not grow with the images).
    shards = artifacts.ShardRecords(rt.storage, keys, n_shards)
    missing = shards.missing()
    if missing:  # finalize raced a redelivered shard: that shard resends it
        log.warning("job %s: finalize before every shard is done (no %s)", job_id,
                    keys.shard_done(missing[0]))
        return
    try:
        manifest = finish(
            job_id, spec, rt.storage, keys, shards, shard_identities=rt.settings.shard_identities,
            models=pipelines.models_used(spec, rt.models), reference=reference_for(spec, rt.settings.model_dir),
            on_stage=lambda stage: enter_stage(rt, job_id, stage))
    except Incomplete as e:
        fail(rt, job_id, e.code, str(e))
        return
    result = {"manifest": keys.manifest, "images": manifest["counts"]["images"],
              "identities": spec.rendered_identities,
              "counts": manifest["counts"], "quality": manifest["quality"],
              "report": keys.report("report.html") if spec.quality.report else None}
    if rt.store.transition(job_id, "succeeded", result=result)[0]:
        rt.telemetry.end_stage(job_id)
        webhooks.notify(rt.store, rt.queue, job_id, "completed", {"status": "succeeded", "result": result})
    rt.store.add_event(job_id, "completed", images=result["images"])
