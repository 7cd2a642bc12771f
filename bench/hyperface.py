"""HyperFace identity sampling: the tiled optimiser against autograd through a full N x N Gram.

(a) time per iteration and peak memory, ours vs the naive reference (same loss, same Adam), D = 512;
(b) N = 100k on CPU with the stochastic variant: a few iterations under a 4 GB peak RSS;
(c) quality vs iterations: hard minimum angle of ours vs the random init vs the uniform expectation
    and the bound.
Each measurement runs in its own subprocess, so its peak RSS (or CUDA peak) is its own. CPU by
default; `--device cuda` measures N = 10k..200k against one tiled X·Xᵀ pass of the same size, and
the stochastic variant at N = 10^6. `--quick` is a ~1 minute subset.

    python -m bench.hyperface [--quick] [--device cuda] [--sizes 2000,5000] [--only a,b,c] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from models.sampling import metrics
from models.sampling.hyperface import HyperFaceConfig, learning_rate_at, optimize, temperature_at
from models.sampling.sphere import normalize, uniform_sphere
from models.seeding import make_generator

DIM = 512  # ArcFace embedding size
SEED = 0  # seeds the initial points and batches


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_run(x: torch.Tensor, config: HyperFaceConfig) -> torch.Tensor:
    """The reference: autograd through the full N x N Gram, same soft-max loss, Adam and projection."""
    n = x.shape[0]
    m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    for t in range(config.iterations):
        temp, lr = temperature_at(config, t), learning_rate_at(config, t)
        p = x.clone().requires_grad_()
        s = (p @ p.T).masked_fill(eye, -math.inf)  # [N, N]
        loss = (temp * torch.logsumexp(s / temp, dim=1)).sum()  # N·L_sep ("mean")
        (g,) = torch.autograd.grad(loss, p)
        g = g - (g * x).sum(dim=1, keepdim=True) * x
        m1 = config.beta1 * m1 + (1 - config.beta1) * g
        m2 = config.beta2 * m2 + (1 - config.beta2) * g * g
        c1, c2 = 1 - config.beta1 ** (t + 1), 1 - config.beta2 ** (t + 1)
        x = normalize(x - lr * (m1 / c1) / ((m2 / c2).sqrt() + config.eps))
    return x


def gram_pass(x: torch.Tensor, tile: int) -> None:
    """One tiled X·Xᵀ over the upper triangle with a row max: the floor for a step's cost."""
    for i0, i1, j0, j1 in metrics.gram_tiles(x.shape[0], tile):
        (x[i0:i1] @ x[j0:j1].T).amax(dim=1)


def worker(spec: dict) -> dict:
    """One measurement, in this (fresh) process."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    n, iters = spec["n"], spec["iterations"]
    x = uniform_sphere(n, DIM, make_generator(SEED, device))  # [N, D]
    config = HyperFaceConfig(
        iterations=iters, alpha=0.0, batch_size=spec.get("batch"), tile=spec["tile"], stats_every=None,
        precision=spec.get("precision", "float32"), polish_iterations=0,
        **({"neighbours": spec["neighbours"]} if "neighbours" in spec else {}),
    )
    warm = HyperFaceConfig(**{**config.__dict__, "iterations": 1})
    kind = spec["variant"]
    # memory baseline: CUDA allocated bytes, or the CPU RSS now (after imports and the data)
    base = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mib()
    gen = make_generator(SEED + 1, device) if config.batch_size else None
    if kind == "naive":
        naive_run(x, warm)
    elif kind == "gram":
        gram_pass(x, config.tile)
    else:
        optimize(x, None, warm, generator=gen)
    _sync(device)
    start = time.perf_counter()
    if kind == "naive":
        out = naive_run(x, config)
    elif kind == "gram":
        for _ in range(iters):
            gram_pass(x, config.tile)
        out = x
    else:
        out = optimize(x, None, config, generator=gen).embeddings
    _sync(device)
    per_iter = (time.perf_counter() - start) / iters
    result = {"s_per_iter": per_iter, "peak_mib": _peak_mib(device), "base_mib": base}
    if spec.get("quality"):
        result["min_angle_init"] = metrics.min_angle(x, config.tile)
        result["min_angle"] = metrics.min_angle(out, config.tile)
    return result


def measure(spec: dict) -> dict:
    """Run `worker(spec)` in a subprocess and return its result."""
    cmd = [sys.executable, "-m", "bench.hyperface", "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_a(sizes: list[int], iters: int, device: str, threads: int | None, tile: int) -> list[str]:
    mem = "CUDA max allocated - allocated before" if device.startswith("cuda") else "peak RSS - RSS after imports+data"
    lines = [f"(a) memory = growth ({mem}), same method for every variant, each in its own subprocess, "
             "default glibc malloc settings for all"]
    default = HyperFaceConfig()
    for n in sizes:
        common = {"n": n, "iterations": iters, "device": device, "threads": threads, "tile": tile}
        other = "gram" if device == "cuda" else "naive"
        ref = measure({**common, "variant": other})
        sparse = default.neighbours is not None and n >= default.sparse_from
        variants = [("ours default" + (f" (top-{default.neighbours})" if sparse else " (exact)"), {})]
        if sparse:
            variants.append(("ours exact", {"neighbours": None}))
        for name, extra in variants:
            ours = measure({**common, "variant": "ours", **extra})
            if "error" in ours or "error" in ref:
                lines.append(f"(a) N={n}: {name} {ours} | {other} {ref}")
                continue
            grow_o, grow_r = ours["peak_mib"] - ours["base_mib"], ref["peak_mib"] - ref["base_mib"]
            lines.append(
                f"(a) N={n} D={DIM} {device}: {name} {ours['s_per_iter']:.3f} s/it, +{grow_o:.0f} MiB "
                f"(peak {ours['peak_mib']:.0f}) | {other} {ref['s_per_iter']:.3f} s/it, +{grow_r:.0f} MiB "
                f"(peak {ref['peak_mib']:.0f}) | time ratio {ours['s_per_iter'] / ref['s_per_iter']:.2f}, "
                f"memory (growth) ratio {grow_o / max(grow_r, 1e-9):.3f}"
            )
    return lines


def bench_b(n: int, batch: int, iters: int, device: str, threads: int | None, tile: int) -> list[str]:
    r = measure({"n": n, "iterations": iters, "device": device, "threads": threads, "tile": tile,
                 "batch": batch, "variant": "ours"})
    if "error" in r:
        return [f"(b) N={n} stochastic batch {batch}: {r['error']}"]
    return [
        f"(b) N={n} D={DIM} {device}, stochastic variant, batch {batch}: {iters} iterations, "
        f"{r['s_per_iter']:.2f} s/it, peak {r['peak_mib']:.0f} MiB ({'under' if r['peak_mib'] < 4096 else 'OVER'} 4 GB)"
    ]


def bench_c(n: int, steps: list[int], device: str, threads: int | None, tile: int) -> list[str]:
    lines = []
    expected = math.degrees(metrics.uniform_expected_min_angle(n, DIM))
    bound = math.degrees(metrics.rankin_bound(n, DIM))
    for iters in steps:
        r = measure({"n": n, "iterations": iters, "device": device, "threads": threads, "tile": tile,
                     "variant": "ours", "quality": True})
        if "error" in r:
            lines.append(f"(c) N={n} {iters} it: {r['error']}")
            continue
        lines.append(
            f"(c) N={n} D={DIM} after {iters} it (default schedule over {iters}): min angle "
            f"{math.degrees(r['min_angle']):.2f}° | random init {math.degrees(r['min_angle_init']):.2f}° "
            f"(uniform expectation {expected:.2f}°) | bound {bound:.2f}° | {r['s_per_iter']:.2f} s/it"
        )
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.hyperface", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a ~1 minute subset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default=None, help="comma-separated N for (a)")
    p.add_argument("--only", default="a,b,c", help="comma-separated subset of a,b,c")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in each subprocess")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return []
    cuda = args.device.startswith("cuda")
    tile = 8192 if cuda else 2048
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    elif cuda:
        sizes = [10_000, 50_000, 100_000, 200_000]
    else:
        sizes = [2000, 5000] if args.quick else [2000, 5000, 10_000]
    only = set(args.only.split(","))
    lines: list[str] = []

    def emit(new: list[str]) -> None:
        for line in new:
            print(line, flush=True)
        lines.extend(new)

    if "a" in only:
        emit(bench_a(sizes, 2 if args.quick else 3, args.device, args.threads, tile))
    if "b" in only:
        if cuda:
            emit(bench_b(1_000_000, 8192, 5, args.device, args.threads, tile))
        else:
            emit(bench_b(100_000, 512 if args.quick else 1024, 3, args.device, args.threads, tile))
    if "c" in only:
        n = 2000 if args.quick else 10_000
        emit(bench_c(n, [10, 50] if args.quick else [10, 50, 200], args.device, args.threads, tile))
    return lines


def run() -> str:
    """`python -m bench` entry: the quick subset, as one summary line."""
    return "hyperface: " + " || ".join(main(["--quick"]))


if __name__ == "__main__":
    main()
