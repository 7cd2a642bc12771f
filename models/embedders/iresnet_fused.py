"""The fused inference copy of an iResNet (`IResNetEmbedder.fused()`): the same function, built for
fast gradients with respect to the input, as latent-space samplers need (weights are constants).

  - An eval-mode BatchNorm after a conv is folded into that conv's weights and bias, exactly (the
    BN acts after the zero padding); so are the input scaling (127.5 / input_std) into the first
    conv and bn2 -> flatten -> fc -> features into one linear layer.
  - A BatchNorm before a zero-padded conv (each block's bn1) stays a per-channel multiply-add:
    folded into the conv, its shift would reach the padded border, where the original sees zeros.
  - Each block's backward is written out (`_InputGrad`): convolution input-gradients through the
    channels_last weights (bn1's scale folded into conv1's, so the affine costs no backward pass),
    and PReLU's input gradient in three vectorised passes. Autograd would keep every intermediate
    and run BatchNorm's and PReLU's backward kernels, which also form the weights' gradients.
  - Activations are channels_last (oneDNN's fast layout on the CPU).

Values match the plain model to rounding: ~1e-15 relative in float64, ~1e-6 in float32 (an input
gradient can differ more where a PReLU input lies within rounding of 0 and takes the other slope,
in either model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.embedders.iresnet import IBasicBlock, IResNetEmbedder


@torch.no_grad()
def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] in float64 of an eval-mode BatchNorm: bn(x) = scale x + shift."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _conv_buffers(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype,
                  gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """bn(conv(gain x)) as one conv, (weight channels_last, bias). Exact: the BN acts after the
    zero padding, and the padding is unchanged by the gain. (iResNet's convs have no bias.)"""
    scale, shift = _bn_affine(bn)
    weight = conv.weight.detach().double() * (scale * gain)[:, None, None, None]  # [O, I, k, k]
    return weight.to(dtype).contiguous(memory_format=torch.channels_last), shift.to(dtype)


def _conv_input_grad(grad: torch.Tensor, weight: torch.Tensor, like: torch.Tensor, stride: int,
                     padding: int) -> torch.Tensor:
    """The input gradient of conv2d(x, weight, stride, padding) for an x shaped like `like`."""
    return torch.ops.aten.convolution_backward(grad, like, weight, None, (stride, stride), (padding, padding),
                                               (1, 1), False, (0, 0), 1, (True, False, False))[0]


def _prelu_input_grad(grad: torch.Tensor, x: torch.Tensor, slope: torch.Tensor, *, own: bool = False) -> torch.Tensor:
    """PReLU's input gradient, g where x > 0 else a g, as g (x > 0) + a (g - g (x > 0)): exact (each
    element takes g or a g), three vectorised passes and one new tensor when `own` (grad is ours to
    overwrite). PReLU's own backward kernel also forms the slope's gradient, several times slower."""
    positive = torch.ops.aten.threshold_backward(grad, x, 0)  # g where x > 0, else 0
    negative = grad.sub_(positive) if own else grad.sub(positive)  # g where x <= 0, else 0
    return positive.addcmul_(negative, slope[:, None, None])


class _Stem(nn.Module):
    """conv1 (+ input scaling) with bn1 folded, then PReLU."""

    def __init__(self, model: IResNetEmbedder, dtype: torch.dtype) -> None:
        super().__init__()
        weight, bias = _conv_buffers(model.conv1, model.bn1, dtype, gain=127.5 / model.config.input_std)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("slope", model.prelu.weight.detach().to(dtype).clone())  # [C]

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the PReLU's input)."""
        pre = nn.functional.conv2d(x, self.weight, self.bias, 1, 1)  # [B, w, S, S]
        return nn.functional.prelu(pre, self.slope), pre

    def input_grad(self, grad: torch.Tensor, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        return _conv_input_grad(_prelu_input_grad(grad, pre, self.slope), self.weight, x, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _InputGrad.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.run(x)[0]


class _Block(nn.Module):
    """IBasicBlock: bn1 as a per-channel affine (it precedes a zero-padded conv, so folding it into
    conv1 would not be exact at the border), bn2 folded into conv1, bn3 into conv2, the shortcut's
    BN into its conv."""

    def __init__(self, block: IBasicBlock, dtype: torch.dtype) -> None:
        super().__init__()
        scale, shift = _bn_affine(block.bn1)
        self.register_buffer("scale", scale.to(dtype)[:, None, None])  # [C, 1, 1]
        self.register_buffer("shift", shift.to(dtype)[:, None, None])  # [C, 1, 1]
        w1, b1 = _conv_buffers(block.conv1, block.bn2, dtype)
        self.register_buffer("w1", w1)
        self.register_buffer("b1", b1)
        # conv1's weights times bn1's scale along the input channels: the affine's and conv1's
        # input gradients in one convolution
        self.register_buffer("w1_in", (w1.double() * scale[None, :, None, None]).to(dtype)
                             .contiguous(memory_format=torch.channels_last))
        self.register_buffer("slope", block.prelu.weight.detach().to(dtype).clone())  # [C]
        w2, b2 = _conv_buffers(block.conv2, block.bn3, dtype)
        self.register_buffer("w2", w2)
        self.register_buffer("b2", b2)
        self.stride = block.conv2.stride[0]
        ds = block.downsample
        self.shortcut = ds is not None  # a strided 1x1 conv and BN; else the identity
        if ds is not None:
            wd, bd = _conv_buffers(ds[0], ds[1], dtype)
            self.register_buffer("wd", wd)
            self.register_buffer("bd", bd)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the PReLU's input)."""
        pre = nn.functional.conv2d(torch.addcmul(self.shift, x, self.scale), self.w1, self.b1, 1, 1)  # [B, C, H, W]
        out = nn.functional.conv2d(nn.functional.prelu(pre, self.slope), self.w2, self.b2, self.stride, 1)  # [B, C, H/s, W/s]
        if self.shortcut:
            return out.add_(nn.functional.conv2d(x, self.wd, self.bd, self.stride)), pre
        return out.add_(x), pre

    def input_grad(self, grad: torch.Tensor, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        g = _conv_input_grad(grad, self.w2, pre, self.stride, 1)  # through conv2
        g = _prelu_input_grad(g, pre, self.slope, own=True)
        g = _conv_input_grad(g, self.w1_in, x, 1, 1)  # through conv1 and bn1
        if self.shortcut:
            return g.add_(_conv_input_grad(grad, self.wd, x, self.stride, 0))
        return g.add_(grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _InputGrad.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.run(x)[0]


class _InputGrad(torch.autograd.Function):
    """A stem or block with its backward written out: input gradients only (the weights are
    constants), through convolution input-gradients and PReLU masks. It keeps only the PReLU's
    input, where autograd would keep every intermediate."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: _Stem | _Block) -> torch.Tensor:
        out, pre = layer.run(x)
        ctx.layer, ctx.shape = layer, x.shape
        ctx.save_for_backward(pre)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (pre,) = ctx.saved_tensors
        # x's shape and layout, without keeping x (an input gradient reads only the input's sizes)
        like = torch.empty(ctx.shape, dtype=pre.dtype, device=pre.device, memory_format=torch.channels_last)
        return ctx.layer.input_grad(grad.contiguous(memory_format=torch.channels_last), like, pre), None


class FusedIResNet(nn.Module):
    """`IResNetEmbedder.fused()`: the same map, images [B, 3, S, S] in [-1, 1] -> unit embeddings [B, D],
    with folded BatchNorms, written-out input gradients and channels_last activations. Inference only."""

    differentiable = True  # gradients w.r.t. the input (the weights are constants here)

    def __init__(self, model: IResNetEmbedder) -> None:
        super().__init__()
        self.config = config = model.config
        self.trunk_dtype, self.head_dtype = model.conv1.weight.dtype, model.fc.weight.dtype
        self.stem = _Stem(model, self.trunk_dtype)
        stages = (model.layer1, model.layer2, model.layer3, model.layer4)
        self.blocks = nn.Sequential(*(_Block(b, self.trunk_dtype) for stage in stages for b in stage))
        # bn2 -> flatten -> (dropout: the identity in eval mode) -> fc -> features, as one linear
        # layer, its columns in the (y, x, channel) order of a flattened channels_last tensor
        with torch.no_grad():
            side, c, e = config.input_size // 16, 8 * config.base_width, config.embedding_dim
            s2, t2 = _bn_affine(model.bn2)  # [C]
            sf, tf = _bn_affine(model.features)  # [E]
            fc = model.fc.weight.double().reshape(e, c, side, side)  # [E, C, s, s]
            bias = (fc * t2[None, :, None, None]).sum(dim=(1, 2, 3)) + model.fc.bias.double()  # [E]
            weight = (fc * s2[None, :, None, None]).permute(0, 2, 3, 1).reshape(e, -1)  # [E, s s C]
            self.register_buffer("head_weight", (weight * sf[:, None]).to(self.head_dtype))
            self.register_buffer("head_bias", (bias * sf + tf).to(self.head_dtype))

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [B, D] of images [B, 3, S, S] in [-1, 1]."""
        s = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"x: expected [B, 3, {s}, {s}], got {tuple(x.shape)}")
        x = x.to(self.trunk_dtype).contiguous(memory_format=torch.channels_last)
        x = self.blocks(self.stem(x))  # [B, 8w, S/16, S/16]
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1).to(self.head_dtype)  # [B, (S/16)^2 8w]
        return nn.functional.normalize(nn.functional.linear(x, self.head_weight, self.head_bias), dim=1)
