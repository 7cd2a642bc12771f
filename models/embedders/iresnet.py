"""iResNet face embedder with insightface `arcface_torch` module and parameter names.

A state dict saved from `arcface_torch.backbones.iresnet` (r18/r34/r50/r100, `backbone.pth`
converted to safetensors) loads into `IResNetEmbedder` as is: conv1, bn1, prelu, layer1..layer4
of IBasicBlock (bn1, conv1, bn2, prelu, conv2, bn3, downsample), bn2, dropout, fc, features.
A model directory holds `config.json` (the `IResNetConfig` fields) and `model.safetensors`.
Inputs are RGB crops aligned to the ArcFace 112x112 template, scaled to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.seeding import make_generator, seeded_construction

CONFIG_FILE = "config.json"  # the IResNetConfig fields, as JSON
WEIGHTS_FILE = "model.safetensors"  # a plain state dict with arcface_torch key names
BN_EPS = 1e-5  # BatchNorm epsilon, as in arcface_torch


@dataclass(frozen=True)
class IResNetConfig:
    # IBasicBlocks per stage: r18 (2,2,2,2), r34 (3,4,6,3), r50 (3,4,14,3), r100 (3,13,30,3)
    layers: tuple[int, ...] = (2, 2, 2, 2)
    base_width: int = 64  # channels of stage 1; stages have 1x, 2x, 4x, 8x this (64 in the published nets)
    embedding_dim: int = 512  # output features
    input_size: int = 112  # input height = width in pixels; a multiple of 16 (four stride-2 stages)
    dropout: float = 0.0  # dropout before fc (training only)

    def __post_init__(self) -> None:
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(f"layers: expected four stage depths >= 1, got {self.layers}")
        if self.input_size % 16:
            raise ValueError(f"input_size: must be a multiple of 16, got {self.input_size}")
        if self.base_width < 1 or self.embedding_dim < 1:
            raise ValueError(
                f"base_width, embedding_dim: must be >= 1, got {self.base_width}, {self.embedding_dim}"
            )


TINY_CONFIG = IResNetConfig(layers=(1, 1, 1, 1), base_width=8)  # the iresnet-tiny preset


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN, + shortcut."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def make_stage(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    """`blocks` IBasicBlocks; the first halves the resolution and projects the shortcut."""
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride=2, bias=False),
        nn.BatchNorm2d(planes, eps=BN_EPS),
    )
    return nn.Sequential(
        IBasicBlock(inplanes, planes, stride=2, downsample=downsample),
        *(IBasicBlock(planes, planes) for _ in range(blocks - 1)),
    )


class IResNetEmbedder(nn.Module):
    """Face images [B, 3, S, S] in [-1, 1] -> unit-norm identity embeddings [B, embedding_dim]."""

    def __init__(self, config: IResNetConfig = IResNetConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.base_width
        self.conv1 = nn.Conv2d(3, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w, eps=BN_EPS)
        self.prelu = nn.PReLU(w)
        self.layer1 = make_stage(w, w, config.layers[0])
        self.layer2 = make_stage(w, 2 * w, config.layers[1])
        self.layer3 = make_stage(2 * w, 4 * w, config.layers[2])
        self.layer4 = make_stage(4 * w, 8 * w, config.layers[3])
        self.bn2 = nn.BatchNorm2d(8 * w, eps=BN_EPS)
        self.dropout = nn.Dropout(p=config.dropout)
        side = config.input_size // 16
        self.fc = nn.Linear(8 * w * side * side, config.embedding_dim)
        self.features = nn.BatchNorm1d(config.embedding_dim, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)  # frozen at 1 in arcface_torch

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The un-normalised features of arcface_torch's `IResNet.forward`: [B, 3, S, S] -> [B, D]."""
        s = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"x: expected [B, 3, {s}, {s}], got {tuple(x.shape)}")
        x = self.prelu(self.bn1(self.conv1(x)))  # [B, w, S, S]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 8w, S/16, S/16]
        x = torch.flatten(self.bn2(x), 1)  # [B, 8w * (S/16)^2]
        return self.features(self.fc(self.dropout(x)))  # [B, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of images [B, 3, S, S] in [-1, 1]: [B, D] (differentiable)."""
        return nn.functional.normalize(self.forward_features(x), dim=1)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings of uint8 RGB images [B, S, S, 3]: [B, D] float32 on the CPU."""
        s = self.config.input_size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
            raise ValueError(
                f"images: expected uint8 [B, {s}, {s}, 3], got {images.dtype} {tuple(images.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        param = next(self.parameters())
        out = []
        for chunk in images.split(batch_size):
            x = chunk.to(param.device).permute(0, 3, 1, 2).to(param.dtype)  # [b, 3, S, S]
            out.append(self(x / 127.5 - 1.0).float().cpu())  # [b, D]
        self.train(was_training)
        if not out:
            return torch.empty(0, self.embedding_dim)
        return torch.cat(out)  # [B, D]

    def load_arcface_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load an arcface_torch state dict; only BatchNorm `num_batches_tracked` may be missing."""
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(f"state: missing keys {missing}, unexpected keys {result.unexpected_keys}")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> IResNetEmbedder:
        """Load `config.json` + `model.safetensors` from a model directory, in eval mode."""
        path = Path(path)
        fields = json.loads((path / CONFIG_FILE).read_text("utf-8"))
        fields["layers"] = tuple(fields["layers"])
        model = cls(IResNetConfig(**fields))
        model.load_arcface_state_dict(load_file(path / WEIGHTS_FILE))
        return model.to(device).eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (contiguous CPU tensors) to `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.config)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / WEIGHTS_FILE, metadata={"format": "pt"})


def build_tiny(path: str | Path, seed: int = 0, config: IResNetConfig = TINY_CONFIG) -> Path:
    """Build the tiny preset from `seed` (global RNG untouched) and save it to `path`.

    Random weights with unit BatchNorm statistics; the running statistics are then set from
    one pass over seeded random inputs so that eval-mode features are not degenerate.
    """
    with seeded_construction(seed):
        model = IResNetEmbedder(config)
    s = config.input_size
    calibrate_batchnorm(model, torch.rand(32, 3, s, s, generator=make_generator(seed)) * 2 - 1)
    model.save_pretrained(path)
    return Path(path)


@torch.no_grad()
def calibrate_batchnorm(model: IResNetEmbedder, inputs: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to the batch statistics of `inputs` [B, 3, S, S]."""
    saved = {m: m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for m in saved:
        m.momentum = 1.0  # running stats := this batch's stats
    model.train()
    model.forward_features(inputs)
    for m, value in saved.items():
        m.momentum = value
    model.eval()
