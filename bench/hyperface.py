"""HyperFace identity sampling: the tiled optimiser against autograd through a full N x N Gram.

(a) time per iteration and peak memory, ours vs the naive reference (same loss, same Adam), D = 512;
(b) N = 100k on CPU with the stochastic variant: a few iterations under a 4 GB peak RSS;
(c) quality vs iterations: hard minimum angle of ours vs the random init vs the uniform expectation
    and the bound;
(d) packing within a fixed wall-clock budget (`--budget`, default 60 s), N = 10k, from the same
    random points: ours (`optimize_with_restarts`' default schedules, compressed to the steps the
    budget allows) against the paper's plain objective (mean over rows of the hard max cosine, plain
    projected gradient steps) and a Riesz s-energy anneal (s rising geometrically, projected
    gradient): minimum angle and 1st-percentile nearest-neighbour angle of each, and ours / theirs.
Each measurement runs in its own subprocess, so its peak RSS (or CUDA peak) is its own. CPU by
default; `--device cuda` measures N = 10k..200k against one tiled X·Xᵀ pass of the same size, and
the stochastic variant at N = 10^6. `--quick` is a ~1.5 minute subset ((d) at N = 2,000 in 10 s).

    python -m bench.hyperface [--quick] [--device cuda] [--sizes 2000,5000] [--only a,b,c,d] [--threads N]
                              [--budget SECONDS] [--packing-n N]
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
from dataclasses import replace

import torch

from models.sampling import metrics
from models.sampling.hyperface import (
    PACKING,
    PACKING_REFINE,
    HyperFaceConfig,
    learning_rate_at,
    optimize,
    optimize_with_restarts,
    temperature_at,
)
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


# --- (d): three packers under one wall-clock budget ------------------------------------------------

PLAIN_STEP = 0.01  # (d) plain objective: step length per unit gradient (the spec's learning rate)
RIESZ_S = (2.0, 4096.0)  # (d) Riesz anneal: s from, to (geometric); s ~ 2 / T against our soft-max
RIESZ_STEP = (0.05, 0.0005)  # (d) Riesz anneal: radians moved by the most pushed point, cosine decay


def plain_step(x: torch.Tensor, step: float, tile: int) -> torch.Tensor:
    """One projected gradient step on N·L_sep = sum_i max_j <xi, xj> (the paper's objective, hard max):
    g_i = x_j*(i) + sum over k with j*(k) = i of x_k."""
    _, nearest = metrics.nearest_neighbours(x, tile)  # [N]
    g = x[nearest].clone()  # [N, D] row terms
    g.index_add_(0, nearest, x)  # column terms
    g.sub_((g * x).sum(dim=1, keepdim=True) * x)
    return normalize(x - step * g)


def riesz_step(x: torch.Tensor, s: float, step: float, tile: int) -> torch.Tensor:
    """One projected gradient step on the Riesz s-energy sum_{i<j} |xi - xj|^-s, scaled so the most
    pushed point moves `step` radians. The weights |xi - xj|^-(s+2) are taken relative to the closest
    pair's (found by a first tiled pass), so no power overflows."""
    n = x.shape[0]
    closest = float(metrics.nearest_neighbours(x, tile)[0].max())  # largest cosine
    ref = math.log(max(2 - 2 * closest, 1e-12))
    g = torch.zeros_like(x)  # [N, D] sum_j w_ij x_j
    for i0, i1, j0, j1 in metrics.gram_tiles(n, tile):
        c = x[i0:i1] @ x[j0:j1].T  # [ti, tj]
        w = torch.log((2 - 2 * c).clamp_min_(1e-12)).sub_(ref).mul_(-(s + 2) / 2).clamp_max_(0).exp_()
        if i0 == j0:
            w.fill_diagonal_(0.0)
        g[i0:i1] += w @ x[j0:j1]
        if i0 != j0:
            g[j0:j1] += w.T @ x[i0:i1]
    g.sub_((g * x).sum(dim=1, keepdim=True) * x)  # the descent direction is -g (away from neighbours)
    return normalize(x - step * g / g.norm(dim=1).max().clamp_min(1e-30))


def pack_worker(spec: dict, x: torch.Tensor) -> dict:
    """(d) One packer from x under spec["budget"] seconds. The annealed ones (ours, Riesz) size their
    schedule to 90% of the budget from the step time of warm-up runs of 2 and 4 steps (not counted);
    the plain one has no schedule and steps until the budget is spent. The plain and Riesz loops stop
    at the budget; ours runs its sized schedule to the end (its time is reported)."""
    kind, budget, tile = spec["variant"], spec["budget"], spec["tile"]
    if kind == "pack-ours":
        def run(steps: int) -> tuple[torch.Tensor, int]:
            polish = max(1, round(steps * PACKING_REFINE.iterations / (PACKING.iterations + PACKING_REFINE.iterations)))
            return optimize_with_restarts(
                x, generator=make_generator(SEED + 1), config=replace(PACKING, iterations=max(1, steps - polish)),
                refine=replace(PACKING_REFINE, iterations=polish), rounds=1, tile=tile,
            ).embeddings, steps
    else:
        def run(steps: int) -> tuple[torch.Tensor, int]:
            y, end, t = x, time.perf_counter() + budget, 0
            for t in range(steps):
                _sync(x.device)
                if time.perf_counter() > end:
                    break
                if kind == "pack-plain":
                    y = plain_step(y, PLAIN_STEP, tile)
                else:
                    frac = t / max(steps - 1, 1)
                    s = RIESZ_S[0] * (RIESZ_S[1] / RIESZ_S[0]) ** frac
                    step = RIESZ_STEP[1] + (RIESZ_STEP[0] - RIESZ_STEP[1]) * 0.5 * (1 + math.cos(math.pi * frac))
                    y = riesz_step(y, s, step, tile)
            return y, t + 1
    run(1)  # warm-up
    _sync(x.device)
    marks = [time.perf_counter()]
    for steps in (2, 4):  # the difference leaves out fixed costs (ours: the angle passes around a round)
        run(steps)
        _sync(x.device)
        marks.append(time.perf_counter())
    per_step = max((marks[2] - marks[1]) - (marks[1] - marks[0]), (marks[2] - marks[1]) / 4) / 2
    start = time.perf_counter()
    out, steps = run(1 << 30 if kind == "pack-plain" else max(2, int(0.9 * budget / per_step)))
    _sync(x.device)
    elapsed = time.perf_counter() - start
    angles = metrics.nearest_neighbour_angles(out, tile)  # [N]
    return {"steps": steps, "seconds": elapsed, "min_angle": float(angles.min()),
            "p1_angle": float(torch.quantile(angles.double(), 0.01))}


def worker(spec: dict) -> dict:
    """One measurement, in this (fresh) process."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["variant"].startswith("pack-"):
        return pack_worker(spec, uniform_sphere(spec["n"], DIM, make_generator(SEED, device)))
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
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_a(sizes: list[int], iters: int, device: str, threads: int | None, tile: int) -> list[str]:
    mem = "CUDA max allocated - allocated before" if device.startswith("cuda") else "peak RSS - RSS after imports+data"
    lines = [(f"(a) memory = growth ({mem}), same method for every variant, each in its own subprocess, "
              "default glibc malloc settings for all")]
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
    return [(
        f"(b) N={n} D={DIM} {device}, stochastic variant, batch {batch}: {iters} iterations, "
        f"{r['s_per_iter']:.2f} s/it, peak {r['peak_mib']:.0f} MiB ({'under' if r['peak_mib'] < 4096 else 'OVER'} 4 GB)"
    )]


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


def bench_d(n: int, budget: float, device: str, threads: int | None, tile: int) -> list[str]:
    common = {"n": n, "budget": budget, "device": device, "threads": threads, "tile": tile}
    names = {"pack-ours": "ours (default schedules)", "pack-plain": "paper's plain objective",
             "pack-riesz": "Riesz s-energy anneal"}
    results = {kind: measure({**common, "variant": kind}) for kind in names}
    x = uniform_sphere(n, DIM, make_generator(SEED))
    start = metrics.nearest_neighbour_angles(x, tile)  # [N]
    p1 = math.degrees(float(torch.quantile(start.double(), 0.01)))
    lines = [(f"(d) N={n} D={DIM} {device}, budget {budget:g} s each, same random start (min "
              f"{math.degrees(float(start.min())):.2f}°, 1st pct NN angle {p1:.2f}°):")]
    ours = results["pack-ours"]
    for kind, name in names.items():
        r = results[kind]
        if "error" in r:
            lines.append(f"(d) {name}: {r['error']}")
            continue
        line = (f"(d) {name}: min angle {math.degrees(r['min_angle']):.3f}°, 1st pct NN angle "
                f"{math.degrees(r['p1_angle']):.3f}° ({r['steps']} steps, {r['seconds']:.1f} s)")
        if kind != "pack-ours" and "error" not in ours:
            line += (f" | ours / this: min {ours['min_angle'] / r['min_angle']:.4f}, "
                     f"1st pct {ours['p1_angle'] / r['p1_angle']:.4f}")
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.hyperface", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a ~1 minute subset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default=None, help="comma-separated N for (a)")
    p.add_argument("--only", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--budget", type=float, default=None, help="(d) seconds per packer (default 60; quick 10)")
    p.add_argument("--packing-n", type=int, default=None, help="(d) points (default 10,000; quick 2,000)")
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
    if "d" in only:
        n = args.packing_n or (2000 if args.quick else 10_000)
        budget = args.budget or (10.0 if args.quick else 60.0)
        emit(bench_d(n, budget, args.device, args.threads, tile))
    return lines


def run() -> str:
    """`python -m bench` entry: the quick subset, as one summary line."""
    return "hyperface: " + " || ".join(main(["--quick"]))


if __name__ == "__main__":
    main()
