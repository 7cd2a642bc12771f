"""The pipelines, one per generator kind, and the one dispatch between them.

A generator's conditioning (`app.catalog`) picks its pipeline: "embedding" (Arc2Face: identities
are embeddings, variations are embedding noise) or "latent" (StyleGAN2: identities are W latents,
variations are Dispersion or DisCo). Each pipeline module has `sample_identities` and
`render_shard` with the signatures below; `workers.jobs` (the Celery tasks) and `workers.local`
(`idforge generate`) call them through this module, with `Hooks` for progress and cancellation.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from app import catalog
from app.layout import JobKeys
from app.spec import JobSpec
from app.storage import Storage
from workers.exclusion import Excluded
from workers.pipelines import embedding, latent
from workers.pipelines.common import Hooks, Sampled
from workers.runtime import ModelCache
from workers.shard import ShardResult

PIPELINES: dict[str, ModuleType] = {"embedding": embedding, "latent": latent}  # by conditioning


def pipeline_for(generator: str) -> ModuleType:
    """The pipeline module of generator `generator` (a catalogue name), by its conditioning."""
    conditioning = catalog.CATALOG[generator].conditioning
    if conditioning not in PIPELINES:
        raise ValueError(f"generator {generator!r}: no pipeline for conditioning {conditioning!r}")
    return PIPELINES[conditioning]


def sample_identities(spec: JobSpec, models: ModelCache, storage: Storage, keys: JobKeys, *,
                      checkpoint_steps: int = 50, gallery_chunk: int = 256,
                      hooks: Hooks | None = None, excluded: Excluded | None = None) -> Sampled:
    """The job's identities (embeddings, and latents for a latent generator) and their stats; with
    `excluded` (`workers.exclusion`), kept at least its bound from the excluded identities."""
    got: Sampled = pipeline_for(spec.models.generator).sample_identities(
        spec, models, storage, keys, checkpoint_steps=checkpoint_steps, gallery_chunk=gallery_chunk,
        hooks=hooks or Hooks(), excluded=excluded)
    return got


def render_shard(spec: JobSpec, shard: int, ids: range, models: ModelCache, storage: Storage,
                 keys: JobKeys, *, hooks: Hooks | None = None) -> ShardResult:
    """Variations, images, crops and embeddings of identities `ids`, written to storage. The
    independent evaluator embeds the images too when the job has a quality report."""
    result: ShardResult = pipeline_for(spec.models.generator).render_shard(
        spec, shard, ids, models, storage, keys, hooks=hooks or Hooks())
    return result


def models_used(spec: JobSpec, models: Any) -> dict[str, dict[str, Any]]:
    """Each model the job used, by role, with its licence notes and weight sha256."""
    roles = [("generator", spec.models.generator), ("embedder", spec.models.embedder)]
    if spec.sampler.method == "hyperface":
        roles.append(("gallery_generator", spec.models.gallery_generator or spec.models.generator))
    return {role: models.weights(name) for role, name in roles}


__all__ = ["Hooks", "Sampled", "models_used", "pipeline_for", "render_shard", "sample_identities"]
