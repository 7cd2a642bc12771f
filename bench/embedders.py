"""iResNet-100 embeddings/s: batched `embed_images` against a one-image-at-a-time loop, by precision.

The published r100 layout (65M parameters, 112 px, 512-d) with random weights from a fixed seed.
Each precision runs our `embed_images` (uint8 crops in, unit-norm float32 out, batch 256) and the
plain loop that calls the model on one image at a time, interleaved in the same run so that load
from other processes hits both alike. On CUDA the precisions are float32, bf16 and fp16 autocast,
and a bf16 trunk (`set_precision`, what `from_checkpoint(dtype=...)` gives); on the CPU float32
only (CPU half-precision convolutions are slower than float32). `--quick` is a CPU smoke run:
batch 4, 2 iterations, well under a minute.

    python -m bench.embedders [--quick] [--device cuda] [--batch 256] [--iters 5] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from bench import quick_summary, set_threads
from models.embedders.iresnet import IResNetConfig, IResNetEmbedder
from models.seeding import make_generator, seeded_construction

ARCH = "r100"  # the published iResNet under test
BATCH = 256  # images per embed_images call (and per iteration of the loop)
ITERS = 5  # timed iterations per variant
QUICK_BATCH = 4  # --quick: images per iteration
QUICK_ITERS = 2  # --quick: timed iterations
SEED = 0  # seeds the random weights and images


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """torch.autocast on `device` to `dtype`; nothing when dtype is None."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def one_at_a_time(model: IResNetEmbedder, images: torch.Tensor) -> torch.Tensor:
    """The reference: the model called on one image at a time, same preprocessing as embed_images."""
    device = model.conv1.weight.device
    out = []
    with torch.no_grad():
        for image in images:
            x = image.to(device).permute(2, 0, 1)[None].float() / 127.5 - 1  # [1, 3, S, S]
            out.append(model(x).float().cpu())  # [1, D]
    return torch.cat(out)  # [n, D]


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


@dataclass(frozen=True)
class Rates:
    batched: float  # embed_images, images per second
    single: float  # the one-image-at-a-time loop, images per second
    max_diff: float  # largest |batched - loop| over the embeddings' entries
    embeddings: torch.Tensor  # [n, D] from embed_images, to compare precisions


def measure(model: IResNetEmbedder, images: torch.Tensor, batch: int, iters: int, amp: torch.dtype | None) -> Rates:
    """Batched and one-at-a-time embeddings/s of `model` under autocast `amp`, interleaved."""
    device = model.conv1.weight.device
    with autocast(device, amp):
        model.embed_images(images[: min(batch, 8)], batch_size=batch)  # warm-up: kernel selection
        one_at_a_time(model, images[:2])
        t_batched = t_single = 0.0
        for _ in range(iters):
            batched, dt = timed(lambda: model.embed_images(images, batch_size=batch), device)
            t_batched += dt
            single, dt = timed(lambda: one_at_a_time(model, images), device)
            t_single += dt
    n = iters * images.shape[0]
    return Rates(n / t_batched, n / t_single, (batched - single).abs().max().item(), batched)


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.embedders", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: small batch, few iterations")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; cpu with --quick)")
    p.add_argument("--batch", type=int, default=None, help=f"images per iteration (default {BATCH})")
    p.add_argument("--iters", type=int, default=None, help=f"timed iterations (default {ITERS})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    set_threads(p, args.threads)
    default_device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    device = torch.device(args.device or default_device)
    batch = args.batch or (QUICK_BATCH if args.quick else BATCH)
    iters = args.iters or (QUICK_ITERS if args.quick else ITERS)
    if batch < 1 or iters < 1:
        p.error(f"--batch, --iters: must be >= 1, got {batch}, {iters}")

    config = IResNetConfig.from_arch(ARCH)
    with seeded_construction(SEED):
        model = IResNetEmbedder(config)
    model = model.to(device).eval().requires_grad_(False)
    s = config.input_size
    images = make_generator(SEED).integers(256, batch, s, s, 3).to(torch.uint8)
    # (name, autocast dtype, trunk dtype); CUDA "fp32" convolutions use TF32 as torch does by default
    variants: list[tuple[str, torch.dtype | None, torch.dtype | None]] = [("fp32", None, None)]
    if device.type == "cuda":
        variants += [
            ("bf16 autocast", torch.bfloat16, None),
            ("fp16 autocast", torch.float16, None),
            ("bf16 trunk", None, torch.bfloat16),
        ]
    lines: list[str] = []
    reference: torch.Tensor | None = None
    for name, amp, trunk in variants:  # the trunk cast goes last: it is not undone
        if trunk is not None:
            model.set_precision(trunk)
        r = measure(model, images, batch, iters, amp)
        if reference is None:
            reference, agreement = r.embeddings, ""
        else:
            agreement = f", min cosine to fp32 {(r.embeddings * reference).sum(dim=1).min().item():.4f}"
        line = (
            f"embedders {ARCH} {name} on {device.type}: embed_images(batch {batch}) {r.batched:.1f} img/s | "
            f"one-at-a-time {r.single:.1f} img/s | ratio {r.batched / r.single:.1f}x  "
            f"({iters} x {batch} images, {s} px, max |batched - loop| {r.max_diff:.1e}{agreement}, "
            f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f})"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


def run() -> str:
    """`python -m bench` entry: the quick CPU smoke run, as one summary line."""
    return quick_summary(main)


if __name__ == "__main__":
    main()
