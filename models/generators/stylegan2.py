"""StyleGAN2 generator (Karras et al., CVPR 2020) that loads rosinality/stylegan2-pytorch checkpoints.

Checkpoint format: a `torch.save`d dict with "g_ema" (the generator's state dict, rosinality's key
names and shapes) and "latent_avg" (the mean W latent, [D] or [1, D]); other entries ("g", "d",
optimiser states) are ignored. Files are read with `torch.load(weights_only=True)` only: a file
that needs full unpickling (code objects, argparse namespaces) is refused. See docs/stylegan2.md
for converting NVIDIA's .pkl files offline.

    z [B, D] --mapping--> w [B, D] --truncate(psi)--> w --synthesis--> image [B, 3, S, S] in ~[-1, 1]

`synthesis` takes W ([B, D], the same w for every layer) or W+ ([B, n_latent, D]). Noise is the
checkpoint's constant `noises.noise_i` by default, so the image is a function of the latent and
the graph is differentiable in z, w and W+ (Langevin and DisCo optimise latents through it).
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from models.generators.stylegan2_ops import (
    ConstantInput,
    EqualLinear,
    PixelNorm,
    StyledConv,
    ToRGB,
    make_blur_kernel,
)
from models.seeding import Stream, portable, seeded_construction

CHECKPOINT_FILE = "stylegan2.pt"  # the checkpoint's name inside a StyleGAN2 model directory
NoiseMode = Literal["const", "random"]
# rosinality's channel table: resolution -> channels, before the channel multiplier of the
# resolutions >= 64 (64: 256 * m, 128: 128 * m, ...).
_BASE_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}


@dataclass(frozen=True)
class StyleGAN2Config:
    size: int  # output side in pixels, a power of two >= 8
    style_dim: int = 512  # z and w width
    n_mlp: int = 8  # mapping network layers (style.1 .. style.n_mlp)
    channel_multiplier: int = 2  # widens the >= 64 px layers; config-f and rosinality's FFHQ 256 use 2
    blur_kernel: tuple[float, ...] = (1, 3, 3, 1)  # 1-D FIR taps of the up-sampling filter
    lr_mlp: float = 0.01  # equalised-learning-rate multiplier of the mapping network
    # Channels at 4, 8, ..., size px, overriding the table; only tiny presets set it (None = the table).
    channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size: must be a power of two >= 8, got {self.size}")
        if self.channels is None and self.size > 1024:
            raise ValueError(f"size: rosinality's channel table stops at 1024, got {self.size}")
        if self.channels is not None and (len(self.channels) != self.log_size - 1 or min(self.channels) < 1):
            raise ValueError(
                f"channels: expected {self.log_size - 1} positive widths (4 .. {self.size} px), "
                f"got {self.channels}"
            )
        if self.style_dim < 1 or self.n_mlp < 1 or self.channel_multiplier < 1:
            raise ValueError(
                f"style_dim, n_mlp, channel_multiplier: must be >= 1, got "
                f"{self.style_dim}, {self.n_mlp}, {self.channel_multiplier}"
            )
        if len(self.blur_kernel) < 2 or min(self.blur_kernel) < 0 or sum(self.blur_kernel) <= 0:
            raise ValueError(f"blur_kernel: expected >= 2 non-negative taps, got {self.blur_kernel}")
        if not self.lr_mlp > 0:
            raise ValueError(f"lr_mlp: must be > 0, got {self.lr_mlp}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def n_latent(self) -> int:
        """W+ rows: two per resolution from 8 px up, plus conv1 and to_rgb1 at 4 px."""
        return 2 * self.log_size - 2

    @property
    def num_layers(self) -> int:
        """Styled convolutions, each with one noise buffer (noises.noise_0 .. noise_{num_layers - 1})."""
        return 2 * (self.log_size - 2) + 1

    def channel_table(self) -> dict[int, int]:
        """Resolution (4, 8, ..., size) -> channels."""
        sizes = [2**i for i in range(2, self.log_size + 1)]
        if self.channels is not None:
            return dict(zip(sizes, self.channels))
        m = self.channel_multiplier
        return {s: _BASE_CHANNELS[s] * (m if s >= 64 else 1) for s in sizes}


CONFIG_256 = StyleGAN2Config(size=256)  # rosinality's FFHQ 256 px checkpoint (train.py defaults)
CONFIG_1024 = StyleGAN2Config(size=1024)  # NVIDIA's stylegan2-ffhq-config-f, converted
# The tiny preset: real architecture, 32 px, narrow; for tests and the service's tiny generator.
CONFIG_TINY = StyleGAN2Config(size=32, style_dim=64, n_mlp=2, channels=(32, 32, 16, 16))


class StyleGAN2Generator(nn.Module):
    """rosinality's `Generator` layout; `state_dict()` has exactly a checkpoint's "g_ema" keys."""

    def __init__(self, config: StyleGAN2Config) -> None:
        super().__init__()
        self.config = config
        d, taps, ch = config.style_dim, config.blur_kernel, config.channel_table()
        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(d, d, lr_mul=config.lr_mlp, activate=True) for _ in range(config.n_mlp)],
        )
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], d, blur_taps=taps)
        self.to_rgb1 = ToRGB(ch[4], d, upsample=False, blur_taps=taps)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_ch = ch[4]
        for i in range(3, config.log_size + 1):
            out_ch = ch[2**i]
            self.convs.append(StyledConv(in_ch, out_ch, d, upsample=True, blur_taps=taps))
            self.convs.append(StyledConv(out_ch, out_ch, d, blur_taps=taps))
            self.to_rgbs.append(ToRGB(out_ch, d, blur_taps=taps))
            in_ch = out_ch
        self.noises = nn.Module()
        for i in range(config.num_layers):
            side = 2 ** ((i + 5) // 2)  # 4, 8, 8, 16, 16, ...
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, side, side))
        # The truncation centre; not part of "g_ema" (the checkpoint stores it beside it).
        self.latent_avg: torch.Tensor
        self.register_buffer("latent_avg", torch.zeros(d), persistent=False)  # [D]

    @property
    def device(self) -> torch.device:
        return self.input.input.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input.input.dtype

    @property
    def image_size(self) -> int:
        return self.config.size

    @property
    def style_dim(self) -> int:
        return self.config.style_dim

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D] -> w [B, D] (PixelNorm, then n_mlp equalised linear layers with leaky ReLU)."""
        if z.ndim != 2 or z.shape[1] != self.style_dim:
            raise ValueError(f"z: expected [B, {self.style_dim}], got {tuple(z.shape)}")
        return self.style(z.to(self.device, self.dtype))  # [B, D]

    def truncate(self, w: torch.Tensor, psi: float) -> torch.Tensor:
        """latent_avg + psi (w - latent_avg) for W [B, D] or W+ [B, L, D]; psi 1 returns w itself."""
        if not math.isfinite(psi) or psi < 0:
            raise ValueError(f"psi: must be a finite number >= 0, got {psi}")
        if w.ndim not in (2, 3) or w.shape[-1] != self.style_dim:
            raise ValueError(
                f"w: expected [B, {self.style_dim}] or [B, L, {self.style_dim}], got {tuple(w.shape)}"
            )
        if psi == 1:
            return w
        avg = self.latent_avg.to(w.device, w.dtype)  # [D]
        return avg + psi * (w - avg)

    def _layer_noise(
        self, batch: int, noise_mode: NoiseMode, generator: Stream | None
    ) -> list[torch.Tensor]:
        """One noise map per styled conv: the constant buffers, or fresh N(0, 1) from `generator`."""
        const = [getattr(self.noises, f"noise_{i}") for i in range(self.config.num_layers)]  # [1, 1, r, r]
        if noise_mode == "const":
            return const
        assert generator is not None
        drawn = [  # [B, 1, r, r] each
            generator.normal(batch, *c.shape[1:]) for c in const
        ]
        return [x.to(self.device, self.dtype) for x in drawn]

    def synthesis(
        self, ws: torch.Tensor, noise_mode: NoiseMode = "const", generator: Stream | None = None
    ) -> torch.Tensor:
        """Images [B, 3, S, S] (about [-1, 1]) from W [B, D] or W+ [B, n_latent, D].

        noise_mode "const" uses the checkpoint's noise buffers (no generator); "random" draws the
        noise from `generator` (required: nothing here uses the global RNG), on its device.
        """
        d, n = self.style_dim, self.n_latent
        if ws.ndim == 2 and ws.shape[1] == d:
            ws = ws[:, None, :].expand(-1, n, -1)  # [B, L, D]
        elif not (ws.ndim == 3 and ws.shape[1:] == (n, d)):
            raise ValueError(f"ws: expected [B, {d}] or [B, {n}, {d}], got {tuple(ws.shape)}")
        if noise_mode not in ("const", "random"):
            raise ValueError(f"noise_mode: must be 'const' or 'random', got {noise_mode!r}")
        if (noise_mode == "random") != (generator is not None):
            raise ValueError(
                f"generator: required with noise_mode 'random' and only then (got {noise_mode!r})"
            )
        ws = ws.to(self.device, self.dtype)
        noise = self._layer_noise(ws.shape[0], noise_mode, generator)
        x = self.input(ws.shape[0])  # [B, C, 4, 4]
        x = self.conv1(x, ws[:, 0], noise[0])
        image = self.to_rgb1(x, ws[:, 1])  # [B, 3, 4, 4]
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1  # W+ row of the up-sampling conv; the next conv and to_rgb use i + 1, i + 2
            x = self.convs[2 * k](x, ws[:, i], noise[i])  # [B, C, 2r, 2r]
            x = self.convs[2 * k + 1](x, ws[:, i + 1], noise[i + 1])
            image = to_rgb(x, ws[:, i + 2], image)  # [B, 3, 2r, 2r]
        return image

    def forward(
        self,
        z: torch.Tensor,
        truncation_psi: float = 1.0,
        noise_mode: NoiseMode = "const",
        generator: Stream | None = None,
    ) -> torch.Tensor:
        """synthesis(truncate(mapping(z), psi)): z [B, D] -> images [B, 3, S, S]."""
        return self.synthesis(self.truncate(self.mapping(z), truncation_psi), noise_mode, generator)

    @torch.no_grad()
    def render(
        self,
        latents: torch.Tensor,
        *,
        space: Literal["z", "w"] = "z",
        truncation_psi: float = 1.0,
        noise_mode: NoiseMode = "const",
        generator: Stream | None = None,
    ) -> torch.Tensor:
        """uint8 images [B, S, S, 3] on the CPU from z [B, D] (space "z") or W / W+ (space "w")."""
        if space == "z":
            ws = self.mapping(latents)  # [B, D]
        elif space == "w":
            ws = latents
        else:
            raise ValueError(f"space: must be 'z' or 'w', got {space!r}")
        images = self.synthesis(self.truncate(ws, truncation_psi), noise_mode, generator)  # [B, 3, S, S]
        images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()  # [B, S, S, 3]

    @classmethod
    def from_checkpoint(
        cls,
        file: str | Path,
        config: StyleGAN2Config,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> StyleGAN2Generator:
        """Load a rosinality checkpoint's "g_ema" and "latent_avg" (weights_only), frozen, in eval mode.

        Raises ValueError naming each missing, unexpected or misshapen "g_ema" key, a blur kernel
        that is not `config.blur_kernel`'s, a missing or misshapen "latent_avg", and a file that
        `weights_only` loading refuses.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: must be a floating-point dtype, got {dtype}")
        g_ema, latent_avg = read_checkpoint(file)
        with torch.device("meta"):
            model = cls(config)  # shapes only: nothing allocated, no RNG drawn
        check_state_dict(g_ema, model.state_dict(), config)
        d = config.style_dim
        if not isinstance(latent_avg, torch.Tensor) or tuple(latent_avg.shape) not in ((d,), (1, d)):
            raise ValueError(
                f"file: 'latent_avg' must be a tensor of shape [{d}] or [1, {d}], got {_describe(latent_avg)}"
            )
        model.load_state_dict(g_ema, strict=True, assign=True)
        model.latent_avg = latent_avg.reshape(d).float().clone()
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def read_checkpoint(file: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """("g_ema", "latent_avg") of a checkpoint, read with weights_only=True; other entries are ignored."""
    try:
        ckpt = torch.load(Path(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [
            ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Check the doc")
        ]
        raise ValueError(
            f"file: {file} is refused: weights_only loading failed ({lines[-1] if lines else e}); "
            "files that need full unpickling are never loaded at run time, convert them offline "
            "as in docs/stylegan2.md"
        ) from e
    except RuntimeError as e:
        raise ValueError(f"file: {file} is not a readable torch checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("g_ema"), dict):
        raise ValueError(f"file: {file} must hold a dict with a 'g_ema' state dict")  # noqa: TRY004
    if "latent_avg" not in ckpt:
        raise ValueError(f"file: {file} has no 'latent_avg' (add it offline, see docs/stylegan2.md)")
    return ckpt["g_ema"], ckpt["latent_avg"]


def _describe(value: Any) -> str:
    """A tensor's shape, or a non-tensor's type name, for error messages."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_state_dict(
    given: dict[str, Any], expected: dict[str, torch.Tensor], config: StyleGAN2Config
) -> None:
    """ValueError naming every missing, unexpected or misshapen key, or wrong blur kernel values."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshapen = [
        f"{k} {_describe(v)} (expected {tuple(expected[k].shape)})"
        for k, v in given.items()
        if k in expected
        and not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == expected[k].shape)
    ]
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if keys
    ]
    if problems:
        raise ValueError(f"g_ema: keys do not match a StyleGAN2 of {config}: " + "; ".join(problems))
    kernel = make_blur_kernel(config.blur_kernel, gain=4.0)  # every generator FIR is 2x up-sampling
    wrong = [
        k for k in given if k.endswith(".kernel") and not torch.allclose(given[k].float(), kernel, atol=1e-6)
    ]
    if wrong:
        raise ValueError(f"g_ema: kernels do not match blur_kernel {config.blur_kernel}: {', '.join(wrong)}")


def build_tiny(path: str | Path, seed: int = 0, config: StyleGAN2Config = CONFIG_TINY) -> Path:
    """Write a tiny checkpoint, {"g_ema", "latent_avg"}, to `path / CHECKPOINT_FILE`; returns `path`.

    Random weights from `seed` (global RNG untouched); biases, noise strengths and modulation
    biases are perturbed away from rosinality's zero / one initialisation so that every parameter
    matters, and latent_avg is the mean of mapping(z) over 4096 z. Byte-identical for a given
    seed, config and torch version: the file is written through a handle, so the zip's archive
    name is always "archive" (torch.save to a path names it after the file), zip timestamps are
    fixed and the serialization id is derived from the content.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with seeded_construction(seed), torch.no_grad():
        model = StyleGAN2Generator(config)
        for name, p in model.named_parameters():
            if name.endswith("modulation.bias"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(("bias", "noise.weight")):
                p.copy_(0.2 * torch.randn_like(p))
        z = torch.randn(4096, config.style_dim)  # [4096, D]
        # float64 and rounded: the mean's bytes must not depend on threads or CPU (`portable`)
        latent_avg = portable(model.double().mapping(z.double()).mean(0))  # [D]
        model.float()
    with open(path / CHECKPOINT_FILE, "wb") as f:
        torch.save({"g_ema": model.state_dict(), "latent_avg": latent_avg}, f)
    return path
