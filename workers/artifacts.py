"""The job pipeline, shard by shard, with no broker or job store in sight.

Celery tasks (workers/jobs.py) and the in-process `idforge generate` (workers/local.py) both call
these functions; they report progress and check for cancellation through callbacks.

Every image is addressable by (job seed, identity, sample):
  identity i's reference  <- derive_seed(seed, "identity", i)      (random sampler)
  sample (i, s)'s embedding <- derive_seed(seed, "variation", i, s)
  sample (i, s)'s diffusion noise <- derive_seed(seed, "render", i, s)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.errors import StorageKeyMissing
from app.layout import JobKeys
from app.spec import EmbeddingNoise, JobSpec
from app.storage import Storage
from models.alignment.cropper import Cropper
from models.sampling.embedding_noise import (
    EmbeddingNoiseConfig,
    embedding_noise,
    mean_cosine,
    scale_for_mean_cosine,
)
from models.seeding import DERIVE_SEED_SCHEME, STREAM_SCHEME, derive_seed
from workers.shard import Batch, Embedder, ShardResult, write_shard

__all__ = ["Batch", "ShardResult", "write_shard"]

# Every seed below starts its own portable stream (`make_generator`): the same bits on every machine.
SEED_DERIVATION = {
    "function": DERIVE_SEED_SCHEME,
    "stream": STREAM_SCHEME,
    "identity": "derive_seed(seed, 'identity', i)",
    "variation": "derive_seed(seed, 'variation', i, s)",
    "render": "derive_seed(seed, 'render', i, s)",
    "gallery": "HyperFace gallery item k: embedding (or latent z) from derive_seed(seed, 'gallery', k), "
               "diffusion noise from derive_seed(seed, 'gallery-render', k)",
    "hyperface": "initial points from derive_seed(seed, 'hyperface-init'); batches from "
                 "derive_seed(seed, 'hyperface')",
}
# Latent generators: identity i's z, Langevin's noise, Dispersion's initial offset and per-step
# noise of sample s, DisCo's covariate mix; each file's `seed` is its dispersion.init seed.
LATENT_SEED_DERIVATION = {
    "function": DERIVE_SEED_SCHEME,
    "stream": STREAM_SCHEME,
    "identity": "z_i ~ N(0, I) from derive_seed(seed, 'identity', i)",
    "langevin_noise": "derive_seed(derive_seed(seed, 'langevin'), 'noise', i, step)",
    "dispersion_init": "derive_seed(seed, 'dispersion.init', i, s)",
    "dispersion_noise": "derive_seed(seed, 'dispersion.noise', i, s, step)",
    "disco_mix": "derive_seed(seed, 'disco', i, s)",
}

class Generator(Protocol):
    embedding_dim: int

    def render(self, embeddings: torch.Tensor, seeds: Sequence[int], *, steps: int,
               guidance_scale: float) -> torch.Tensor: ...


def plan_shards(identities: int, shard_identities: int) -> list[range]:
    """Identity ranges of at most `shard_identities`, covering [0, identities) with no gap."""
    if identities < 1 or shard_identities < 1:
        raise ValueError(f"identities={identities} and shard_identities={shard_identities} must be >= 1")
    n = math.ceil(identities / shard_identities)
    return [range(k * shard_identities, min(identities, (k + 1) * shard_identities)) for k in range(n)]


# ---- identities ------------------------------------------------------------------------------

def save_identities(storage: Storage, keys: JobKeys, embeddings: torch.Tensor,
                    stats: dict[str, Any] | None = None, latents: torch.Tensor | None = None) -> None:
    """The reference embeddings [N, E] (and latents [N, D] of a latent generator), and what the
    sampler reports about them (JSON)."""
    tensors = {"embeddings": embeddings.contiguous().float().cpu()}
    if latents is not None:
        tensors["latents"] = latents.contiguous().float().cpu()
    blob = st_save(tensors, metadata={"format": "idforge.identities/1"})
    storage.put_bytes(keys.identity_stats,
                      json.dumps(stats or {}, sort_keys=True).encode(), "application/json")
    storage.put_bytes(keys.identities, blob, "application/octet-stream")


def identities_stats(storage: Storage, keys: JobKeys) -> dict[str, Any]:
    try:
        stats: dict[str, Any] = json.loads(storage.get_bytes(keys.identity_stats))
    except StorageKeyMissing:
        return {}
    return stats


def models_used(spec: JobSpec, models: Any) -> dict[str, dict[str, Any]]:
    """Each model the job used, by role, with its licence notes and weight sha256."""
    roles = [("generator", spec.models.generator), ("embedder", spec.models.embedder)]
    if spec.sampler.method == "hyperface":
        roles.append(("gallery_generator", spec.models.gallery_generator or spec.models.generator))
    return {role: models.weights(name) for role, name in roles}


def identities_checkpoint(storage: Storage, keys: JobKeys) -> dict[str, torch.Tensor] | None:
    """The sampler's latest saved state (tensors), or None when it has not saved one."""
    try:
        return st_load(storage.get_bytes(keys.identity_checkpoint))
    except StorageKeyMissing:
        return None


def checkpoint_every(storage: Storage, keys: JobKeys, *, every: int, total: int, unit: str,
                     progress: Callable[[int, int, str], None], event: Callable[..., None],
                     check: Callable[[], None]) -> Callable[[Any, Any], None]:
    """An optimiser's `on_step(stats, state)`: report progress, save `state.to_tensors()` every
    `every` steps (not at the last), then check for cancellation."""
    def on_step(stats: Any, state: Any) -> None:
        progress(stats.step, total, unit)
        if stats.step % every == 0 and stats.step < total:
            storage.put_bytes(keys.identity_checkpoint, st_save(state.to_tensors()))
            event("checkpoint", step=stats.step)
        check()
    return on_step


def load_identities(storage: Storage, keys: JobKeys) -> torch.Tensor:
    return st_load(storage.get_bytes(keys.identities))["embeddings"]  # [N, D]


def load_identity_latents(storage: Storage, keys: JobKeys) -> torch.Tensor:
    """The identities' W latents [N, D] (latent generators only)."""
    return st_load(storage.get_bytes(keys.identities))["latents"]  # [N, D]


# ---- rendering -------------------------------------------------------------------------------

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


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for b0 in range(0, len(items), size):
        yield items[b0:b0 + size]


def render_shard(spec: JobSpec, shard: int, ids: range, references: torch.Tensor,
                 generator: Generator, embedder: Embedder, storage: Storage, keys: JobKeys, *,
                 crop: Cropper | None = None, evaluator: Any = None,
                 on_progress: Callable[[int, int], None] = lambda ids_done, imgs_done: None,
                 should_stop: Callable[[], bool] = lambda: False) -> ShardResult:
    """Render identities `ids` of an embedding-conditioned generator (references [len(ids), D]).

    Sample (i, s) conditions the generator on embedding noise around reference i and renders with
    its own seed; `write_shard` crops, embeds, filters and saves the images.
    """
    if references.shape[0] != len(ids):
        raise ValueError(f"references has {references.shape[0]} rows for {len(ids)} identities")
    a = spec.images_per_identity
    config = EmbeddingNoiseConfig(scale=noise_scale(spec, references.shape[1]))
    first_block = embedding_noise(references, list(ids), a, spec.seed, config)  # [n, A, D]
    realised = mean_cosine(references, first_block)  # [n] mean cosine of samples to reference
    result = ShardResult(shard=shard, identities=list(ids), noise_scale=config.scale,
                         reference_cosine=[round(float(c), 6) for c in realised])

    def blocks(subset: list[int], first: int) -> Iterator[Batch]:
        rows = references[[i - ids.start for i in subset]]  # [m, D]
        variations = first_block if first == 0 and subset == list(ids) else \
            embedding_noise(rows, subset, a, spec.seed, config, first_sample=first)  # [m, A, D]
        items = [(k, i, first + j) for k, i in enumerate(subset) for j in range(a)]
        for batch in batched(items, spec.render.batch_size):
            emb = torch.stack([variations[k, s - first] for k, _, s in batch])  # [B, D]
            seeds = [derive_seed(spec.seed, "render", i, s) for _, i, s in batch]
            yield Batch([(i, s) for _, i, s in batch], seeds, generator.render(emb, seeds, **render_options(spec)))

    return write_shard(spec, ids, blocks, embedder, storage, keys, result, crop=crop, evaluator=evaluator,
                       references=references, on_progress=on_progress, should_stop=should_stop)


def load_shard(storage: Storage, keys: JobKeys, shard: int) -> dict[str, Any]:
    marker: dict[str, Any] = json.loads(storage.get_bytes(keys.shard_done(shard)))
    return marker
