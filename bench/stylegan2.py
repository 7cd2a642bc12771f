"""StyleGAN2-256 rendering: images/s batched against one image at a time; fp32 against autocast.

The real 256 px architecture (`CONFIG_256`, rosinality's FFHQ 256 layout, 30.0M parameters) with
random weights from seed 0: the speed does not depend on the weights. Each image is
z -> mapping -> truncation 0.7 -> synthesis with constant noise, left on the device as float.
The batched and one-at-a-time variants render the same latents, interleaved batch by batch so that
load from other processes hits both alike; their images must agree up to float rounding. On CUDA,
autocast fp16 and bf16 run the same batches, reported with their largest difference from fp32,
and one line times forward + backward to W (what Langevin / DisCo steps cost).

    python -m bench.stylegan2 [--quick] [--device cuda] [--batch 64] [--images 256] [--threads N]

`--quick` is a CPU smoke run (one batch of 4 images, about 10 s on 2 idle cores).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import emit, quick_summary, set_threads
from models.generators.stylegan2 import CONFIG_256, StyleGAN2Generator
from models.seeding import make_generator, seeded_construction

SEED = 0  # seeds the random weights and the latents
PSI = 0.7  # truncation, as the identity samplers use it


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(device: torch.device) -> StyleGAN2Generator:
    """StyleGAN2-256 with random weights (global RNG untouched), latent_avg = mean of 4096 mapped z."""
    with seeded_construction(SEED), torch.no_grad():
        gen = StyleGAN2Generator(CONFIG_256)
        gen.latent_avg = gen.mapping(torch.randn(4096, gen.style_dim)).mean(0)
    return gen.to(device).eval().requires_grad_(False)


def render(gen: StyleGAN2Generator, z: torch.Tensor, batch: int) -> torch.Tensor:
    """Images [n, 3, S, S] from z [n, 512], `batch` latents per call."""
    return torch.cat([gen(z[i : i + batch], truncation_psi=PSI) for i in range(0, z.shape[0], batch)])


def timed(gen: StyleGAN2Generator, z: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """`render` and its wall time, with the device synchronised before and after."""
    _sync(gen.device)
    start = time.perf_counter()
    out = render(gen, z, batch)
    _sync(gen.device)
    return out, time.perf_counter() - start


def bench_batched_vs_single(gen: StyleGAN2Generator, z: torch.Tensor, batch: int) -> str:
    """fp32 images/s, batches of `batch` against one call per image, and their largest difference."""
    t_batched = t_single = 0.0
    max_diff = 0.0
    with torch.no_grad():
        for i in range(0, z.shape[0], batch):
            a, dt = timed(gen, z[i : i + batch], batch)
            t_batched += dt
            b, dt = timed(gen, z[i : i + batch], 1)
            t_single += dt
            max_diff = max(max_diff, (a - b).abs().max().item())
    n = z.shape[0]
    rate_b, rate_s = n / t_batched, n / t_single
    return (
        f"stylegan2-256 fp32 batched {batch}: {rate_b:.1f} img/s | one-at-a-time: {rate_s:.1f} img/s | "
        f"ratio {rate_b / rate_s:.1f}x  ({n} images, max diff {max_diff:.1e})"
    )


def bench_autocast(gen: StyleGAN2Generator, z: torch.Tensor, batch: int) -> list[str]:
    """Autocast fp16 / bf16 against fp32, same batches (CUDA only)."""
    lines = []
    with torch.no_grad():
        ref, t32 = timed(gen, z, batch)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype):
                timed(gen, z[:batch], batch)  # warm-up: kernel selection for this dtype
                out, dt = timed(gen, z, batch)
            diff = (out.float() - ref).abs()
            finite = torch.isfinite(out).all().item()
            lines.append(
                f"stylegan2-256 autocast {str(dtype).removeprefix('torch.')} batched {batch}: "
                f"{len(z) / dt:.1f} img/s vs fp32 {len(z) / t32:.1f} img/s | ratio {t32 / dt:.1f}x  "
                f"(max |diff| {diff.max().item():.3f}, mean {diff.mean().item():.4f}, all finite {finite})"
            )
    return lines


def bench_backward(gen: StyleGAN2Generator, z: torch.Tensor, batch: int) -> str:
    """fp32 forward + backward to W: images/s of one latent-optimisation step."""
    device = gen.device
    with torch.no_grad():
        w = gen.truncate(gen.mapping(z), PSI)  # [n, 512]

    _sync(device)
    start = time.perf_counter()
    for i in range(0, w.shape[0], batch):
        wb = w[i : i + batch].clone().requires_grad_()  # [b, 512]
        torch.autograd.grad(gen.synthesis(wb).square().mean(), wb)  # [b, 512]
    _sync(device)
    dt = time.perf_counter() - start
    return f"stylegan2-256 fp32 forward+backward to w, batched {batch}: {len(w) / dt:.1f} img/s"


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.stylegan2", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: batch 4, 4 images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="images per batched call (default 64 CUDA, 8 CPU)")
    p.add_argument("--images", type=int, default=None, help="images per variant (default 256 CUDA, 16 CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.quick else args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (4 if args.quick else 64 if cuda else 8)
    images = args.images or (4 if args.quick else 256 if cuda else 16)
    if batch < 1 or images < 1:
        p.error(f"--batch, --images: must be >= 1, got {batch}, {images}")
    set_threads(p, args.threads)
    gen = build(device)
    z = make_generator(SEED).normal(images, gen.style_dim).to(device)  # [n, 512]
    with torch.no_grad():
        gen(z[:1], truncation_psi=PSI)  # warm-up: first-call allocations and kernel selection
    lines = [bench_batched_vs_single(gen, z, batch)]
    if cuda:
        lines += bench_autocast(gen, z, batch)
        lines.append(bench_backward(gen, z, batch))
    where = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    return emit(lines, where)


def run() -> str:
    """`python -m bench` entry: the quick subset, as one summary line."""
    return quick_summary(main)


if __name__ == "__main__":
    main()
