"""Dispersion: variation-iterations/s, batched against the one-variation-at-a-time reference loop.

A variation-iteration is one variation moved by one step: one render + embed + backward to W,
plus its share of the repulsion. The batched sampler (`models.sampling.dispersion.disperse`)
flattens identities x variations into batches and runs the embedder through its fused view
(`LatentFace`); the reference loop re-renders each variation on its own with the others held
fixed, through the plain modules, as idiap/face_synthetics does when A exceeds its batch. Both
use the same random draws, so their latents are compared too.

CPU: the tiny presets (StyleGAN2 32 px, iResNet-tiny), built from their seeds. CUDA (when there):
the real StyleGAN2-256 (`CONFIG_256`) and iResNet50 with random weights; the loop runs on a
subset only (it is slow), and the rate of each is reported.

    python -m bench.dispersion [--quick] [--device cuda] [--batch 64] [--threads N]

`--quick` is a CPU smoke run (a few seconds on 2 idle cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from bench import emit, quick_summary, set_threads
from models.sampling.dispersion import DispersionConfig, disperse, initial_variations, step_noise
from models.sampling.latent_face import LatentFace

SEED = 0  # seeds the random weights, the reference latents and the dispersion draws


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_face() -> LatentFace:
    """The tiny presets built from seed 0 here (not through the registry: its sha256 pins of the
    iResNet's calibrated BatchNorm statistics hold only at the thread count they were built with)."""
    from models.embedders.iresnet import tiny_model
    from models.generators.stylegan2 import CHECKPOINT_FILE, CONFIG_TINY, StyleGAN2Generator, build_tiny

    root = build_tiny(tempfile.mkdtemp(prefix="idforge-bench-"), seed=SEED)
    generator = StyleGAN2Generator.from_checkpoint(root / CHECKPOINT_FILE, CONFIG_TINY)
    return LatentFace(generator, tiny_model(SEED).requires_grad_(False), "center")


def real_face(device: torch.device) -> LatentFace:
    """StyleGAN2-256 + iResNet50, random weights (global RNG untouched), FFHQ crop."""
    from bench.stylegan2 import build
    from models.embedders.iresnet import IResNetConfig, IResNetEmbedder
    from models.seeding import seeded_construction

    with seeded_construction(SEED):
        embedder = IResNetEmbedder(IResNetConfig.from_arch("r50"))
    embedder = embedder.to(device).eval().requires_grad_(False)
    return LatentFace(build(device), embedder, "ffhq")


def loop(face: LatentFace, w_ref: torch.Tensor, ids: list[int], variations: int,
         config: DispersionConfig) -> torch.Tensor:
    """The reference loop: every variation rendered alone with gradients, the others fixed."""
    with torch.no_grad():
        e_ref = torch.cat([face.embed(w_ref[i:i + 1]) for i in range(len(ids))])  # [n, E]
    w = initial_variations(w_ref, ids, SEED, variations, config.init_scale)  # [n, A, D]
    w_avg = face.w_avg.to(w.device, w.dtype)
    k_e, k_w, r = config.attraction, config.repulsion, config.repulsion_radius
    for t in range(config.iterations):
        noise = config.noise * step_noise(ids, SEED, variations, t, w.shape[-1]).to(w.device, w.dtype)
        new = w.clone()
        for i in range(len(ids)):
            for a in range(variations):
                wa = w[i, a:a + 1].clone().requires_grad_(True)  # [1, D]
                theta = torch.arccos(0.999999 * (face.embed(wa) * e_ref[i]).sum())
                (g,) = torch.autograd.grad(k_e / 4 * theta**2, wa)
                diff = w[i, a] - w[i]  # [A, D], row a is zero
                d = diff.norm(dim=-1)  # [A]
                c = torch.where((d > 0) & (d < r), (r - d) / d.clamp_min(1e-30), 0.0)  # [A]
                force = -g[0] + k_w * (c[:, None] * diff).sum(0) + config.latent_pull * (w_avg - w[i, a])
                new[i, a] = w[i, a] + config.dt / config.viscosity * (force + noise[i, a])
        w = new
    return w


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def compare(face: LatentFace, device: torch.device, n: int, variations: int, steps: int, batch: int,
            loop_n: int, label: str) -> list[str]:
    """Batched rate over n identities; loop rate over the first loop_n (same draws, latents compared)."""
    config = DispersionConfig(iterations=steps, batch_size=batch)
    w_ref = face.initial_latents(list(range(n))).to(device)  # [n, D]
    ids = list(range(n))
    disperse(face, w_ref[:1], ids[:1], SEED, min(variations, batch), replace(config, iterations=1))  # warm-up
    res, t_batched = timed(lambda: disperse(face, w_ref, ids, SEED, variations, config).latents, device)
    reference = LatentFace(face.generator, face.embedder, face.crop_method, fused=False)  # plain modules
    ref, t_loop = timed(lambda: loop(reference, w_ref[:loop_n], ids[:loop_n], variations, config), device)
    diff = (res[:loop_n] - ref).abs().max().item()
    rate_b = n * variations * steps / t_batched
    rate_l = loop_n * variations * steps / t_loop
    return [(f"dispersion {label} batched {batch}: {rate_b:.1f} var-it/s | per-variation loop: "
             f"{rate_l:.1f} var-it/s | ratio {rate_b / rate_l:.1f}x  ({n} identities x {variations} "
             f"variations x {steps} steps; loop on {loop_n}; max |diff| {diff:.1e})")]


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.dispersion", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny presets only, small sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="variations per pass (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    set_threads(p, args.threads)
    device = torch.device("cpu" if args.quick else args.device)
    batch = args.batch or 64
    if batch < 1:
        p.error(f"--batch: must be >= 1, got {batch}")
    cpu = torch.device("cpu")
    if args.quick:
        lines = compare(tiny_face(), cpu, n=2, variations=16, steps=2, batch=min(batch, 32), loop_n=2,
                        label="tiny cpu")
    else:
        lines = compare(tiny_face(), cpu, n=4, variations=32, steps=3, batch=batch, loop_n=4, label="tiny cpu")
    if device.type == "cuda":
        face = real_face(device)
        lines += compare(face, device, n=8, variations=64, steps=3, batch=batch, loop_n=1,
                         label="stylegan2-256+r50 cuda")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return emit(lines, where)


def run() -> str:
    """`python -m bench` entry: the quick subset, as one summary line."""
    return quick_summary(main)


if __name__ == "__main__":
    main()
