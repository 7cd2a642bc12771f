"""Arc2Face at Stable Diffusion 1.5 size: our generator against a plain diffusers pipeline call.

Both run the same components, built in memory with random weights (SD 1.5 UNet, VAE and CLIP
ViT-L/14 text encoder; nothing is downloaded), at 512 px with 25 DPM-Solver++ steps and guidance
3.0: `Arc2FaceGenerator.render` and `StableDiffusionPipeline(prompt_embeds=...)` as Arc2Face's
published code calls it (the pipeline encodes the empty negative prompt itself, on every call; ours
is cached), on the same batch, contexts and initial latents, timed alternately in one run; in
float32 on the CPU their final latents are equal (tests/models/test_arc2face.py). The identity
encoding and the uint8 images on the CPU are counted on both sides. Model FLOP utilisation: the
FLOPs of one UNet forward on the guided batch (torch.utils.flop_counter; matmuls, convolutions,
attention) times the steps, plus one VAE decode, per second, over the device's dense 16-bit peak.

`python -m bench.arc2face [--quick]`; `--quick` runs tiny components, 2 steps, on the CPU: a smoke
run of both paths.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.generators.arc2face import (
    PROMPT,
    SD15_SCHEDULER_CONFIG,
    TOKENIZER_DIR,
    Arc2FaceGenerator,
    dpm_solver,
)
from models.generators.clip_vocab import write_clip_vocab
from models.sampling.random import sample_identities
from models.seeding import derive_seed, seeded_construction

# Dense 16-bit tensor-core peaks (FLOP/s, no sparsity), matched on the device name in this order.
PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
JOB_SEED = 0  # seeds the identities and the per-image seeds


@dataclass(frozen=True)
class Sizes:
    unet_channels: tuple[int, ...]  # UNet block widths; SD 1.5: (320, 640, 1280, 1280)
    unet_layers: int  # resnets per UNet block; SD 1.5: 2
    latent_size: int  # latent side; SD 1.5: 64 (512 px)
    vae_channels: tuple[int, ...]  # VAE block widths; SD 1.5: (128, 256, 512, 512)
    vae_layers: int  # resnets per VAE block; SD 1.5: 2
    text_width: int  # CLIP hidden size; ViT-L/14: 768
    text_layers: int  # CLIP layers; ViT-L/14: 12
    text_heads: int  # CLIP attention heads; ViT-L/14: 12
    text_mlp: int  # CLIP MLP width; ViT-L/14: 3072


SD15 = Sizes((320, 640, 1280, 1280), 2, 64, (128, 256, 512, 512), 2, 768, 12, 12, 3072)
TINY = Sizes((32, 64), 1, 8, (32, 64, 64), 1, 512, 2, 4, 1024)


@dataclass(frozen=True)
class Options:
    quick: bool  # tiny sizes, few steps, CPU: a smoke run
    batch: int  # images per render call (the UNet sees twice as many with guidance)
    steps: int  # DPM-Solver++ steps
    guidance: float  # classifier-free guidance scale
    repeats: int  # timed calls per path, alternating
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype  # weight and activation dtype
    channels_last: bool  # NHWC UNet and VAE (ours and, being the same modules, the pipeline's)
    compile: bool  # torch.compile our UNet (the pipeline's call stays eager)
    peak: float | None  # device peak FLOP/s for the utilisation; None = look it up by device name


@dataclass(frozen=True)
class Result:
    ours: float  # images/s, Arc2FaceGenerator.render
    pipeline: float  # images/s, StableDiffusionPipeline
    flops_per_batch: float  # FLOPs of one render call: steps UNet passes + one VAE decode
    peak: float | None  # FLOP/s used for the utilisation
    max_diff: int  # largest pixel difference between the two paths' images
    device_name: str  # what ran it


Components = tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer]


def build(sizes: Sizes, root: str) -> Components:
    """UNet, VAE, text encoder (random weights, seed 0) and a CLIP tokenizer holding the prompt."""
    write_clip_vocab(Path(root) / TOKENIZER_DIR, PROMPT.split())
    tokenizer = CLIPTokenizer.from_pretrained(Path(root) / TOKENIZER_DIR)
    n = len(sizes.unet_channels)
    with seeded_construction(0):
        unet = UNet2DConditionModel(
            sample_size=sizes.latent_size,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            block_out_channels=sizes.unet_channels,
            layers_per_block=sizes.unet_layers,
            attention_head_dim=8,
            cross_attention_dim=sizes.text_width,
            norm_num_groups=min(32, sizes.unet_channels[0]),
        )
        k = len(sizes.vae_channels)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * k,
            up_block_types=("UpDecoderBlock2D",) * k,
            block_out_channels=sizes.vae_channels,
            layers_per_block=sizes.vae_layers,
            latent_channels=4,
            norm_num_groups=min(32, sizes.vae_channels[0]),
            sample_size=sizes.latent_size * 2 ** (k - 1),
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=max(49408, len(tokenizer)),
                hidden_size=sizes.text_width,
                intermediate_size=sizes.text_mlp,
                num_hidden_layers=sizes.text_layers,
                num_attention_heads=sizes.text_heads,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return unet, vae, text_encoder, tokenizer


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(opt: Options) -> Result:
    with tempfile.TemporaryDirectory() as scratch:
        unet, vae, text_encoder, tokenizer = build(TINY if opt.quick else SD15, scratch)
    unet, vae, text_encoder = (m.to(opt.device, opt.dtype) for m in (unet, vae, text_encoder))
    gen = Arc2FaceGenerator(
        unet, vae, text_encoder, tokenizer, dpm_solver(SD15_SCHEDULER_CONFIG),
        channels_last=opt.channels_last, compile_unet=opt.compile,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=dpm_solver(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    emb = sample_identities(JOB_SEED, 0, opt.batch)  # [B, 512]
    seeds = [derive_seed(JOB_SEED, "sample", i, 0) for i in range(opt.batch)]

    def ours() -> torch.Tensor:
        return gen.render(emb, seeds, steps=opt.steps, guidance_scale=opt.guidance)  # [B, H, W, 3]

    @torch.no_grad()
    def diffusers_call() -> torch.Tensor:
        context = gen.encode_identities(emb).to(opt.dtype)  # [B, L, H]
        images = pipe(
            prompt_embeds=context, latents=gen.initial_latents(seeds),
            num_inference_steps=opt.steps, guidance_scale=opt.guidance, output_type="pt",
        ).images  # [B, 3, H, W] in [0, 1]
        return (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    a, b = ours(), diffusers_call()  # warm-up: compilation, kernel selection, allocator
    max_diff = int((a.int() - b.int()).abs().max())
    t_ours = t_pipe = 0.0
    for _ in range(opt.repeats):
        for fn, is_ours in ((ours, True), (diffusers_call, False)):
            sync(opt.device)
            start = time.perf_counter()
            fn()
            sync(opt.device)
            elapsed = time.perf_counter() - start
            t_ours, t_pipe = (t_ours + elapsed, t_pipe) if is_ours else (t_ours, t_pipe + elapsed)
    flops = batch_flops(gen, emb, seeds, opt)
    name = torch.cuda.get_device_name() if opt.device == "cuda" else "CPU"
    peak = opt.peak if opt.peak is not None else next((p for key, p in PEAKS if key in name), None)
    images = opt.batch * opt.repeats
    return Result(images / t_ours, images / t_pipe, flops, peak, max_diff, name)


@torch.no_grad()
def batch_flops(gen: Arc2FaceGenerator, emb: torch.Tensor, seeds: list[int], opt: Options) -> float:
    """FLOPs of one render call: `steps` UNet forwards on the (guided) batch plus one VAE decode."""
    latents = gen.initial_latents(seeds)  # [B, C, h, w]
    context = gen.encode_identities(emb).to(opt.dtype)  # [B, L, H]
    if opt.guidance != 1.0:
        latents, context = torch.cat([latents, latents]), torch.cat([context, context])  # [2B, ...]
    t = torch.tensor(500, device=latents.device)
    with FlopCounterMode(display=False) as unet_count:
        gen.unet(latents, t, encoder_hidden_states=context)
    with FlopCounterMode(display=False) as vae_count:
        gen.vae.decode(gen.initial_latents(seeds))
    return opt.steps * unet_count.get_total_flops() + vae_count.get_total_flops()


def flop(x: float) -> str:
    """A FLOP count with its SI prefix: 3.21 TFLOP."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}FLOP"
    return f"{x:.3g} FLOP"


def report(opt: Options, r: Result) -> list[str]:
    achieved = r.flops_per_batch * r.ours / opt.batch  # FLOP/s of our path
    guided = int(opt.guidance != 1.0)
    mfu = "n/a (no known peak: --peak-tflops)"
    if r.peak:
        mfu = f"{achieved / r.peak:.1%} of a {flop(r.peak)}/s peak"
    size = "tiny" if opt.quick else "SD 1.5"
    return [
        (
            f"arc2face ({size}, {r.device_name}, {str(opt.dtype).removeprefix('torch.')}, batch {opt.batch}, "
            f"{opt.steps} steps, guidance {opt.guidance}, channels_last {opt.channels_last}, "
            f"compile {opt.compile})"
        ),
        (
            f"  ours: {r.ours:.3f} img/s | diffusers StableDiffusionPipeline: {r.pipeline:.3f} img/s | "
            f"ratio {r.ours / r.pipeline:.2f}x | max pixel diff {r.max_diff}"
        ),
        (
            f"  {flop(r.flops_per_batch)} per call ({opt.steps} UNet passes on {opt.batch * (1 + guided)} "
            f"latents + VAE decode of {opt.batch}; text encoder not counted) | achieved {flop(achieved)}/s | "
            f"MFU {mfu}"
        ),
    ]


def options(quick: bool, **overrides: object) -> Options:
    cuda = torch.cuda.is_available() and not quick
    base = Options(
        quick=quick, batch=2 if quick else 8, steps=2 if quick else 25, guidance=3.0,
        repeats=1 if quick else 3,
        device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32,
        channels_last=False, compile=False, peak=None,
    )  # fmt: skip
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


def run(quick: bool | None = None) -> str:
    """One summary line (for `python -m bench`); quick unless a GPU is present."""
    opt = options(not torch.cuda.is_available() if quick is None else quick)
    return " ".join(line.strip() for line in report(opt, measure(opt)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.arc2face", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps, CPU: a smoke run")
    parser.add_argument("--batch", type=int, help="images per call (default 8; quick 2)")
    parser.add_argument("--steps", type=int, help="solver steps (default 25; quick 2)")
    parser.add_argument("--repeats", type=int, help="timed calls per path (default 3; quick 1)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default bf16 on CUDA")
    parser.add_argument("--channels-last", action="store_true", help="NHWC UNet and VAE")
    parser.add_argument("--compile", action="store_true", help="torch.compile our UNet")
    parser.add_argument("--peak-tflops", type=float, help="device peak for the MFU (default: by device name)")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: must be >= 1, got {value}")
    diffusers_logging.disable_progress_bar()
    opt = options(
        args.quick, batch=args.batch, steps=args.steps, repeats=args.repeats,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        channels_last=args.channels_last or None, compile=args.compile or None,
        peak=args.peak_tflops * 1e12 if args.peak_tflops else None,
    )  # fmt: skip
    for line in report(opt, measure(opt)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
