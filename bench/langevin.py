"""Langevin identity sampling: the batched step against the per-identity reference loop.

(a) CPU, the registry's tiny presets (stylegan2-tiny + iresnet-tiny): seconds per iteration of
    `langevin.step` (batches of 64, the embedder through its fused view) against the loop of the
    reference code (idiap/face_synthetics), which runs the plain modules: all N embeddings without
    gradients (batches of 64), then each identity re-rendered alone with gradients against the
    others' fixed embeddings, then the same update. The step is timed twice: with the default
    `keep_graphs` (one batch's graph kept from the embedding pass, the rest rendered twice) and with
    keep_graphs = N (every identity rendered once per step; memory ~2 MB per identity here). Two
    loops: "loop" with frozen weights and gradients to w only (our tests' reference), and "idiap
    loop" as the reference code runs it: weights that require gradients (`backward()` computes and
    accumulates them) and random StyleGAN noise. N = 256 and 1024; where the loop would take long, it
    runs a fixed subset of identities (each against all N) and is scaled linearly, which the line
    says. The batched forces are checked against the loop's on that subset (largest relative
    difference per row; float32).
(b) CUDA (when present): StyleGAN2-256 (`CONFIG_256`) + iResNet50 with random weights, FFHQ crop:
    identity-iterations per second of the batched step, the loop's on a subset, and the projected
    time of a 10k-identity x 100-iteration run.

    python -m bench.langevin [--quick] [--device cpu|cuda|auto] [--threads N]

`--quick` (what `python -m bench` runs): N = 256 only, the loops on 64 identities.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

import torch

from bench import set_threads
from models.embedders.iresnet import IResNetConfig, IResNetEmbedder
from models.generators.stylegan2 import CONFIG_256, StyleGAN2Generator
from models.registry import Registry
from models.sampling import langevin as lv
from models.sampling.latent_face import LatentFace
from models.seeding import make_generator, seeded_construction

SEED = 0  # seeds the identities, the noise and the random weights
BATCH = 64  # identities per batched forward/backward (the reference code's recipe)
CONFIG = lv.LangevinConfig(batch_size=BATCH)  # the published recipe otherwise
PROJECT_IDENTITIES = 10_000  # (b): the projected run's identities
PROJECT_ITERATIONS = 100  # and iterations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(face: LatentFace) -> torch.device:
    return next(face.generator.parameters()).device


def tiny_faces(root: str) -> tuple[LatentFace, LatentFace]:
    """(frozen, idiap-style) faces over two loads of the tiny presets; the second's weights require grad."""
    reg = Registry(root)
    reg.ensure("stylegan2-tiny")
    reg.ensure("iresnet-tiny")
    frozen = LatentFace(reg.load("stylegan2-tiny"), reg.load("iresnet-tiny"), "center")
    gen, emb = reg.load("stylegan2-tiny").requires_grad_(True), reg.load("iresnet-tiny").requires_grad_(True)
    return frozen, LatentFace(gen, emb, "center", fused=False)


def plain(face: LatentFace) -> LatentFace:
    """The same models without the fused embedder view: what the reference loop runs."""
    return LatentFace(face.generator, face.embedder, face.crop_method, fused=False)


def real_faces(device: torch.device) -> LatentFace:
    """StyleGAN2-256 + iResNet50 with random weights (global RNG untouched), frozen, FFHQ crop."""
    with seeded_construction(SEED), torch.no_grad():
        gen = StyleGAN2Generator(CONFIG_256)
        gen.latent_avg = gen.mapping(torch.randn(4096, gen.style_dim)).mean(0)
        emb = IResNetEmbedder(IResNetConfig.from_arch("r50"))
    gen = gen.to(device).eval().requires_grad_(False)
    emb = emb.to(device).eval().requires_grad_(False)
    return LatentFace(gen, emb, "ffhq")


def loop_forces(face: LatentFace, w: torch.Tensor, config: lv.LangevinConfig, rows: range,
                idiap: bool = False) -> tuple[torch.Tensor, float, float]:
    """The reference loop's forces on `rows`: (repulsion [len(rows), D], seconds of the all-N
    embedding pass, seconds of the per-identity part).

    Fixed embeddings of all N first (batches of config.batch_size, no gradients), then one identity
    at a time re-rendered with gradients against the others' fixed embeddings. idiap=True:
    `backward()` through weights that require gradients, and random StyleGAN noise, as the
    reference code does. The update itself (O(N D)) is left out: it is the same in both.
    """
    device = _device(face)
    noise = make_generator(SEED, device) if idiap else None
    s, bs = config.cos_scale, config.batch_size
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        fixed = torch.cat([face.embed(w[b:b + bs]) for b in range(0, w.shape[0], bs)])  # [N, E]
    _sync(device)
    t_fixed = time.perf_counter() - start
    start = time.perf_counter()
    out = torch.empty(len(rows), w.shape[1], dtype=w.dtype, device=device)
    for k, i in enumerate(rows):
        wi = w[i:i + 1].clone().requires_grad_(True)
        if idiap:
            images = face.generator.synthesis(wi, noise_mode="random", generator=noise)  # [1, 3, S, S]
            ei = face.embedder(face.crop(images))[0].to(w.dtype)  # [E]
        else:
            ei = face.embed(wi)[0]  # [E]
        others = torch.cat([fixed[:i], fixed[i + 1:]])  # [N - 1, E]
        theta = torch.acos(s * (others @ ei))
        r0, k = config.repulsion_radius, config.stiffness
        u = torch.where(theta < r0, k / 2 * (r0 - theta) ** 2, 0.0).sum()
        if idiap:
            u.backward()
            g = wi.grad
        else:
            (g,) = torch.autograd.grad(u, wi)
        out[k] = -g[0]
    _sync(device)
    return out, t_fixed, time.perf_counter() - start


def time_step(face: LatentFace, n: int, config: lv.LangevinConfig, iterations: int) -> float:
    """Seconds per `langevin.step` at n identities, after one untimed step at n: the steady state of a
    run (its first step also pays for fresh memory, which a 100-step run amortises)."""
    state = lv.init_state(face, n, SEED, config)
    lv.step(face, state, config, SEED)
    _sync(_device(face))
    start = time.perf_counter()
    for _ in range(iterations):
        lv.step(face, state, config, SEED)
    _sync(_device(face))
    return (time.perf_counter() - start) / iterations


def compare(face: LatentFace, n: int, subset: int, iterations: int, idiap_face: LatentFace | None,
            check: bool, keep_all: bool) -> tuple[str, float]:
    """(one line: batched step vs the loops at n identities, seconds per batched step).

    The step is timed with the default config and, with keep_all, with keep_graphs = n too (the
    seconds returned are then that one's). The loops run `subset` identities (each against all n)
    on the plain modules and are scaled by n / subset; their all-n embedding pass is timed in full.
    """
    config = CONFIG
    dev = _device(face)
    steps = {f"keep_graphs {config.keep_graphs}": time_step(face, n, config, iterations)}
    if keep_all:
        steps["keep_graphs N"] = time_step(face, n, replace(config, keep_graphs=n), iterations)
    w = lv.init_state(face, n, SEED, config).latents
    rows = range(subset)
    reference = plain(face)
    loop_forces(reference, w, config, range(2))  # warm-up of the one-identity shapes
    forces, t_fixed, t_rows = loop_forces(reference, w, config, rows)
    scale = n / subset
    t_loop = t_fixed + t_rows * scale
    how = "in full" if subset == n else f"on {subset} of {n} identities (each against all {n}), scaled x{scale:g}"
    t_step = list(steps.values())[-1]
    line = (f"N={n} {dev.type}: batched step " + ", ".join(f"{t:.2f} s/it ({k})" for k, t in steps.items())
            + f" ({n / t_step:.0f} identity-it/s, batch {BATCH}) | loop {t_loop:.2f} s/it ({how}) | ratio "
            + ", ".join(f"{t_loop / t:.1f}x" for t in steps.values()))
    if idiap_face is not None:
        loop_forces(idiap_face, w, config, range(2), idiap=True)
        _, t_fixed_i, t_rows_i = loop_forces(idiap_face, w, config, rows, idiap=True)
        t_idiap = t_fixed_i + t_rows_i * scale
        line += (f" | idiap loop (weight grads, random noise) {t_idiap:.2f} s/it, ratio "
                 + ", ".join(f"{t_idiap / t:.1f}x" for t in steps.values()))
    if check:
        ours = lv.compute_forces(face, w, config).repulsion[:subset]
        rel = float(((ours - forces).norm(dim=1) / forces.norm(dim=1).clamp_min(1e-30)).max())
        line += f" | forces vs loop: max rel diff {rel:.1e}"
    return line, t_step


def bench_cpu(quick: bool) -> list[str]:
    with tempfile.TemporaryDirectory() as root:
        face, idiap_face = tiny_faces(root)
    sizes = [(256, 64)] if quick else [(256, 256), (1024, 256)]
    lines = []
    for k, (n, subset) in enumerate(sizes):
        line, _ = compare(face, n, subset, 1 if quick else 2, idiap_face, check=k == 0, keep_all=True)
        lines.append(f"(a) tiny presets, {torch.get_num_threads()} threads, {line}, "
                     f"load avg {os.getloadavg()[0]:.1f}")
    return lines


def bench_cuda(quick: bool) -> list[str]:
    device = torch.device("cuda")
    face = real_faces(device)
    n, subset = (256, 32) if quick else (2048, 64)
    line, t_step = compare(face, n, subset, 1 if quick else 2, None, check=True, keep_all=False)
    rate = n / t_step
    hours = PROJECT_IDENTITIES * PROJECT_ITERATIONS / rate / 3600
    return [
        f"(b) StyleGAN2-256 + iResNet50 (random weights), {torch.cuda.get_device_name(device)}: {line}",
        (f"(b) projected {PROJECT_IDENTITIES} identities x {PROJECT_ITERATIONS} iterations at {rate:.0f} "
         f"identity-iterations/s: {hours:.2f} h (linear in N; the step's pairwise passes, O(N^2 E), are "
         f"timed at N={n} and grow quadratically)"),
    ]


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m bench.langevin", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 256 only, loops on 64 identities")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="cpu: (a) only; cuda: (b) only; auto: (a), and (b) when CUDA is available")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    set_threads(p, args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    lines: list[str] = []

    def emit(new: list[str]) -> None:
        if argv is None:  # run as a script: print as we go
            for line in new:
                print(line, flush=True)
        lines.extend(new)

    if args.device in ("auto", "cpu"):
        emit(bench_cpu(args.quick))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        emit(bench_cuda(args.quick))
    return lines


def run() -> str:
    """`python -m bench` entry: the quick subset, as one summary line."""
    return "langevin: " + " || ".join(main(["--quick"]))


if __name__ == "__main__":
    main()
