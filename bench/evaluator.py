"""The quality report's independent evaluator (SFace): its cost, and what it adds to a job.

1. SFace alone: the original path (OpenCV's FaceRecognizerSF, one image at a time) against the batched
   one (onnxruntime, 64 crops a run), images/s on the same crops, interleaved batch by batch so load
   from other processes hits both alike; and the largest difference between their unit embeddings.
2. A job on the tiny latent path (`stylegan2-tiny` + `iresnet-tiny`, random identities, Dispersion,
   16 images an identity, ImageFolder) without the report and with it (the default evaluator sample),
   in-process through `workers.local.generate`, at two sizes, and the ratio. The models are loaded
   once beforehand (a worker holds them for its life); each job is timed end to end.

`python -m bench.evaluator [--sizes 1600 16000] [--threads N]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from app.settings import Settings
from app.spec import JobSpec
from workers.local import generate
from workers.runtime import ModelCache, model_registry, pick_device, quiet_libraries

IMAGES_PER_IDENTITY = 16  # images of each identity in the benchmark jobs
CROPS = 256  # crops embedded by each SFace path
BATCH = 64  # crops per batched run (and per interleaving step)
SIZES = (1_600, 3_200)  # job sizes, images (16,000 takes about 35 min a pair on a loaded 2-core machine)
SEED = 7  # job seed


def job_spec(images: int, report: bool) -> JobSpec:
    return JobSpec.model_validate({
        "identities": images // IMAGES_PER_IDENTITY, "images_per_identity": IMAGES_PER_IDENTITY, "seed": SEED,
        "models": {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"},
        "output": {"formats": ["imagefolder"]}, "quality": {"report": report}})


def sface(models: ModelCache) -> str:
    """Per-image (OpenCV) vs batched (onnxruntime) SFace, images/s, and the largest embedding difference."""
    ev = models.evaluator()
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (CROPS, 112, 112, 3), dtype=np.uint8))
    ev.embed(crops[:BATCH])  # warm-up of both paths
    ev.embed_per_image(crops[:4])
    t_single = t_batched = 0.0
    diff = 0.0
    for b0 in range(0, CROPS, BATCH):
        chunk = crops[b0:b0 + BATCH]
        start = time.perf_counter()
        single = ev.embed_per_image(chunk)
        t_single += time.perf_counter() - start
        start = time.perf_counter()
        batched = ev.embed(chunk)
        t_batched += time.perf_counter() - start
        diff = max(diff, float((single - batched).abs().max()))
    rate_s, rate_b = CROPS / t_single, CROPS / t_batched
    return (f"sface per-image (OpenCV): {rate_s:.1f} img/s | batched (onnxruntime {ev.providers[0]}, "
            f"{BATCH}/run): {rate_b:.1f} img/s | ratio {rate_b / rate_s:.2f}x | max |diff| {diff:.1e} "
            f"({CROPS} crops)")


def job(images: int, models: ModelCache, settings: Settings) -> tuple[str, float]:
    """The same job without and with the report: one line, and the ratio."""
    seconds: dict[bool, float] = {}
    manifest: dict[bool, dict[str, Any]] = {}
    for report in (False, True):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            manifest[report] = generate(job_spec(images, report), Path(out), settings=settings, models=models)
            seconds[report] = time.perf_counter() - start
    ratio = seconds[True] / seconds[False]
    quality = manifest[True]["quality"]["models"]["evaluator"]
    t = manifest[True]["timings_s"]
    return (f"job {images} images: without report {seconds[False]:.1f} s ({images / seconds[False]:.0f} img/s) | "
            f"with report {seconds[True]:.1f} s (rendering {t['rendering_shards_sum']:.1f} s, evaluating "
            f"{t['evaluating']:.1f} s; evaluator sample {quality['sample']['images']} images) | "
            f"ratio {ratio:.2f}x (target <= 1.25x)", ratio)


def run(sizes: tuple[int, ...] = SIZES) -> list[str]:
    quiet_libraries()
    settings = Settings()
    models = ModelCache(model_registry(settings), pick_device(settings.device))
    with tempfile.TemporaryDirectory() as out:  # load every model once, as a worker would
        generate(job_spec(2 * IMAGES_PER_IDENTITY, True), Path(out), settings=settings, models=models)
    lines = [sface(models)]
    print(lines[-1], flush=True)
    for images in sizes:
        lines.append(job(images, models, settings)[0])
        print(lines[-1], flush=True)
    lines.append(f"[{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
                 f"load avg {os.getloadavg()[0]:.1f}]")
    print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluator", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="job sizes, images")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(tuple(args.sizes))


if __name__ == "__main__":
    main()
