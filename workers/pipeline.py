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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app import __version__
from app.errors import StorageKeyMissing
from app.spec import EmbeddingNoise, JobSpec
from app.storage import JobKeys, Storage, sha256_hex
from models import align
from models.cropping import Cropper
from models.sampling.sphere import normalize
from models.sampling.variations import (
    EmbeddingNoiseConfig,
    embedding_noise,
    mean_cosine,
    scale_for_mean_cosine,
)
from models.seeding import DERIVE_SEED_SCHEME, derive_seed

SEED_DERIVATION = {
    "function": DERIVE_SEED_SCHEME,
    "identity": "derive_seed(seed, 'identity', i)",
    "variation": "derive_seed(seed, 'variation', i, s)",
    "render": "derive_seed(seed, 'render', i, s)",
}
# Latent generators: identity i's z, Langevin's noise, Dispersion's initial offset and per-step
# noise of sample s, DisCo's covariate mix; each file's `seed` is its dispersion.init seed.
LATENT_SEED_DERIVATION = {
    "function": DERIVE_SEED_SCHEME,
    "identity": "z_i ~ N(0, I) from derive_seed(seed, 'identity', i)",
    "langevin_noise": "derive_seed(derive_seed(seed, 'langevin'), 'noise', i, step)",
    "dispersion_init": "derive_seed(seed, 'dispersion.init', i, s)",
    "dispersion_noise": "derive_seed(seed, 'dispersion.noise', i, s, step)",
    "disco_mix": "derive_seed(seed, 'disco', i, s)",
}
IMAGE_EXT = {"jpeg": "jpg", "png": "png"}
CONTENT_TYPE = {"jpeg": "image/jpeg", "png": "image/png"}


class Canceled(Exception):
    """The job was canceled; raised between batches."""


class Generator(Protocol):
    embedding_dim: int

    def render(self, embeddings: torch.Tensor, seeds: Sequence[int], *, steps: int,
               guidance_scale: float) -> torch.Tensor: ...


class Embedder(Protocol):
    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...


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
    storage.put_bytes(keys.key("identities/stats.json"),
                      json.dumps(stats or {}, sort_keys=True).encode(), "application/json")
    storage.put_bytes(keys.identities, blob, "application/octet-stream")


def identities_stats(storage: Storage, keys: JobKeys) -> dict[str, Any]:
    try:
        stats: dict[str, Any] = json.loads(storage.get_bytes(keys.key("identities/stats.json")))
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
        return st_load(storage.get_bytes(keys.key("identities/checkpoint.safetensors")))
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
            storage.put_bytes(keys.key("identities/checkpoint.safetensors"), st_save(state.to_tensors()))
            event("checkpoint", step=stats.step)
        check()
    return on_step


def load_identities(storage: Storage, keys: JobKeys) -> torch.Tensor:
    return st_load(storage.get_bytes(keys.identities))["embeddings"]  # [N, D]


def load_identity_latents(storage: Storage, keys: JobKeys) -> torch.Tensor:
    """The identities' W latents [N, D] (latent generators only)."""
    return st_load(storage.get_bytes(keys.identities))["latents"]  # [N, D]


# ---- rendering -------------------------------------------------------------------------------

@dataclass
class ShardResult:
    shard: int
    identities: list[int]
    files: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    noise_scale: float = 0.0  # the embedding-noise sigma used
    # Per identity: realised mean cosine of its sample embeddings to its reference.
    reference_cosine: list[float] = field(default_factory=list)
    alignment: str = "center"  # how images were cropped: center, ffhq or landmarks
    alignment_failures: int = 0  # images where no face was found (kept as centre crops, flagged)

    def to_json(self) -> bytes:
        return json.dumps({"shard": self.shard, "identities": self.identities,
                           "files": self.files, "seconds": round(self.seconds, 3),
                           "noise_scale": self.noise_scale,
                           "reference_cosine": self.reference_cosine,
                           "alignment": self.alignment,
                           "alignment_failures": self.alignment_failures}, sort_keys=True).encode()


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


# One batch of a shard's images: the (identity, sample) of each, its seed, and uint8 [B, H, W, 3].
ImageBatch = tuple[list[tuple[int, int]], list[int], torch.Tensor]


def render_shard(spec: JobSpec, shard: int, ids: range, references: torch.Tensor,
                 generator: Generator, embedder: Embedder, storage: Storage, keys: JobKeys, *,
                 crop: Cropper | None = None,
                 on_progress: Callable[[int, int], None] = lambda ids_done, imgs_done: None,
                 should_stop: Callable[[], bool] = lambda: False) -> ShardResult:
    """Render identities `ids` of an embedding-conditioned generator (references [len(ids), D]).

    Sample (i, s) conditions the generator on embedding noise around reference i and renders with
    its own seed; `write_shard` saves and embeds the images.
    """
    if references.shape[0] != len(ids):
        raise ValueError(f"references has {references.shape[0]} rows for {len(ids)} identities")
    a = spec.images_per_identity
    scale = noise_scale(spec, references.shape[1])
    variations = embedding_noise(references, list(ids), a, spec.seed,
                                 EmbeddingNoiseConfig(scale=scale))  # [n, A, D]
    realised = mean_cosine(references, variations)  # [n] mean cosine of samples to reference
    result = ShardResult(shard=shard, identities=list(ids), noise_scale=scale,
                         reference_cosine=[round(float(c), 6) for c in realised])

    def batches() -> Iterator[ImageBatch]:
        items = [(k, i, s) for k, i in enumerate(ids) for s in range(a)]
        for b0 in range(0, len(items), spec.render.batch_size):
            batch = items[b0:b0 + spec.render.batch_size]
            emb = torch.stack([variations[k, s] for k, _, s in batch])  # [B, D]
            seeds = [derive_seed(spec.seed, "render", i, s) for _, i, s in batch]
            yield [(i, s) for _, i, s in batch], seeds, generator.render(emb, seeds, **render_options(spec))

    return write_shard(spec, ids, batches(), embedder, storage, keys, result, crop=crop,
                       on_progress=on_progress, should_stop=should_stop)


def write_shard(spec: JobSpec, ids: range, batches: Iterable[ImageBatch], embedder: Embedder,
                storage: Storage, keys: JobKeys, result: ShardResult, *, crop: Cropper | None = None,
                on_progress: Callable[[int, int], None] = lambda ids_done, imgs_done: None,
                should_stop: Callable[[], bool] = lambda: False) -> ShardResult:
    """Crop, save and embed a shard's images batch by batch, then its centres and done marker.

    Writes every image under deterministic keys and fills `result.files` with each image's seed,
    sha256 and cosine to its identity centre in the job embedder's space. `crop` maps images to
    the 112x112 crops that are saved and embedded (default: centre crop); images it could not
    align are flagged `aligned: false` and counted. Checks `should_stop` before every batch.
    """
    crop = crop or Cropper("center")
    t0 = time.perf_counter()
    a = spec.images_per_identity
    ext, fmt = IMAGE_EXT[spec.output.image_format], spec.output.image_format
    result.alignment = crop.alignment
    feats: torch.Tensor | None = None  # [n, A, E] embedder features of every image
    done_imgs = 0
    iterator = iter(batches)
    while True:
        if should_stop():
            raise Canceled()
        batch = next(iterator, None)
        if batch is None:
            break
        pairs, seeds, images = batch
        cropped = crop(images)
        aligned = cropped.crops  # [B, 112, 112, 3]
        result.alignment_failures += cropped.failures
        f = embedder.embed_images(aligned).float().cpu()  # [B, E]
        if feats is None:
            feats = torch.zeros(len(ids), a, f.shape[1])
        for j, (i, s) in enumerate(pairs):
            feats[i - ids.start, s] = f[j]
            data = align.encode_image(aligned[j], fmt, quality=spec.output.jpeg_quality)
            key = keys.image(i, s, ext)
            storage.put_bytes(key, data, CONTENT_TYPE[fmt])
            result.files.append({"path": keys.relative(key), "identity": i, "sample": s,
                                 "seed": seeds[j], "size": len(data), "sha256": sha256_hex(data),
                                 "aligned": bool(cropped.ok[j])})
        done_imgs += len(pairs)
        on_progress(done_imgs // a, done_imgs)
    if feats is None or done_imgs != len(ids) * a:
        raise ValueError(f"shard {result.shard}: {done_imgs} images written for {len(ids)} x {a}")
    centres = normalize(feats.mean(dim=1))  # [n, E]
    cos = torch.einsum("nae,ne->na", feats, centres)  # [n, A]
    for rec in result.files:
        k = rec["identity"] - ids.start
        rec["centre_cosine"] = round(float(cos[k, rec["sample"]]), 6)
    result.seconds = time.perf_counter() - t0
    storage.put_bytes(keys.key(f"shards/{result.shard:05d}/centres.safetensors"),
                      st_save({"centres": centres.contiguous()}))
    storage.put_bytes(keys.shard_done(result.shard), result.to_json(), "application/json")
    return result


def load_shard(storage: Storage, keys: JobKeys, shard: int) -> dict[str, Any]:
    marker: dict[str, Any] = json.loads(storage.get_bytes(keys.shard_done(shard)))
    return marker


# ---- evaluating and packaging ----------------------------------------------------------------

def quality_summary(storage: Storage, keys: JobKeys, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Intra-class consistency and separation of identity centres in the job embedder's space."""
    centres = torch.cat([
        st_load(storage.get_bytes(keys.key(f"shards/{s['shard']:05d}/centres.safetensors")))["centres"]
        for s in shards
    ])  # [N, E]
    genuine = torch.tensor([f["centre_cosine"] for s in shards for f in s["files"]])
    ref_cos = torch.tensor([c for s in shards for c in s.get("reference_cosine", [])])
    nearest = _nearest_other_cosine(centres)  # [N]
    failures = sum(int(s.get("alignment_failures", 0)) for s in shards)
    return {
        "embedder_space": "job embedder",
        "images": int(genuine.numel()),
        # How images were cropped to 112x112, and how many had no detectable face (kept as centre
        # crops and flagged `aligned: false` in the file list).
        "alignment": {"method": shards[0].get("alignment", "center") if shards else None,
                      "failures": failures,
                      "failure_rate": _r(torch.tensor(failures / max(1, genuine.numel())))},
        # Conditioning: realised mean cosine of each identity's sample embeddings to its reference.
        "variation_reference_cosine": {"mean": _r(ref_cos.mean()), "min": _r(ref_cos.min()),
                                       "noise_scale": shards[0].get("noise_scale")}
        if ref_cos.numel() else None,
        "genuine_centre_cosine": {"mean": _r(genuine.mean()), "min": _r(genuine.min())},
        "nearest_centre_cosine": {"mean": _r(nearest.mean()), "max": _r(nearest.max())}
        if nearest.numel() else None,
    }


def _nearest_other_cosine(centres: torch.Tensor, tile: int = 4096) -> torch.Tensor:
    """For each row, the largest cosine to any other row, tiled: never an N x N matrix."""
    n = centres.shape[0]
    if n < 2:
        return torch.empty(0)
    best = torch.full((n,), -2.0)
    for r0 in range(0, n, tile):
        rows = centres[r0:r0 + tile]  # [T, E]
        for c0 in range(0, n, tile):
            sims = rows @ centres[c0:c0 + tile].T  # [T, T']
            if r0 == c0:
                sims.fill_diagonal_(-2.0)
            best[r0:r0 + tile] = torch.maximum(best[r0:r0 + tile], sims.max(dim=1).values)
    return best


def _r(x: torch.Tensor) -> float:
    return round(float(x), 6)


def build_manifest(*, job_id: str, spec: JobSpec, shards: list[dict[str, Any]],
                   models: dict[str, dict[str, Any]], quality: dict[str, Any],
                   sampling: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    files = sorted((f for s in shards for f in s["files"]),
                   key=lambda f: (f["identity"], f["sample"]))
    return {
        "format": "idforge.manifest/1",
        "job_id": job_id,
        "code_version": __version__,
        "spec": spec.normalized(),
        "spec_hash": spec.spec_hash(),
        "seed": spec.seed,
        "seed_derivation": LATENT_SEED_DERIVATION if spec.variations.method in ("dispersion", "disco")
        else SEED_DERIVATION,
        "models": models,
        "licenses": sorted({m["license"] for m in models.values() if m.get("license")}),
        "counts": {
            "identities": spec.identities,
            "images_per_identity": spec.images_per_identity,
            "images_requested": spec.identities * spec.images_per_identity,
            "images": len(files),
            "shards": len(shards),
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "quality": quality,
        "sampling": sampling,
        "layout": {"imagefolder": "dataset/imagefolder/{identity:06d}/{sample:03d}."
                   + IMAGE_EXT[spec.output.image_format],
                   "identities": "identities/embeddings.safetensors"},
        "files": files,
    }


def write_manifest(storage: Storage, keys: JobKeys, manifest: dict[str, Any]) -> None:
    """Written last: the dataset exists iff the manifest exists."""
    storage.put_bytes(keys.manifest, json.dumps(manifest, indent=1, sort_keys=True).encode(),
                      "application/json")
