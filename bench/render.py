"""Arc2Face rendering: batched images/s against the one-image-at-a-time reference loop.

Both render the same 32 (embedding, seed) pairs with the tiny preset at the job defaults
(25 DPM-Solver++ steps, guidance 3.0); the images must agree up to float rounding.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from models import registry
from models.generators.arc2face import Arc2FaceGenerator
from models.sampling.random import sample_identities
from models.seeding import derive_seed

GENERATOR = "arc2face-tiny"  # registry name of the model under test
IMAGES = 32  # images rendered by each variant
BATCH = 16  # images per batched render call
STEPS = 25  # solver steps, the job default
GUIDANCE = 3.0  # classifier-free guidance scale, the job default
JOB_SEED = 0  # seeds the identities and the per-image seeds


def render_one_at_a_time(gen: Arc2FaceGenerator, emb: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """The reference loop: one render call per image."""
    images = [
        gen.render(emb[i : i + 1], [s], steps=STEPS, guidance_scale=GUIDANCE) for i, s in enumerate(seeds)
    ]
    return torch.cat(images)  # [n, H, W, 3]


def run(model_dir: Path | None = None) -> str:
    """Run the benchmark and return its one-line summary."""
    with tempfile.TemporaryDirectory() as scratch:
        root = model_dir or Path(scratch)
        registry.ensure_model(GENERATOR, root)
        gen = registry.load_generator(GENERATOR, root)
    emb = sample_identities(JOB_SEED, 0, IMAGES)  # [IMAGES, 512]
    seeds = [derive_seed(JOB_SEED, "sample", i, 0) for i in range(IMAGES)]
    gen.render(emb[:2], seeds[:2], steps=2)  # warm-up: first-call allocations and kernel selection
    # Interleave the variants batch by batch so that load from other processes hits both alike.
    batched, single, t_batched, t_single = [], [], 0.0, 0.0
    for i in range(0, IMAGES, BATCH):
        e, s = emb[i : i + BATCH], seeds[i : i + BATCH]
        start = time.perf_counter()
        batched.append(gen.render(e, s, steps=STEPS, guidance_scale=GUIDANCE))
        t_batched += time.perf_counter() - start
        start = time.perf_counter()
        single.append(render_one_at_a_time(gen, e, s))
        t_single += time.perf_counter() - start
    max_diff = (torch.cat(batched).int() - torch.cat(single).int()).abs().max().item()
    rate_b, rate_s = IMAGES / t_batched, IMAGES / t_single
    return (
        f"render batched {BATCH}: {rate_b:.1f} img/s | one-at-a-time: {rate_s:.1f} img/s | "
        f"ratio {rate_b / rate_s:.1f}x  ({GENERATOR}, {IMAGES} images, {STEPS} steps, "
        f"{gen.image_size} px, {torch.get_num_threads()} threads, max pixel diff {max_diff}, "
        f"load avg {os.getloadavg()[0]:.1f})"
    )
