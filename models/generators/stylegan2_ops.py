"""StyleGAN2 building blocks in plain torch, laid out as rosinality/stylegan2-pytorch's `model.py`.

Module and parameter names (`conv.weight`, `conv.modulation.bias`, `noise.weight`, `activate.bias`,
`blur.kernel`, ...) and parameter shapes are those of rosinality's checkpoints, so a `g_ema` state
dict loads as is. No custom CUDA extensions: `upfirdn2d` is a zero-insertion upsample, a pad and a
depthwise convolution; the fused leaky ReLU is bias + leaky ReLU(0.2) + a sqrt(2) gain.

Equalised learning rate: weights are stored as N(0, 1) / lr_mul and scaled at run time by
lr_mul / sqrt(fan_in); biases are stored divided by lr_mul (the mapping network's lr_mul is 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2  # negative slope of StyleGAN2's leaky ReLU
LRELU_GAIN = math.sqrt(2.0)  # gain after the leaky ReLU, keeps the activations' second moment
DEMOD_EPS = 1e-8  # added to the squared weight norm before the demodulation rsqrt
PIXELNORM_EPS = 1e-8  # added to the mean square in PixelNorm


def make_blur_kernel(taps: Sequence[float], gain: float = 1.0) -> torch.Tensor:
    """The 2-D FIR kernel outer(taps, taps), normalised to sum 1, times `gain`: [K, K] float32."""
    k = torch.tensor([float(t) for t in taps], dtype=torch.float32)  # [K]
    k2 = k[None, :] * k[:, None]  # [K, K]
    return k2 / k2.sum() * gain


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
):
    """Upsample by zero insertion, pad, convolve with a 2-D FIR `kernel`, keep every `down`-th pixel.

    x: [B, C, H, W]; kernel: [K, K]; pad = (before, after), the same on both axes, negative crops.
    Output side: (H * up + pad[0] + pad[1] - K) // down + 1. This is a true convolution (the
    kernel is flipped), as in StyleGAN2's upfirdn2d.
    """
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))  # [B, C, H, up, W, up], the sample first
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    if p0 < 0 or p1 < 0:
        x = x[:, :, max(-p0, 0) : x.shape[2] - max(-p1, 0), max(-p0, 0) : x.shape[3] - max(-p1, 0)]
    weight = kernel.flip(0, 1).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)  # [C, 1, K, K]
    return F.conv2d(x, weight, stride=down, groups=c)  # [B, C, H', W']


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """leaky_relu(x + bias, 0.2) * sqrt(2), the bias [C] broadcast along dim 1 of x [B, C, ...]."""
    shape = (1, bias.shape[0]) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.reshape(shape), LRELU_SLOPE) * LRELU_GAIN


class PixelNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) along dim 1; no parameters (it is `style.0`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + PIXELNORM_EPS)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate; `activate` adds the fused leaky ReLU."""

    def __init__(
        self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)  # [out, in]
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))  # [out]
        self.scale = lr_mul / math.sqrt(in_dim)  # run-time weight scale
        self.lr_mul = lr_mul  # run-time bias scale
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale)  # [B, out]
        if self.activate:
            return fused_leaky_relu(out, self.bias * self.lr_mul)
        return out + self.bias * self.lr_mul


class FusedLeakyReLU(nn.Module):
    """Per-channel bias, leaky ReLU(0.2) and the sqrt(2) gain (`activate.bias`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))  # [C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class Blur(nn.Module):
    """FIR filter with a fixed kernel buffer (`blur.kernel`), padded by `pad` = (before, after)."""

    def __init__(self, taps: Sequence[float], pad: tuple[int, int], gain: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(taps, gain))  # [K, K]
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling (`upsample.kernel`, the blur kernel times 4): [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, taps: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(taps, gain=4.0))  # [K, K]
        p = len(taps) - 2
        self.pad = ((p + 1) // 2 + 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=2, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (weight [1, out, in, k, k]), optionally demodulated and 2x upsampling.

    Computed as modulate the input, convolve with the shared weight, demodulate the output: the
    same result as rosinality's per-sample grouped convolution, with one ordinary convolution for
    the whole batch. Upsampling is a stride-2 transposed convolution followed by the blur.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_taps: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        if upsample:  # registered before `modulation`, as in rosinality (state-dict order)
            p = (len(blur_taps) - 2) - (kernel_size - 1)
            self.blur = Blur(blur_taps, pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)  # equalised learning rate
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.upsample = upsample

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.modulation(w)  # [B, in]
        weight = self.weight[0] * self.scale  # [out, in, k, k]
        x = x * styles[:, :, None, None]  # [B, in, H, W]
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)  # [B, out, 2H + k - 2, ...]
            out = self.blur(out)  # [B, out, 2H, 2W]
        else:
            out = F.conv2d(x, weight, padding=self.padding)  # [B, out, H, W]
        if self.demodulate:
            # |weight * style|^2 per (sample, output channel) = style^2 @ sum_k weight^2
            norm2 = styles.square() @ weight.square().sum(dim=(2, 3)).t()  # [B, out]
            out = out * torch.rsqrt(norm2 + DEMOD_EPS)[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    """x + strength * noise, one learned strength (`noise.weight`, shape [1])."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # [1]

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise  # noise [1 or B, 1, H, W]


class ConstantInput(nn.Module):
    """The learned 4x4 input (`input.input`, shape [1, C, 4, 4]), repeated over the batch."""

    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))  # [1, C, 4, 4]

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)  # [B, C, 4, 4]


class StyledConv(nn.Module):
    """Modulated 3x3 convolution, noise injection, biased leaky ReLU (`conv`, `noise`, `activate`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        style_dim: int,
        upsample: bool = False,
        blur_taps: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channels, out_channels, 3, style_dim, upsample=upsample, blur_taps=blur_taps
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, w), noise))


class ToRGB(nn.Module):
    """Modulated 1x1 convolution to RGB (not demodulated) plus bias [1, 3, 1, 1], added to the
    2x-upsampled running image `skip` when there is one."""

    def __init__(
        self,
        in_channels: int,
        style_dim: int,
        upsample: bool = True,
        blur_taps: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_taps)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))  # [1, 3, 1, 1]

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias  # [B, 3, H, W]
        if skip is not None:
            out = out + self.upsample(skip)
        return out
