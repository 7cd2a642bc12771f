"""One shard of a job, from rendered images to its stored outputs.

A shard is a range of identities. Its images come from a `Blocks` function (the generator's path:
embedding noise + diffusion, or Dispersion + StyleGAN2) that renders A = images_per_identity samples
for each of a list of identities, starting at a given sample index. Every image is cropped to
112x112, embedded by the job's FR model and encoded once.

Evaluator sample: when the job has a quality report, the independent evaluator (SFace) embeds the
images of a seeded sample of whole identities (`evaluator_identities`, `quality.evaluator_sample`;
"all": every identity), every rendered image of theirs, top-up candidates included. It runs batched on
a background thread on a GPU worker, one batch's sampled crops while the next batch renders (inline
on a CPU-only worker, where it would only compete for the same cores), and the shard collects the
results before writing. Images outside the sample have NaN rows in `features.safetensors`'s
`evaluator` tensor and a null `evaluator_centre_cosine`.

Quality filter (`quality.min_identity_similarity`): an identity's centre is the normalised mean of its
first A samples' embeddings (leaving out the sample being judged, so that first samples and later
candidates are measured alike); a sample whose cosine to it is below the threshold is dropped.
Identities short of A samples get a further block of A candidates (samples A..2A-1, then 2A..3A-1,
...) and keep, in sample order, the first that pass, for at most `quality.max_topup_rounds` rounds;
an identity still short fails the job with a reason. Every sample keeps its own (seed, identity,
sample) streams, so the kept images are reproducible like the rest.

Then the kept images go to each format the spec asks for (`workers.outputs`), and the shard's own
intermediates follow, all under deterministic keys, so a rerun writes identical objects:
  dataset/imagefolder/{identity:06d}/{sample:03d}.jpg    the kept images
  dataset/webdataset/{shard:06d}.tar                    (webdataset) .jpg + .cls + .json per image
  shards/{shard:05d}/images.rec                         (recordio) this shard's image records
  shards/{shard:05d}/features.safetensors               embeddings, centres, flags for the report
  shards/{shard:05d}/latents.safetensors                (latent generators) the kept images' W latents
  shards/{shard:05d}/done.json                          the file list; written last
A shard's encoded images stay in memory until it is written (shards are sized to minutes of GPU
time); the dataset as a whole never does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import save as st_save

from app.layout import JobKeys
from app.spec import JobSpec
from app.storage import Storage, sha256_hex
from models.alignment import template
from models.alignment.cropper import Cropper
from models.sampling.sphere import normalize
from models.seeding import REPORT_EVALUATOR, derive_seed, make_generator
from workers.errors import Canceled, QualityShortfall
from workers.outputs import ShardContext, asked_for

IMAGE_EXT = {"jpeg": "jpg", "png": "png"}
EVALUATOR_DIM = 128  # SFace's embedding size: the NaN rows of images outside the evaluator sample
EVALUATOR_SAMPLE_RULE = (
    "whole identities: with n = quality.evaluator_sample images asked for, the first max(2, ceil(n / "
    "images_per_identity)) identities (at most all) of a permutation of the identities seeded with "
    "derive_seed(seed, 'report.evaluator'); every image of theirs is embedded. 'all', or n at least "
    "the job's images: every identity.")


@lru_cache(maxsize=8)
def evaluator_identities(identities: int, per_identity: int, sample: Literal["all"] | int,
                         seed: int) -> torch.Tensor:
    """Which identities the evaluator embeds (EVALUATOR_SAMPLE_RULE): bool [N]; read only."""
    if identities < 1 or per_identity < 1:
        raise ValueError(f"identities={identities}, per_identity={per_identity}: must be >= 1")
    if sample == "all" or sample >= identities * per_identity:
        return torch.ones(identities, dtype=torch.bool)
    if sample < 2:
        raise ValueError(f"sample: expected 'all' or an int >= 2, got {sample!r}")
    k = min(identities, max(2, -(-sample // per_identity)))
    order = make_generator(derive_seed(seed, REPORT_EVALUATOR)).permutation(identities)  # [N]
    mask = torch.zeros(identities, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@dataclass
class Batch:
    """Rendered images: the (identity, sample) and seed of each, uint8 [B, H, W, 3], and the W
    latent of each for latent generators ([B, D] or None)."""

    pairs: list[tuple[int, int]]
    seeds: list[int]
    images: torch.Tensor
    latents: torch.Tensor | None = None


# Renders A samples of each identity in the list, samples first..first+A-1, batch by batch.
Blocks = Callable[[list[int], int], Iterator[Batch]]


class Embedder(Protocol):
    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...


class Evaluator(Protocol):
    def embed(self, aligned: torch.Tensor) -> torch.Tensor: ...


class _Background:
    """The evaluator on one background thread: `submit` queues a batch's sampled crops and returns
    at once (onnxruntime releases the GIL while it runs); `collect` waits for every result.

    Only when the models run on an accelerator (`threaded`): then the renderer leaves the CPU, or the
    evaluator's CUDA stream, idle while it renders. On a CPU-only worker the renderer already keeps
    every core busy, and a second pool of threads on them only slows both (measured on 2 cores, 320
    sampled images: +6.7 s inline, +7.8 to +11.7 s on a thread), so there it runs inline."""

    def __init__(self, evaluator: Evaluator, threaded: bool) -> None:
        self.evaluator = evaluator
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idforge-evaluator") if threaded else None
        self._pending: list[tuple[list[tuple[int, int]], Future[torch.Tensor]]] = []

    def submit(self, pairs: list[tuple[int, int]], crops: torch.Tensor) -> None:
        if not pairs:
            return
        if self._pool is not None:
            self._pending.append((pairs, self._pool.submit(self.evaluator.embed, crops)))
        else:
            done: Future[torch.Tensor] = Future()
            done.set_result(self.evaluator.embed(crops))
            self._pending.append((pairs, done))

    def collect(self) -> dict[tuple[int, int], torch.Tensor]:
        """(identity, sample) -> float32 [128] of every crop submitted so far."""
        out: dict[tuple[int, int], torch.Tensor] = {}
        for pairs, future in self._pending:
            embedded = future.result().float().cpu()  # [b, 128]
            out.update(zip(pairs, embedded))
        self._pending = []
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class ShardResult:
    shard: int
    identities: list[int]
    files: list[dict[str, Any]] = field(default_factory=list)  # the kept images, by (identity, sample)
    filtered: list[dict[str, Any]] = field(default_factory=list)  # below the quality filter's threshold
    seconds: float = 0.0
    noise_scale: float = 0.0  # the embedding-noise sigma used
    # Per identity: realised mean cosine of its sample embeddings to its reference.
    reference_cosine: list[float] = field(default_factory=list)
    # Per identity, cone variations only: the largest angle (degrees) of its conditioning embeddings
    # to its reference.
    reference_angle_max: list[float] = field(default_factory=list)
    alignment: str = "center"  # how images were cropped: center, ffhq or landmarks
    alignment_failures: int = 0  # kept images where no face was found (centre crops, flagged)
    rendered: int = 0  # images rendered, top-up candidates included
    topped_up: int = 0  # kept images from top-up rounds (candidates past the ones needed go unused)
    rounds: int = 1  # rendering rounds (1 = no top-up)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard-level objects: size, sha256

    def to_json(self) -> bytes:
        return json.dumps({"shard": self.shard, "identities": self.identities,
                           "files": self.files, "filtered": self.filtered,
                           "seconds": round(self.seconds, 3), "noise_scale": self.noise_scale,
                           "reference_cosine": self.reference_cosine, "alignment": self.alignment,
                           **({"reference_angle_max": self.reference_angle_max} if self.reference_angle_max else {}),
                           "alignment_failures": self.alignment_failures, "rendered": self.rendered,
                           "topped_up": self.topped_up, "rounds": self.rounds,
                           "outputs": self.outputs}, sort_keys=True).encode()


@dataclass
class _Sample:
    seed: int
    data: bytes  # the encoded 112x112 crop
    aligned: bool
    feature: torch.Tensor  # [E] job embedder
    evaluation: torch.Tensor | None  # [128] evaluator
    latent: torch.Tensor | None  # [D] W latent


def write_shard(spec: JobSpec, ids: range, blocks: Blocks, embedder: Embedder, storage: Storage,
                keys: JobKeys, result: ShardResult, *, crop: Cropper | None = None,
                evaluator: Evaluator | None = None, references: torch.Tensor | None = None,
                on_progress: Callable[[int, int], None] = lambda ids_done, imgs_done: None,
                should_stop: Callable[[], bool] = lambda: False) -> ShardResult:
    """Render, filter and top up identities `ids`, then write the shard's outputs (module docstring).

    references [n, E]: the identities' reference embeddings in the job embedder's space, when they
    live there; each image's cosine to its reference is then recorded (else None).
    """
    crop = crop or Cropper("center")
    t0 = time.perf_counter()
    a, q = spec.images_per_identity, spec.quality
    result.alignment = crop.alignment
    samples: dict[tuple[int, int], _Sample] = {}
    background = None
    if evaluator is not None:
        threaded = str(getattr(evaluator, "device", "cpu")) != "cpu" or torch.cuda.is_available()
        background = _Background(evaluator, threaded)
    sampled = (evaluator_identities(spec.identities, a, q.evaluator_sample, spec.seed)
               if evaluator is not None else None)  # bool [N]
    try:
        return _write_shard(spec, ids, blocks, embedder, storage, keys, result, crop, background, sampled,
                            references, on_progress, should_stop, t0, samples)
    finally:
        if background is not None:
            background.close()


def _write_shard(spec: JobSpec, ids: range, blocks: Blocks, embedder: Embedder, storage: Storage,
                 keys: JobKeys, result: ShardResult, crop: Cropper, background: _Background | None,
                 sampled: torch.Tensor | None, references: torch.Tensor | None,
                 on_progress: Callable[[int, int], None], should_stop: Callable[[], bool], t0: float,
                 samples: dict[tuple[int, int], _Sample]) -> ShardResult:
    a, q = spec.images_per_identity, spec.quality

    def render(subset: list[int], first: int) -> None:
        pending = blocks(subset, first)
        while True:
            if should_stop():  # before rendering the next batch
                raise Canceled()
            batch = next(pending, None)
            if batch is None:
                return
            cropped = crop(batch.images)
            if background is not None and sampled is not None:  # first, so it runs while we embed
                rows = [j for j, (i, _) in enumerate(batch.pairs) if sampled[i]]
                background.submit([batch.pairs[j] for j in rows], cropped.crops[rows].cpu())
            feats = embedder.embed_images(cropped.crops).float().cpu()  # [B, E]
            for j, (i, s) in enumerate(batch.pairs):
                samples[(i, s)] = _Sample(
                    seed=batch.seeds[j], aligned=bool(cropped.ok[j]), feature=feats[j], evaluation=None,
                    latent=batch.latents[j].float().cpu() if batch.latents is not None else None,
                    data=template.encode_image(cropped.crops[j], spec.output.image_format,
                                            quality=spec.output.jpeg_quality))
            result.rendered += len(batch.pairs)
            on_progress(min(result.rendered, len(ids) * a) // a, min(result.rendered, len(ids) * a))

    render(list(ids), 0)
    kept = {i: list(range(a)) for i in ids}
    if q.min_identity_similarity is not None:
        kept = _filter_and_top_up(spec, ids, samples, render, result)
    if background is not None:
        for p, e in background.collect().items():
            samples[p].evaluation = e
    _write_outputs(spec, ids, kept, samples, storage, keys, result, references, background is not None)
    result.seconds = time.perf_counter() - t0
    storage.put_bytes(keys.shard_done(result.shard), result.to_json(), "application/json")
    on_progress(len(ids), len(ids) * a)
    return result


def _filter_and_top_up(spec: JobSpec, ids: range, samples: dict[tuple[int, int], _Sample],
                       render: Callable[[list[int], int], None], result: ShardResult) -> dict[int, list[int]]:
    """The samples each identity keeps under `quality.min_identity_similarity`, topping up short
    identities with further blocks of A candidates (module docstring); QualityShortfall when rounds
    run out. Records the filtered samples, the rounds and the top-ups in `result`."""
    a, q = spec.images_per_identity, spec.quality
    threshold = q.min_identity_similarity
    assert threshold is not None
    sums = torch.stack([torch.stack([samples[(i, s)].feature for s in range(a)]).sum(dim=0)
                        for i in ids])  # [n, E]

    def similarity(i: int, s: int) -> float:
        """Cosine to the centre of the identity's first A samples, leaving the sample itself out
        of the centre, so first samples and top-up candidates are measured alike."""
        x = samples[(i, s)].feature
        centre = sums[i - ids.start] - x if s < a and a > 1 else sums[i - ids.start]
        return float(x @ normalize(centre[None])[0])

    kept = {i: [s for s in range(a) if similarity(i, s) >= threshold] for i in ids}
    for r in range(1, q.max_topup_rounds + 1):
        short = [i for i in ids if len(kept[i]) < a]
        if not short:
            break
        result.rounds = r + 1
        render(short, r * a)
        for i in short:
            extra = [s for s in range(r * a, (r + 1) * a) if similarity(i, s) >= threshold][:a - len(kept[i])]
            kept[i] += extra
            result.topped_up += len(extra)
    short = [i for i in ids if len(kept[i]) < a]
    if short:
        raise QualityShortfall(
            f"quality.min_identity_similarity {threshold}: identity {short[0]} has {len(kept[short[0]])} "
            f"of {a} images at or above it after {q.max_topup_rounds} top-up rounds ({len(short)} "
            f"identities short in shard {result.shard}); lower the threshold or raise "
            "quality.max_topup_rounds")
    for (i, s), smp in sorted(samples.items()):
        cos = similarity(i, s)
        if cos < threshold:
            result.filtered.append({"identity": i, "sample": s, "seed": smp.seed, "shard": result.shard,
                                    "aligned": smp.aligned, "centre_cosine": round(cos, 6)})
    return kept


def _write_outputs(spec: JobSpec, ids: range, kept: dict[int, list[int]],
                   samples: dict[tuple[int, int], _Sample], storage: Storage, keys: JobKeys,
                   result: ShardResult, references: torch.Tensor | None, evaluated: bool) -> None:
    """The kept images in every format asked for (`workers.outputs`), their features and latents,
    and the file list. evaluated: the job has an evaluator (images outside its sample get NaN rows)."""
    fmt = spec.output.image_format
    ext = IMAGE_EXT[fmt]
    order = [(i, s) for i in ids for s in kept[i]]  # [n * A] in (identity, sample) order
    n, a = len(ids), spec.images_per_identity
    job = torch.stack([samples[p].feature for p in order]).view(n, a, -1)  # [n, A, E]
    centres = normalize(job.mean(dim=1))  # [n, E]
    centre_cos = torch.einsum("nae,ne->na", job, centres)  # [n, A]
    ref_cos = None
    if references is not None and references.shape[1] == job.shape[2]:
        ref_cos = torch.einsum("nae,ne->na", job, normalize(references.float()))  # [n, A]
    evals = None
    if evaluated:
        dim = next((e.shape[0] for p in order if (e := samples[p].evaluation) is not None), EVALUATOR_DIM)
        missing = torch.full((dim,), float("nan"))
        evals = torch.stack([e if (e := samples[p].evaluation) is not None else missing
                             for p in order]).view(n, a, -1)  # [n, A, 128]; NaN rows outside the sample
        eval_cos = torch.einsum("nae,ne->na", evals, normalize(evals.mean(dim=1)))  # [n, A]; NaN outside
    aligned = torch.tensor([samples[p].aligned for p in order]).view(n, a)  # [n, A]
    result.alignment_failures = int((~aligned).sum())

    records = []  # what the shard knows of each kept image; the image folder adds its path
    for k, (i, s) in enumerate(order):
        smp, row, col = samples[(i, s)], k // a, k % a
        records.append({
            "identity": i, "sample": s, "seed": smp.seed, "shard": result.shard,
            "size": len(smp.data), "sha256": sha256_hex(smp.data), "aligned": smp.aligned,
            "centre_cosine": round(float(centre_cos[row, col]), 6),
            "reference_cosine": round(float(ref_cos[row, col]), 6) if ref_cos is not None else None,
            "evaluator_centre_cosine": round(float(eval_cos[row, col]), 6)
            if evals is not None and bool(eval_cos[row, col].isfinite()) else None})
    ctx = ShardContext(spec=spec, storage=storage, keys=keys, shard=result.shard, ids=ids, kept=kept, ext=ext,
                       data={p: samples[p].data for p in order}, records=records, files=result.files,
                       objects=result.outputs)
    for output in asked_for(spec):
        output.write_shard(ctx)

    tensors = {"job": job.contiguous(), "centres": centres.contiguous(), "aligned": aligned.to(torch.uint8),
               "identities": torch.tensor(list(ids), dtype=torch.int64),
               "samples": torch.tensor([s for _, s in order], dtype=torch.int64).view(n, a)}
    if evals is not None:
        tensors["evaluator"] = evals.contiguous()
    storage.put_bytes(keys.shard_features(result.shard), st_save(tensors))
    if samples[order[0]].latent is not None:
        latents = torch.stack([samples[p].latent for p in order]).view(n, a, -1)  # type: ignore[misc]
        storage.put_bytes(keys.shard_latents(result.shard),
                          st_save({"latents": latents.contiguous(), "samples": tensors["samples"]}))
