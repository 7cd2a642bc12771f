"""The embedding-conditioned pipeline (Arc2Face): identities are unit embeddings, variations are
embedding noise around them, and the generator renders each variation with its own seed.

Identities:
  `random`: uniform points on the sphere, identity i from derive_seed(seed, IDENTITY, i).
  `hyperface`: a gallery of embeddings of images from the gallery generator, an embedding-
  conditioned one (Arc2Face, from random conditioning embeddings) or an unconditional one
  (StyleGAN2, from random latents, as in the paper), rendered in chunks, each saved, so a
  redelivered task resumes chunk by chunk; then the HyperFace packing started from gallery points,
  checkpointed every `checkpoint_steps` steps and resumed from the latest checkpoint.

Every image is addressable by (job seed, identity, sample):
  sample (i, s)'s embedding <- derive_seed(seed, VARIATION, i, s)
  sample (i, s)'s diffusion noise <- derive_seed(seed, RENDER, i, s)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from app import catalog
from app.layout import JobKeys
from app.spec import EmbeddingNoise, HyperFaceSampler, JobSpec
from app.storage import Storage
from models.alignment.cropper import Cropper
from models.sampling import hyperface, metrics
from models.sampling import random as random_sampler
from models.sampling.cone import ConeConfig, angles_deg, cone_variations
from models.sampling.embedding_noise import (
    EmbeddingNoiseConfig,
    embedding_noise,
    mean_cosine,
    scale_for_mean_cosine,
)
from models.sampling.repulsors import Repulsors, clear
from models.sampling.sphere import uniform_sphere
from models.seeding import (
    DERIVE_SEED_SCHEME,
    EXCLUDE_REDRAW,
    GALLERY,
    GALLERY_RENDER,
    HYPERFACE,
    HYPERFACE_INIT,
    IDENTITY,
    RENDER,
    STREAM_SCHEME,
    VARIATION,
    derive_seed,
    make_generator,
)
from workers import artifacts
from workers.exclusion import Excluded, enforce, redraw_until_clear
from workers.pipelines.common import Hooks, Sampled, batched, shard_parts
from workers.pipelines.latent import RANDOM_TRUNCATION
from workers.runtime import ModelCache
from workers.shard import Batch, Embedder, ShardResult, write_shard

# The manifest's `seed_derivation` for this pipeline. Every seed starts its own portable stream
# (`make_generator`): the same bits on every machine.
SEED_DERIVATION = {
    "function": DERIVE_SEED_SCHEME,
    "stream": STREAM_SCHEME,
    "identity": f"derive_seed(seed, {IDENTITY!r}, i)",
    "variation": f"derive_seed(seed, {VARIATION!r}, i, s)",
    "render": f"derive_seed(seed, {RENDER!r}, i, s)",
    "gallery": f"HyperFace gallery item k: embedding (or latent z) from derive_seed(seed, {GALLERY!r}, k), "
               f"diffusion noise from derive_seed(seed, {GALLERY_RENDER!r}, k)",
    "hyperface": f"initial points from derive_seed(seed, {HYPERFACE_INIT!r}); batches (stochastic "
                 f"variant) or the restart packer's perturbations from derive_seed(seed, {HYPERFACE!r})",
}


class Generator(Protocol):
    embedding_dim: int

    def render(self, embeddings: torch.Tensor, seeds: Sequence[int], *, steps: int,
               guidance_scale: float) -> torch.Tensor: ...


# ---- identities -------------------------------------------------------------------------------

def sample_identities(spec: JobSpec, models: ModelCache, storage: Storage, keys: JobKeys, *,
                      checkpoint_steps: int, gallery_chunk: int, hooks: Hooks,
                      excluded: Excluded | None = None) -> Sampled:
    """Reference embeddings for every identity of the job, by its sampler; with `excluded`, every one
    at least its bound from the excluded identities (random redraws; else checked)."""
    if spec.sampler.method == "random":
        x = sample_random(spec, hooks)
        stats: dict[str, Any] = {"method": "random"}
        if excluded is not None:
            dim = x.shape[1]
            x = redraw_until_clear(x, excluded, lambda i, k: uniform_sphere(
                1, dim, make_generator(derive_seed(spec.seed, EXCLUDE_REDRAW, i, k)))[0])
            stats["exclusion"] = enforce(x, excluded)
        return Sampled(x, stats)
    if isinstance(spec.sampler, HyperFaceSampler):
        gallery = build_gallery(spec, models, storage, keys, chunk=gallery_chunk, hooks=hooks)
        got = sample_hyperface(spec, spec.sampler, gallery, storage, keys,
                               checkpoint_steps=checkpoint_steps, hooks=hooks, excluded=excluded)
        if excluded is not None:
            got.stats["exclusion"] = enforce(got.embeddings, excluded)
        return got
    raise ValueError(f"sampler {spec.sampler.method!r} is not implemented by this worker")


def sample_random(spec: JobSpec, hooks: Hooks, chunk: int = 4096) -> torch.Tensor:
    dim = catalog.CATALOG[spec.models.generator].embedding_dim or 512
    parts = []
    for lo in range(0, spec.identities, chunk):
        hooks.check()
        n = min(chunk, spec.identities - lo)
        parts.append(random_sampler.sample_identities(spec.seed, lo, n, dim))  # [n, D]
        hooks.progress(lo + n, spec.identities, "identities")
    return torch.cat(parts)  # [N, D]


# ---- the gallery ------------------------------------------------------------------------------

def build_gallery(spec: JobSpec, models: ModelCache, storage: Storage, keys: JobKeys, *,
                  chunk: int, hooks: Hooks) -> torch.Tensor:
    """Embeddings [M, E] (job embedder) of `gallery_size` images from the gallery generator.

    An embedding-conditioned gallery generator renders image k from a uniform conditioning
    embedding drawn from derive_seed(seed, GALLERY, k) with diffusion noise from
    derive_seed(seed, GALLERY_RENDER, k); a latent one (StyleGAN2, as in the HyperFace paper)
    from a random latent drawn from derive_seed(seed, GALLERY, k) (`_latent_gallery_images`).
    """
    assert isinstance(spec.sampler, HyperFaceSampler)
    m = spec.sampler.gallery_size
    name = spec.models.gallery_generator or spec.models.generator
    parts = []
    for k in range(math.ceil(m / chunk)):
        lo, hi = k * chunk, min(m, (k + 1) * chunk)
        part = artifacts.load_gallery_chunk(storage, keys, k)  # resumed
        if part is None:
            part = _render_gallery(spec, models, name, range(lo, hi), hooks)
            artifacts.save_gallery_chunk(storage, keys, k, part)
        parts.append(part)
        hooks.progress(hi, m, "gallery images")
    return torch.cat(parts)  # [M, E]


def _render_gallery(spec: JobSpec, models: ModelCache, name: str, ids: range,
                    hooks: Hooks) -> torch.Tensor:
    """Job-embedder embeddings [len(ids), E] of gallery images `ids` of generator `name`, each
    cropped by that generator's alignment."""
    gen, emb = models.generator(name), models.embedder(spec.models.embedder)
    crop = models.cropper(name)
    latent = catalog.CATALOG[name].conditioning == "latent"
    out = []
    bs = spec.render.batch_size
    for b0 in range(ids.start, ids.stop, bs):
        hooks.check()
        batch = range(b0, min(ids.stop, b0 + bs))
        if latent:
            images = _latent_gallery_images(spec, gen, batch)
        else:
            cond = torch.cat([uniform_sphere(1, gen.embedding_dim,
                                             make_generator(derive_seed(spec.seed, GALLERY, k)))
                              for k in batch])  # [B, D]
            seeds = [derive_seed(spec.seed, GALLERY_RENDER, k) for k in batch]
            images = gen.render(cond, seeds, **render_options(spec))  # [B, H, W, 3]
        out.append(emb.embed_images(crop(images).crops).float().cpu())  # [B, E]
    return torch.cat(out)


def _latent_gallery_images(spec: JobSpec, gen: Any, batch: range) -> torch.Tensor:
    """An unconditional generator's gallery images (HyperFace's gallery: randomly synthesised
    faces), uint8 [B, S, S, 3]: image k from z_k ~ N(0, I) drawn from derive_seed(seed, GALLERY,
    k), mapped to W and truncated as the latent path's random identities are (psi 0.7), with the
    generator's constant noise. Embedded like any dataset image (crop, then the job's embedder),
    so any embedder serves, forward-only ones included."""
    d = int(gen.style_dim)
    z = torch.stack([make_generator(derive_seed(spec.seed, GALLERY, k)).normal(d)
                     for k in batch])  # [B, D]
    images: torch.Tensor = gen.render(z, space="z", truncation_psi=RANDOM_TRUNCATION,
                                      noise_mode="const")  # [B, S, S, 3]
    return images


# ---- the packing ------------------------------------------------------------------------------

def sample_hyperface(spec: JobSpec, sampler: HyperFaceSampler, gallery: torch.Tensor,
                     storage: Storage, keys: JobKeys, *, checkpoint_steps: int,
                     hooks: Hooks, excluded: Excluded | None = None) -> Sampled:
    """The HyperFace packing started from gallery points: one run of the paper's schedule
    (checkpointed, resumed step by step), or with `sampler.restarts` the restart packer (pure
    packing; a redelivered task runs it again from its seed, to the same points). Excluded
    identities are fixed repulsors: no identity ends inside their caps (`models.sampling.repulsors`)."""
    repulsors = None if excluded is None else Repulsors(excluded.embeddings, math.radians(excluded.min_angle_deg))
    init = hyperface.init_from_gallery(gallery, spec.identities,
                                       make_generator(derive_seed(spec.seed, HYPERFACE_INIT)))
    if spec.identities < 2:  # nothing to pack: the one identity is its gallery point
        x = init.float().cpu() if repulsors is None else clear(init.float().cpu().clone(), repulsors)
        stats: dict[str, Any] = {"method": "hyperface", "min_angle_deg": None, "note": "one identity: not packed"}
        hooks.event("identities_packed", **stats)
        return Sampled(x, stats)
    if sampler.restarts is not None:
        return _pack(spec, sampler, init, hooks, repulsors)
    config = hyperface.HyperFaceConfig(
        iterations=sampler.iterations, learning_rate=sampler.learning_rate, alpha=sampler.alpha,
        batch_size=sampler.batch_size, gallery_refresh=sampler.gallery_refresh)
    state = None
    saved = artifacts.identities_checkpoint(storage, keys)
    if saved is not None:
        state = hyperface.HyperFaceState.from_tensors(saved)
        hooks.event("resumed", stage="sampling_identities", step=int(state.step))
    on_step = artifacts.checkpoint_every(storage, keys, hooks, every=checkpoint_steps,
                                         total=sampler.iterations, unit="optimiser steps")

    result = hyperface.optimize(init, gallery, config,
                                generator=make_generator(derive_seed(spec.seed, HYPERFACE)),
                                on_step=on_step, state=state, repulsors=repulsors)
    x = result.embeddings.float().cpu()  # [N, D]
    init_angle = float(metrics.min_angle(init)) if spec.identities > 1 else math.pi
    stats = {
        "method": "hyperface",
        "iterations": sampler.iterations,
        "gallery_size": int(gallery.shape[0]),
        "min_angle_deg": round(math.degrees(float(metrics.min_angle(x))), 4)
        if spec.identities > 1
        else None,
        "init_min_angle_deg": round(math.degrees(init_angle), 4),
        "final_loss": round(float(result.history[-1].loss), 6) if result.history else None,
    }
    hooks.event("identities_packed", **stats)
    return Sampled(x, stats)


def _pack(spec: JobSpec, sampler: HyperFaceSampler, init: torch.Tensor, hooks: Hooks,
          repulsors: Repulsors | None) -> Sampled:
    """Pure packing by the restart packer (`hyperface.optimize_with_restarts` with its defaults and
    `sampler.restarts` rounds at most); its perturbations are drawn from derive_seed(seed, HYPERFACE)."""
    rounds = int(sampler.restarts or 1)

    def on_round(r: int, best: float) -> None:
        hooks.progress(r + 1, rounds, "packing rounds")
        hooks.check()

    result = hyperface.optimize_with_restarts(
        init, None, generator=make_generator(derive_seed(spec.seed, HYPERFACE)), rounds=rounds,
        repulsors=repulsors, on_round=on_round)
    x = result.embeddings.float().cpu()  # [N, D]
    stats = {
        "method": "hyperface",
        "restarts": rounds,
        "rounds_run": len(result.rounds),
        "stopped": result.stopped,
        "candidates": sum(len(r) for r in result.rounds),
        "min_angle_deg": round(math.degrees(result.min_angle), 4),
        "init_min_angle_deg": round(math.degrees(float(metrics.min_angle(init))), 4),
        "rankin_bound_deg": round(math.degrees(metrics.rankin_bound(*x.shape)), 4),
    }
    hooks.event("identities_packed", **stats)
    return Sampled(x, stats)


# ---- variations and rendering -----------------------------------------------------------------

def render_options(spec: JobSpec) -> dict[str, Any]:
    """The generator's render arguments from the job spec (fast = LCM-LoRA sampling)."""
    r = spec.render
    options: dict[str, Any] = {"steps": r.steps, "guidance_scale": r.guidance_scale}
    if r.mode == "fast":
        options["fast"] = True
    return options


def noise_scale(spec: JobSpec, dim: int) -> float:
    """The embedding-noise sigma: given, or solved from the target mean cosine."""
    v = spec.variations
    if not isinstance(v, EmbeddingNoise):
        raise ValueError(f"variations {v.method!r} are not implemented by this worker")
    return v.scale if v.target_cosine is None else scale_for_mean_cosine(v.target_cosine, dim)


def conditioning(spec: JobSpec, dim: int) -> Callable[[torch.Tensor, list[int], int], torch.Tensor]:
    """The spec's variations as a function (references [m, D], identity ids, first sample) ->
    conditioning embeddings [m, A, D]: Gaussian embedding noise, or uniform in a cone."""
    v = spec.variations
    a = spec.images_per_identity
    if isinstance(v, EmbeddingNoise) and v.cone_degrees is not None:
        cone = ConeConfig(half_angle_deg=v.cone_degrees)
        return lambda refs, ids, first: cone_variations(refs, ids, a, spec.seed, cone, first_sample=first)
    config = EmbeddingNoiseConfig(scale=noise_scale(spec, dim))
    return lambda refs, ids, first: embedding_noise(refs, ids, a, spec.seed, config, first_sample=first)


def render_shard(spec: JobSpec, shard: int, ids: range, models: ModelCache, storage: Storage,
                 keys: JobKeys, *, hooks: Hooks) -> ShardResult:
    """Shard `shard` (identities `ids`) from the saved identities, with the job's models."""
    embedder, crop, evaluator = shard_parts(spec, models)
    refs = artifacts.load_identities(storage, keys, ids)  # [n, D]: the shard's rows alone
    return render_references(spec, shard, ids, refs, models.generator(spec.models.generator), embedder,
                             storage, keys, crop=crop, evaluator=evaluator, hooks=hooks)


def render_references(spec: JobSpec, shard: int, ids: range, references: torch.Tensor,
                      generator: Generator, embedder: Embedder, storage: Storage, keys: JobKeys, *,
                      crop: Cropper | None = None, evaluator: Any = None,
                      hooks: Hooks | None = None) -> ShardResult:
    """Render identities `ids` of an embedding-conditioned generator (references [len(ids), D]).

    Sample (i, s) conditions the generator on embedding noise around reference i and renders with
    its own seed; `write_shard` crops, embeds, filters and saves the images.
    """
    hooks = hooks or Hooks()
    if references.shape[0] != len(ids):
        raise ValueError(f"references has {references.shape[0]} rows for {len(ids)} identities")
    a = spec.images_per_identity
    variate = conditioning(spec, references.shape[1])
    first_block = variate(references, list(ids), 0)  # [n, A, D]
    realised = mean_cosine(references, first_block)  # [n] mean cosine of samples to reference
    cone = isinstance(spec.variations, EmbeddingNoise) and spec.variations.cone_degrees is not None
    result = ShardResult(shard=shard, identities=list(ids), noise_scale=0.0 if cone else noise_scale(spec, references.shape[1]),
                         reference_cosine=[round(float(c), 6) for c in realised],
                         reference_angle_max=[round(float(x), 6) for x in angles_deg(references, first_block).amax(dim=1)]
                         if cone else [])

    def blocks(subset: list[int], first: int) -> Iterator[Batch]:
        rows = references[[i - ids.start for i in subset]]  # [m, D]
        variations = first_block if first == 0 and subset == list(ids) else \
            variate(rows, subset, first)  # [m, A, D]
        items = [(k, i, first + j) for k, i in enumerate(subset) for j in range(a)]
        for batch in batched(items, spec.render.batch_size):
            emb = torch.stack([variations[k, s - first] for k, _, s in batch])  # [B, D]
            seeds = [derive_seed(spec.seed, RENDER, i, s) for _, i, s in batch]
            yield Batch([(i, s) for _, i, s in batch], seeds, generator.render(emb, seeds, **render_options(spec)))

    return write_shard(spec, ids, blocks, embedder, storage, keys, result, crop=crop, evaluator=evaluator,
                       references=references, on_progress=hooks.shard_progress, should_stop=hooks.should_stop)
