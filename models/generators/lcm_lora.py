"""LCM-LoRA (Luo et al., 2023): a latent-consistency LoRA fused into a Stable Diffusion 1.5 UNet.

The published SD 1.5 adapter (latent-consistency/lcm-lora-sdv1-5, `pytorch_lora_weights.safetensors`)
was written by the LCM distillation script in the kohya layout: for each adapted layer
`lora_unet_<module path with "." -> "_">.lora_down.weight` [r, in(, kh, kw)], `.lora_up.weight`
[out, r(, 1, 1)] and a scalar `.alpha`; the layers are the attention projections, proj_in/out, the
feed-forward linears, the resnet convolutions (3x3 and 1x1 shortcuts), time_emb_proj and the down/up
sampler convolutions. The diffusers/peft layout (`[unet.]<module path>.lora_A.weight` / `.lora_B.weight`,
or the older `.lora.down.weight` / `.lora.up.weight`, alpha = rank unless given) is read as well.

Fusing adds scale * alpha / r * up @ down to each layer's weight (for a convolution, the down
factor's kernel carries over: delta[o, i, y, x] = sum_k up[o, k] * down[k, i, y, x]), after which
the UNet runs at its normal speed. Sampling then uses LCMScheduler's timesteps and noise schedule:
4 steps and guidance 1.0 (no classifier-free guidance), as the adapter's model card and the Arc2Face
README advise.

One LCM step is `lcm_denoise` (the consistency estimate of the clean latent, LCMScheduler.step's
`denoised`) followed, except after the last step, by `lcm_renoise` to the next timestep. The two are
separate because `LCMScheduler.step` draws that noise itself, from a `torch.Generator` or else from
torch's global RNG; callers here pass noise from their own portable streams instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import LCMScheduler
from safetensors.torch import load_file

FAST_STEPS = 4  # LCM steps per image: the adapter card's example; 2 to 8 work
FAST_GUIDANCE = 1.0  # classifier-free guidance scale in fast mode: 1 = off (LCM over-saturates above ~2)
KOHYA_PREFIX = "lora_unet_"  # prefix of UNet keys in the kohya layout
# Suffixes of each layout: (down factor, up factor). Alpha is always "<module>.alpha".
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
PEFT_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))
ALPHA_SUFFIX = ".alpha"
DIFFUSERS_PREFIX = "unet."  # optional prefix of UNet keys in the diffusers/peft layout


@dataclass(frozen=True)
class LoraFactor:
    module: str  # dotted UNet module name, e.g. "down_blocks.0.attentions.0.proj_in"
    down: torch.Tensor  # [r, in] (linear) or [r, in, kh, kw] (convolution)
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float  # the update is scaled by alpha / r; alpha = r when the file stores none

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The weight update alpha / r * up @ down, in float32, flattened to [out, in * kh * kw]."""
        up = self.up.float().flatten(1)  # [out, r]
        down = self.down.float().flatten(1)  # [r, in * kh * kw]
        return (self.alpha / self.rank) * (up @ down)  # [out, in * kh * kw]


def adaptable_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's linear and convolution layers by dotted name: the layers a LoRA may adapt."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _split_key(key: str, kohya_names: Mapping[str, str]) -> tuple[str, str] | None:
    """(dotted module name, role in {"down", "up", "alpha"}) for a LoRA key, or None if unknown."""
    if key.startswith(KOHYA_PREFIX):
        for role, suffix in zip(("down", "up", "alpha"), (*KOHYA_SUFFIXES, ALPHA_SUFFIX), strict=True):
            if key.endswith(suffix):
                name = kohya_names.get(key[len(KOHYA_PREFIX) : -len(suffix)])
                return (name, role) if name is not None else None
        return None
    body = key.removeprefix(DIFFUSERS_PREFIX)
    for down_suffix, up_suffix in PEFT_SUFFIXES:
        for role, suffix in (("down", down_suffix), ("up", up_suffix)):
            if body.endswith(suffix):
                return body[: -len(suffix)], role
    if body.endswith(ALPHA_SUFFIX):
        return body[: -len(ALPHA_SUFFIX)], "alpha"
    return None


def parse_lora(state: Mapping[str, torch.Tensor], unet: torch.nn.Module) -> list[LoraFactor]:
    """LoRA factors for `unet` from a LoRA state dict in the kohya or diffusers/peft layout.

    Raises ValueError naming the keys that adapt no layer of this UNet (text-encoder keys included:
    only the UNet is adapted), factors without their partner, and factors whose shapes do not fit.
    """
    modules = adaptable_modules(unet)
    kohya_names: dict[str, str] = {}
    for name in modules:
        flat = name.replace(".", "_")
        if flat in kohya_names:  # two modules with one kohya name: the layout cannot address them
            raise ValueError(f"unet: modules {kohya_names[flat]!r} and {name!r} share a kohya name {flat!r}")
        kohya_names[flat] = name
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        split = _split_key(key, kohya_names)
        if split is None or split[0] not in modules:
            unknown.append(key)
            continue
        name, role = split
        if role in parts.setdefault(name, {}):
            raise ValueError(f"lora: two keys give the {role} factor of {name!r} (one is {key!r})")
        parts[name][role] = tensor
    if unknown:
        names = ", ".join(sorted(unknown))
        raise ValueError(f"lora: {len(unknown)} key(s) adapt no layer of this UNet: {names}")
    factors = []
    for name, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise ValueError(f"lora: module {name!r} lacks its {'up' if 'down' in p else 'down'} factor")
        down, up = p["down"], p["up"]
        rank = down.shape[0]
        alpha = float(p["alpha"].item()) if "alpha" in p else float(rank)
        _check_shapes(name, modules[name], down, up)
        factors.append(LoraFactor(name, down, up, alpha))
    return factors


def _check_shapes(name: str, module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
    weight = module.weight  # [out, in] or [out, in, kh, kw]
    rank = down.shape[0]
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        raise ValueError(f"lora: {name!r} is a grouped convolution; only groups=1 can be fused")
    out = weight.shape[0]
    if up.ndim not in (2, 4) or up.shape[0] != out or up.shape[1] != rank or up[0, 0].numel() != 1:
        raise ValueError(f"lora: {name!r} up factor {tuple(up.shape)} does not fit [{out}, {rank}(, 1, 1)]")
    if down.ndim == 2 and weight.ndim == 4 and weight.shape[2:] == (1, 1):  # a linear LoRA on a 1x1 conv
        down = down[:, :, None, None]
    if tuple(down.shape[1:]) != tuple(weight.shape[1:]):
        fits = ", ".join(map(str, weight.shape[1:]))
        raise ValueError(f"lora: {name!r} down factor {tuple(down.shape)} does not fit [r, {fits}]")


@torch.no_grad()
def fuse_lora(unet: torch.nn.Module, factors: list[LoraFactor], scale: float = 1.0) -> None:
    """Add scale * alpha / r * up @ down to each adapted weight of `unet`, in place (float32 sums)."""
    modules = adaptable_modules(unet)
    for f in factors:
        weight = modules[f.module].weight  # [out, in] or [out, in, kh, kw]
        delta = f.delta().to(weight.device).reshape(weight.shape)  # like weight, float32
        weight.copy_((weight.float() + scale * delta).to(weight.dtype))


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA state dict from a safetensors file (the format the adapter is published in)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"lcm_lora: expected a .safetensors file, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"lcm_lora: {path} is missing (LCM-LoRA pytorch_lora_weights.safetensors)")
    return load_file(path)


def lcm_scheduler(config: Mapping[str, Any]) -> LCMScheduler:
    """An LCMScheduler on the noise schedule of a scheduler config (e.g. SD 1.5's PNDM one)."""
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters)
    return LCMScheduler.from_config({k: v for k, v in config.items() if k in accepted})


def load_lcm_lora(path: str | Path, unet: torch.nn.Module, scale: float = 1.0) -> list[LoraFactor]:
    """Read an LCM-LoRA file and fuse it into `unet` in place; returns the factors that were fused."""
    factors = parse_lora(read_lora(path), unet)
    if not factors:
        raise ValueError(f"lcm_lora: {path} holds no LoRA factors")
    fuse_lora(unet, factors, scale)
    return factors


def lcm_denoise(
    scheduler: LCMScheduler, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor
) -> torch.Tensor:
    """The consistency model's clean latent at `timestep`: LCMScheduler.step's `denoised`, drawing nothing.

    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) for epsilon prediction (x0 = the output for
    "sample", sqrt(abar_t) x_t - sqrt(1 - abar_t) v for "v_prediction"), clipped as the config says,
    then denoised = c_out(t) x0 + c_skip(t) x_t with the scheduler's boundary-condition scalings.
    Same tensors in, same arithmetic in the same order as the scheduler's step: [B, C, h, w].
    """
    config = scheduler.config
    if config.thresholding:
        raise ValueError("scheduler: dynamic thresholding is not supported in LCM sampling here")
    alpha = scheduler.alphas_cumprod[timestep]  # abar_t, float32 scalar
    beta = 1 - alpha
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
    if config.prediction_type == "epsilon":
        x0 = (sample - beta.sqrt() * model_output) / alpha.sqrt()
    elif config.prediction_type == "sample":
        x0 = model_output
    elif config.prediction_type == "v_prediction":
        x0 = alpha.sqrt() * sample - beta.sqrt() * model_output
    else:
        raise ValueError(f"scheduler: prediction_type {config.prediction_type!r} is not one LCM supports")
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return c_out * x0 + c_skip * sample  # [B, C, h, w]


def lcm_renoise(
    scheduler: LCMScheduler, denoised: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | int
) -> torch.Tensor:
    """The clean latent taken forward to `timestep`: sqrt(abar) * denoised + sqrt(1 - abar) * noise.

    abar is the scheduler's cumulative alpha at `timestep` (its final alpha for a negative one), in
    float32, as LCMScheduler.step computes its next sample; `noise` is like `denoised`: [B, C, h, w].
    """
    alpha = scheduler.alphas_cumprod[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod
    return alpha.sqrt() * denoised + (1 - alpha).sqrt() * noise  # [B, C, h, w]
