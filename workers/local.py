"""`idforge generate`: run a job spec in-process into a local directory, no service."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.layout import JobKeys
from app.settings import Settings
from app.spec import JobSpec, check_models
from app.storage import LocalStorage
from workers import artifacts, finalize, pipelines
from workers.exclusion import Excluded, load_excluded
from workers.runtime import ModelCache, model_registry, pick_device, quiet_libraries


def generate(spec: JobSpec, out_dir: Path, *, settings: Settings | None = None,
             on_progress: Callable[[int, int], None] = lambda done, total: None,
             models: ModelCache | None = None, excluded: Excluded | None = None) -> dict[str, Any]:
    """Render the dataset of `spec` into `out_dir`; returns the manifest. `models`: models already
    loaded (`idforge reproduce` embeds with the same ones), else loaded from the settings.
    `excluded`: the identities `sampler.exclude` names (`workers.exclusion`); when None and the spec
    excludes anything, its reference sets are read from the model directory (job ids need the
    service's storage: pass them)."""
    check_models(spec)
    quiet_libraries()
    s = settings or Settings()
    models = models or ModelCache(model_registry(s), pick_device(s.device))
    storage, keys = LocalStorage(out_dir), JobKeys("")
    t0 = time.perf_counter()
    if excluded is None and spec.sampler.exclude:
        excluded = load_excluded(spec, storage, "", s.model_dir)
    got = pipelines.sample_identities(spec, models, storage, keys, checkpoint_steps=s.checkpoint_steps,
                                      gallery_chunk=s.gallery_chunk, excluded=excluded)
    artifacts.save_identities(storage, keys, got.embeddings,
                              {**got.stats, "seconds": round(time.perf_counter() - t0, 3)}, latents=got.latents)
    total = spec.rendered_identities * spec.images_per_identity
    plan, done = spec.shard_plan(s.shard_identities), 0
    for k, ids in enumerate(plan):
        def progress(ids_done: int, imgs_done: int, base: int = done) -> None:
            on_progress(base + imgs_done, total)

        res = pipelines.render_shard(spec, k, ids, models, storage, keys,
                                     hooks=pipelines.Hooks(shard_progress=progress))
        done += len(res.files)
    shards = artifacts.ShardRecords(storage, keys, len(plan))  # read back one at a time, as a worker does
    return finalize.finish("local", spec, storage, keys, shards, shard_identities=s.shard_identities,
                          models=pipelines.models_used(spec, models),
                          reference=finalize.reference_for(spec, s.model_dir), device=models.device)
