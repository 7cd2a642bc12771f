"""The identity-sampling stage: reference embeddings for every identity of a job.

`random`: uniform points on the sphere, identity i from derive_seed(seed, "identity", i).
`hyperface`: a gallery of embeddings of images from the gallery generator, an embedding-conditioned
one (Arc2Face, from random conditioning embeddings) or an unconditional one (StyleGAN2, from random
latents, as in the paper), rendered in chunks, each saved, so a redelivered task resumes chunk by
chunk; then the HyperFace packing started from gallery points, checkpointed every
`checkpoint_steps` steps and resumed from the latest checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app import catalog
from app.errors import StorageKeyMissing
from app.layout import JobKeys
from app.spec import HyperFaceSampler, JobSpec, LangevinSampler
from app.storage import Storage
from models.sampling import hyperface, metrics
from models.sampling import random as random_sampler
from models.sampling.sphere import uniform_sphere
from models.seeding import derive_seed, make_generator
from workers import latent, pipeline
from workers.errors import Canceled
from workers.runtime import ModelCache


@dataclass
class Hooks:
    """How the stage talks to its caller: progress, events and cancellation."""

    progress: Callable[[int, int, str], None] = lambda done, total, unit: None
    event: Callable[..., None] = lambda type_, **data: None
    should_stop: Callable[[], bool] = lambda: False

    def check(self) -> None:
        if self.should_stop():
            raise Canceled()


@dataclass
class Sampled:
    embeddings: torch.Tensor  # [N, D] unit rows
    stats: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None  # [N, W] W latents, for latent generators


def sample(spec: JobSpec, models: ModelCache, storage: Storage, keys: JobKeys, *,
           checkpoint_steps: int = 50, gallery_chunk: int = 256,
           hooks: Hooks | None = None) -> Sampled:
    hooks = hooks or Hooks()
    if catalog.CATALOG[spec.models.generator].conditioning == "latent":
        face = latent.latent_face(spec, models)
        if isinstance(spec.sampler, LangevinSampler):
            latents, stats = latent.sample_langevin(spec, spec.sampler, face, storage, keys,
                                                    checkpoint_steps=checkpoint_steps, hooks=hooks)
        else:
            latents, stats = latent.sample_random(spec, face, hooks)
        return Sampled(latent.embed_latents(face, latents), stats, latents)
    if spec.sampler.method == "random":
        return Sampled(sample_random(spec, hooks), {"method": "random"})
    if isinstance(spec.sampler, HyperFaceSampler):
        gallery = build_gallery(spec, models, storage, keys, chunk=gallery_chunk, hooks=hooks)
        return sample_hyperface(spec, spec.sampler, gallery, storage, keys,
                                checkpoint_steps=checkpoint_steps, hooks=hooks)
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

def gallery_chunk_key(keys: JobKeys, k: int) -> str:
    return keys.gallery_chunk(k)


def build_gallery(spec: JobSpec, models: ModelCache, storage: Storage, keys: JobKeys, *,
                  chunk: int, hooks: Hooks) -> torch.Tensor:
    """Embeddings [M, E] (job embedder) of `gallery_size` images from the gallery generator.

    An embedding-conditioned gallery generator renders image k from a uniform conditioning
    embedding drawn from derive_seed(seed, "gallery", k) with diffusion noise from
    derive_seed(seed, "gallery-render", k); a latent one (StyleGAN2, as in the HyperFace paper)
    from a random latent drawn from derive_seed(seed, "gallery", k) (`_latent_gallery_images`).
    """
    assert isinstance(spec.sampler, HyperFaceSampler)
    m = spec.sampler.gallery_size
    name = spec.models.gallery_generator or spec.models.generator
    parts = []
    for k in range(math.ceil(m / chunk)):
        key = gallery_chunk_key(keys, k)
        lo, hi = k * chunk, min(m, (k + 1) * chunk)
        try:
            parts.append(st_load(storage.get_bytes(key))["embeddings"])  # resumed
        except StorageKeyMissing:
            part = _render_gallery(spec, models, name, range(lo, hi), hooks)
            storage.put_bytes(key, st_save({"embeddings": part.contiguous()}))
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
                                             make_generator(derive_seed(spec.seed, "gallery", k)))
                              for k in batch])  # [B, D]
            seeds = [derive_seed(spec.seed, "gallery-render", k) for k in batch]
            images = gen.render(cond, seeds, **pipeline.render_options(spec))  # [B, H, W, 3]
        out.append(emb.embed_images(crop(images).crops).float().cpu())  # [B, E]
    return torch.cat(out)


def _latent_gallery_images(spec: JobSpec, gen: Any, batch: range) -> torch.Tensor:
    """An unconditional generator's gallery images (HyperFace's gallery: randomly synthesised
    faces), uint8 [B, S, S, 3]: image k from z_k ~ N(0, I) drawn from derive_seed(seed, "gallery",
    k), mapped to W and truncated as the latent path's random identities are (psi 0.7), with the
    generator's constant noise. Embedded like any dataset image (crop, then the job's embedder),
    so any embedder serves, forward-only ones included."""
    d = int(gen.style_dim)
    z = torch.stack([make_generator(derive_seed(spec.seed, "gallery", k)).normal(d)
                     for k in batch])  # [B, D]
    images: torch.Tensor = gen.render(z, space="z", truncation_psi=latent.RANDOM_TRUNCATION,
                                      noise_mode="const")  # [B, S, S, 3]
    return images


# ---- the packing ------------------------------------------------------------------------------

def sample_hyperface(spec: JobSpec, sampler: HyperFaceSampler, gallery: torch.Tensor,
                     storage: Storage, keys: JobKeys, *, checkpoint_steps: int,
                     hooks: Hooks) -> Sampled:
    config = hyperface.HyperFaceConfig(
        iterations=sampler.iterations, learning_rate=sampler.learning_rate, alpha=sampler.alpha,
        batch_size=sampler.batch_size, gallery_refresh=sampler.gallery_refresh)
    init = hyperface.init_from_gallery(gallery, spec.identities,
                                       make_generator(derive_seed(spec.seed, "hyperface-init")))
    state = None
    saved = pipeline.identities_checkpoint(storage, keys)
    if saved is not None:
        state = hyperface.HyperFaceState.from_tensors(saved)
        hooks.event("resumed", stage="sampling_identities", step=int(state.step))
    on_step = pipeline.checkpoint_every(storage, keys, every=checkpoint_steps, total=sampler.iterations,
                                        unit="optimiser steps", progress=hooks.progress,
                                        event=hooks.event, check=hooks.check)

    result = hyperface.optimize(init, gallery, config,
                                generator=make_generator(derive_seed(spec.seed, "hyperface")),
                                on_step=on_step, state=state)
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
