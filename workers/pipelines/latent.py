"""The latent-space pipeline: StyleGAN2 identities (random or Langevin) and their variations
(Dispersion, DisCo), rendered and written shard by shard.

Identity i starts from z drawn from derive_seed(seed, IDENTITY, i); Langevin's noise, and
Dispersion's initial offsets and noise, come from the job seed and the identity (and sample)
index alone, so every image is reproducible from (seed, identity, sample) whatever the sharding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from app.layout import JobKeys
from app.spec import DisCo, Dispersion, JobSpec, LangevinSampler
from app.storage import Storage
from models.modelspec import ModelUnavailable
from models.sampling import covariates as covariates_mod
from models.sampling import dispersion, langevin, metrics
from models.sampling.latent_face import LatentCrop, LatentFace
from models.seeding import (
    DERIVE_SEED_SCHEME,
    DISCO,
    DISPERSION_INIT,
    DISPERSION_NOISE,
    EXCLUDE_REDRAW,
    IDENTITY,
    LANGEVIN,
    LANGEVIN_NOISE,
    STREAM_SCHEME,
    derive_seed,
)
from workers import artifacts
from workers.exclusion import Excluded, enforce, redraw_until_clear
from workers.pipelines.common import Hooks, Sampled, batched, shard_parts
from workers.runtime import ModelCache
from workers.shard import Batch, ShardResult, write_shard

RANDOM_TRUNCATION = 0.7  # psi of the random sampler's latents, as Langevin's initial latents
COVARIATES_FILE = "covariates.safetensors"  # DisCo's directions, in the generator's model directory

# The manifest's `seed_derivation` for this pipeline: identity i's z, Langevin's noise,
# Dispersion's initial offset and per-step noise of sample s, DisCo's covariate mix; each file's
# `seed` is its dispersion.init seed.
SEED_DERIVATION = {
    "function": DERIVE_SEED_SCHEME,
    "stream": STREAM_SCHEME,
    "identity": f"z_i ~ N(0, I) from derive_seed(seed, {IDENTITY!r}, i)",
    "langevin_noise": f"derive_seed(derive_seed(seed, {LANGEVIN!r}), {LANGEVIN_NOISE!r}, i, step)",
    "dispersion_init": f"derive_seed(seed, {DISPERSION_INIT!r}, i, s)",
    "dispersion_noise": f"derive_seed(seed, {DISPERSION_NOISE!r}, i, s, step)",
    "disco_mix": f"derive_seed(seed, {DISCO!r}, i, s)",
}


def latent_face(spec: JobSpec, models: Any) -> LatentFace:
    """The job's generator and embedder as one differentiable latents -> embeddings map."""
    name = spec.models.generator
    crop: LatentCrop = "ffhq" if models.registry.spec(name).alignment == "ffhq" else "center"
    return LatentFace(models.generator(name), models.embedder(spec.models.embedder), crop)


def identity_seeds(spec: JobSpec, ids: range) -> list[int]:
    return [derive_seed(spec.seed, IDENTITY, i) for i in ids]


@torch.no_grad()
def embed_latents(face: LatentFace, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unit embeddings [N, E] of latents [N, D], batched, without gradients."""
    return torch.cat([face.embed(latents[lo:lo + batch_size]).float().cpu()
                      for lo in range(0, latents.shape[0], batch_size)])


# ---- identities -------------------------------------------------------------------------------

def sample_identities(spec: JobSpec, models: ModelCache, storage: Storage, keys: JobKeys, *,
                      checkpoint_steps: int, gallery_chunk: int, hooks: Hooks,
                      excluded: Excluded | None = None) -> Sampled:
    """Reference latents for every identity of the job, by its sampler, and their embeddings.
    `gallery_chunk` is the embedding pipeline's (no latent sampler has a gallery). With `excluded`,
    every identity's embedding ends at least its bound from the excluded ones: Langevin repels from
    them, random redraws the latents of the identities that land too close; both are checked."""
    face = latent_face(spec, models)
    if isinstance(spec.sampler, LangevinSampler):
        latents, stats = sample_langevin(spec, spec.sampler, face, storage, keys,
                                         checkpoint_steps=checkpoint_steps, hooks=hooks, excluded=excluded)
        embeddings = embed_latents(face, latents)
    else:
        latents, stats = sample_random(spec, face, hooks)
        embeddings = embed_latents(face, latents)
        if excluded is not None:
            def redraw(i: int, k: int) -> torch.Tensor:
                w = face.initial_latents([derive_seed(spec.seed, EXCLUDE_REDRAW, i, k)], RANDOM_TRUNCATION).cpu()
                return embed_latents(face, w)[0]
            embeddings = redraw_until_clear(embeddings, excluded, redraw)
            for i, k in excluded.redraws.items():  # the latents of the redrawn identities
                latents[i] = face.initial_latents([derive_seed(spec.seed, EXCLUDE_REDRAW, i, k)],
                                                  RANDOM_TRUNCATION).cpu()[0]
    if excluded is not None:
        stats["exclusion"] = enforce(embeddings, excluded)
    return Sampled(embeddings, stats, latents)


def sample_random(spec: JobSpec, face: LatentFace, hooks: Hooks, chunk: int = 1024) -> tuple[torch.Tensor, dict[str, Any]]:
    """Latents [N, D]: w_avg + 0.7 (mapping(z_i) - w_avg), z_i from (seed, IDENTITY, i)."""
    parts = []
    for lo in range(0, spec.identities, chunk):
        hooks.check()
        ids = range(lo, min(spec.identities, lo + chunk))
        parts.append(face.initial_latents(identity_seeds(spec, ids), RANDOM_TRUNCATION).cpu())
        hooks.progress(ids.stop, spec.identities, "identities")
    return torch.cat(parts), {"method": "random", "truncation": RANDOM_TRUNCATION}


def langevin_config(sampler: LangevinSampler) -> langevin.LangevinConfig:
    return langevin.LangevinConfig(
        iterations=sampler.iterations, stiffness=sampler.stiffness,
        repulsion_radius=sampler.repulsion_radius, latent_pull=sampler.latent_pull, noise=sampler.noise,
        tau=sampler.tau, truncation=sampler.truncation, batch_size=sampler.batch_size)


def sample_langevin(spec: JobSpec, sampler: LangevinSampler, face: LatentFace, storage: Storage,
                    keys: JobKeys, *, checkpoint_steps: int, hooks: Hooks,
                    excluded: Excluded | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Langevin dynamics over all identities, one checkpointed task that resumes after a crash. With
    `excluded`, the excluded identities are the fixed references it repels from, out to at least
    the bound (the reference radius grows to 1.1 x the bound when that is wider)."""
    config = langevin_config(sampler)
    references = None
    if excluded is not None:
        references = excluded.embeddings
        radius = max(config.reference_repulsion_radius, min(math.pi, 1.1 * math.radians(excluded.min_angle_deg)))
        config = dataclasses.replace(config, reference_repulsion_radius=radius)
    seed = derive_seed(spec.seed, LANGEVIN)
    saved = artifacts.identities_checkpoint(storage, keys)
    if saved is not None:
        state = langevin.LangevinState.from_tensors(saved)
        hooks.event("resumed", stage="sampling_identities", step=int(state.step))
    else:
        state = langevin.init_state(face, spec.identities, spec.seed, config)
    init_angle = _min_angle_deg(embed_latents(face, state.latents, config.batch_size))
    on_step = artifacts.checkpoint_every(storage, keys, hooks, every=checkpoint_steps,
                                         total=sampler.iterations, unit="Langevin steps")

    last = langevin.run(face, state, config, seed, references, on_step=on_step)
    latents = state.latents.float().cpu()
    stats = {"method": "langevin", "iterations": sampler.iterations,
             "init_min_angle_deg": init_angle,
             "final": last.to_json() if last is not None else None}
    return latents, stats


def _min_angle_deg(embeddings: torch.Tensor) -> float | None:
    if embeddings.shape[0] < 2:
        return None
    return round(math.degrees(float(metrics.min_angle(embeddings))), 4)


# ---- variations and rendering -----------------------------------------------------------------

def dispersion_config(v: Dispersion) -> dispersion.DispersionConfig:
    return dispersion.DispersionConfig(
        iterations=v.iterations, init_scale=v.init_scale, attraction=v.attraction, repulsion=v.repulsion,
        repulsion_radius=v.repulsion_radius, latent_pull=v.latent_pull, noise=v.noise, dt=v.dt,
        batch_size=v.batch_size)


def load_covariates(models: Any, generator: str) -> Any:
    """DisCo's directions for `generator`, from its model directory (pinned like its weights)."""
    path = Path(models.registry.root(generator)) / COVARIATES_FILE
    if not path.is_file():
        raise ModelUnavailable(generator, f"variations 'disco' needs {COVARIATES_FILE} in {path.parent} "
                               "(fit it with `idforge covariates fit`, see docs/covariates.md)")
    return covariates_mod.Covariates.load(path)


def render_shard(spec: JobSpec, shard: int, ids: range, models: ModelCache, storage: Storage,
                 keys: JobKeys, *, hooks: Hooks) -> ShardResult:
    """Shard `shard` (identities `ids`) from the saved identity latents, with the job's models."""
    name = spec.models.generator
    embedder, crop, evaluator = shard_parts(spec, models)
    refs = artifacts.load_identity_latents(storage, keys, ids)  # [n, D]: the shard's rows alone
    covariates = load_covariates(models, name) if isinstance(spec.variations, DisCo) else None
    return render_references(spec, shard, ids, refs, latent_face(spec, models), embedder, storage, keys,
                             crop=crop, covariates=covariates, evaluator=evaluator, hooks=hooks)


def render_references(spec: JobSpec, shard: int, ids: range, references: torch.Tensor, face: LatentFace,
                      embedder: Any, storage: Storage, keys: JobKeys, *, crop: Any, covariates: Any = None,
                      evaluator: Any = None, hooks: Hooks | None = None) -> ShardResult:
    """Variations of identities `ids` (reference latents [n, D]) by Dispersion or DisCo, rendered.

    Each block of A variations of an identity is dispersed together (their latents repel each
    other); a quality top-up disperses a further block with its own streams.
    """
    hooks = hooks or Hooks()
    v = spec.variations
    if not isinstance(v, Dispersion):
        raise ValueError(f"variations {v.method!r} cannot drive a latent generator")
    a = spec.images_per_identity
    result = ShardResult(shard=shard, identities=list(ids))

    def on_step(stats: Any) -> None:
        hooks.progress(stats.step, v.iterations, "dispersion steps")
        hooks.check()

    def blocks(subset: list[int], first: int) -> Iterator[Batch]:
        refs = references[[i - ids.start for i in subset]]  # [m, D]
        offsets = None
        if isinstance(v, DisCo):
            offsets = covariates_mod.disco_offsets(covariates, subset, a, spec.seed, first_variation=first)
        latents = dispersion.disperse(face, refs, subset, spec.seed, a, dispersion_config(v), offsets=offsets,
                                      on_step=on_step, first_variation=first).latents.float().cpu()  # [m, A, D]
        items = [(k, i, first + j) for k, i in enumerate(subset) for j in range(a)]
        for batch in batched(items, spec.render.batch_size):
            w = torch.stack([latents[k, s - first] for k, _, s in batch])  # [B, D]
            with torch.no_grad():
                images = LatentFace.to_uint8(face.images(w))  # [B, S, S, 3]
            seeds = [derive_seed(spec.seed, DISPERSION_INIT, i, s) for _, i, s in batch]
            yield Batch([(i, s) for _, i, s in batch], seeds, images, latents=w)

    return write_shard(spec, ids, blocks, embedder, storage, keys, result, crop=crop, evaluator=evaluator,
                       references=face_references(storage, keys, ids), on_progress=hooks.shard_progress,
                       should_stop=hooks.should_stop)


def face_references(storage: Storage, keys: JobKeys, ids: range) -> torch.Tensor:
    """The identities' reference embeddings: their reference latents' images, embedded [n, E]."""
    return artifacts.load_identities(storage, keys, ids)
