"""Render one shard of a job, by the generator's kind: embedding-conditioned or latent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app import catalog
from app.layout import JobKeys
from app.spec import DisCo, JobSpec
from app.storage import Storage
from workers import latent, pipeline
from workers.pipeline import ShardResult


def render_shard(spec: JobSpec, shard: int, ids: range, models: Any, storage: Storage, keys: JobKeys, *,
                 on_progress: Callable[[int, int], None] = lambda ids_done, imgs_done: None,
                 on_stage: Callable[[int, int, str], None] = lambda done, total, unit: None,
                 should_stop: Callable[[], bool] = lambda: False) -> ShardResult:
    """Variations, images, crops and embeddings of identities `ids`, written to storage. The
    independent evaluator embeds the images too when the job has a quality report."""
    name = spec.models.generator
    embedder = models.embedder(spec.models.embedder)
    crop = models.cropper(name)
    evaluator = models.evaluator() if spec.quality.report else None
    if catalog.CATALOG[name].conditioning == "latent":
        refs = pipeline.load_identity_latents(storage, keys)[ids.start:ids.stop]  # [n, D]
        covariates = latent.load_covariates(models, name) if isinstance(spec.variations, DisCo) else None
        return latent.render_latent_shard(
            spec, shard, ids, refs, latent.latent_face(spec, models), embedder, storage, keys, crop=crop,
            covariates=covariates, evaluator=evaluator, on_progress=on_progress, on_stage=on_stage, should_stop=should_stop)
    refs = pipeline.load_identities(storage, keys)[ids.start:ids.stop]  # [n, D]
    return pipeline.render_shard(spec, shard, ids, refs, models.generator(name), embedder, storage, keys,
                                 crop=crop, evaluator=evaluator, on_progress=on_progress,
                                 should_stop=should_stop)
