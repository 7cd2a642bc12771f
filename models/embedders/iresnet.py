"""iResNet face embedder with insightface `arcface_torch` module and parameter names.

A state dict saved from `arcface_torch.backbones.iresnet` (r18/r34/r50/r100/r200 `backbone.pth` or
`model.pt`, or the `state_dict_backbone` of a training checkpoint) loads as is: conv1, bn1, prelu,
layer1..layer4 of IBasicBlock (bn1, conv1, bn2, prelu, conv2, bn3, downsample), bn2, dropout, fc,
features. The older port nizhib/pytorch-insightface (`iresnet50-7f187506.pth`, converted from the
MXNet model zoo) uses the very same module names, so its keys need no renaming; what differs is not
in the file: BatchNorm eps 2e-5 and inputs (pixel - 127.5) / 128. `IResNetConfig.from_arch(name,
source="nizhib")` sets both.

Weights load from `.safetensors`, or from `.pth`/`.pt` through `torch.load(weights_only=True)`, which
refuses any pickle that would construct objects other than tensors and plain containers.
A model directory holds `config.json` (the `IResNetConfig` fields) and `model.safetensors`.
Every entry point takes RGB crops aligned to the ArcFace 112x112 template, scaled to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.seeding import build_generator, portable, seeded_construction

if TYPE_CHECKING:
    from models.embedders.iresnet_fused import FusedIResNet

CONFIG_FILE = "config.json"  # the IResNetConfig fields, as JSON
WEIGHTS_FILE = "model.safetensors"  # a plain state dict with arcface_torch key names
BN_EPS = 1e-5  # BatchNorm epsilon, as in arcface_torch
# IBasicBlocks per stage of the published nets (arcface_torch backbones/iresnet.py)
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
# Conventions of each checkpoint family that its weights file does not record
CHECKPOINT_SOURCES: dict[str, dict[str, float]] = {
    "arcface_torch": {"bn_eps": 1e-5, "input_std": 127.5},  # insightface recognition/arcface_torch
    "nizhib": {"bn_eps": 2e-5, "input_std": 128.0},  # nizhib/pytorch-insightface (MXNet zoo ports)
}
STATE_WRAPPERS = ("state_dict_backbone", "state_dict")  # checkpoint keys that hold the backbone's state
LATER_FIELDS = ("bn_eps", "input_std")  # config fields written to config.json only when not the default
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # supported model dtypes


@dataclass(frozen=True)
class IResNetConfig:
    # IBasicBlocks per stage: r18 (2,2,2,2) ... r200 (6,26,60,6); see IRESNET_LAYERS and from_arch
    layers: tuple[int, ...] = (2, 2, 2, 2)
    base_width: int = 64  # channels of stage 1; stages have 1x, 2x, 4x, 8x this (64 in the published nets)
    embedding_dim: int = 512  # output features
    input_size: int = 112  # input height = width in pixels; a multiple of 16 (four stride-2 stages)
    dropout: float = 0.0  # dropout before fc (training only)
    bn_eps: float = BN_EPS  # BatchNorm epsilon: 1e-5 arcface_torch, 2e-5 MXNet-era ports (nizhib)
    input_std: float = 127.5  # the network sees (pixel - 127.5) / input_std: 127.5 arcface_torch, 128 nizhib

    def __post_init__(self) -> None:
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(f"layers: expected four stage depths >= 1, got {self.layers}")
        if self.input_size % 16:
            raise ValueError(f"input_size: must be a multiple of 16, got {self.input_size}")
        if self.base_width < 1 or self.embedding_dim < 1:
            raise ValueError(
                f"base_width, embedding_dim: must be >= 1, got {self.base_width}, {self.embedding_dim}"
            )
        if not self.bn_eps > 0 or not self.input_std > 0:
            raise ValueError(f"bn_eps, input_std: must be > 0, got {self.bn_eps}, {self.input_std}")

    @classmethod
    def from_arch(cls, name: str, *, source: str = "arcface_torch", **fields: Any) -> IResNetConfig:
        """The config of a published net ("r18".."r200") trained or ported by `source`.

        `fields` override the others (base_width, embedding_dim, input_size, dropout).
        """
        if name not in IRESNET_LAYERS:
            raise ValueError(f"name: unknown iResNet {name!r}; known: {sorted(IRESNET_LAYERS)}")
        if source not in CHECKPOINT_SOURCES:
            raise ValueError(f"source: unknown checkpoint source {source!r}; known: {sorted(CHECKPOINT_SOURCES)}")
        return cls(**{"layers": IRESNET_LAYERS[name], **CHECKPOINT_SOURCES[source], **fields})


TINY_CONFIG = IResNetConfig(layers=(1, 1, 1, 1), base_width=8)  # the iresnet-tiny preset


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN, + shortcut."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        eps: float = BN_EPS,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=eps)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=eps)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def make_stage(inplanes: int, planes: int, blocks: int, eps: float = BN_EPS) -> nn.Sequential:
    """`blocks` IBasicBlocks; the first halves the resolution and projects the shortcut."""
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride=2, bias=False),
        nn.BatchNorm2d(planes, eps=eps),
    )
    return nn.Sequential(
        IBasicBlock(inplanes, planes, stride=2, downsample=downsample, eps=eps),
        *(IBasicBlock(planes, planes, eps=eps) for _ in range(blocks - 1)),
    )


class IResNetEmbedder(nn.Module):
    """Face images [B, 3, S, S] in [-1, 1] -> unit-norm identity embeddings [B, embedding_dim]."""

    differentiable = True  # forward() has gradients w.r.t. its input (OnnxEmbedder does not)

    def __init__(self, config: IResNetConfig = IResNetConfig()) -> None:
        super().__init__()
        self.config = config
        w, eps = config.base_width, config.bn_eps
        self.conv1 = nn.Conv2d(3, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w, eps=eps)
        self.prelu = nn.PReLU(w)
        self.layer1 = make_stage(w, w, config.layers[0], eps)
        self.layer2 = make_stage(w, 2 * w, config.layers[1], eps)
        self.layer3 = make_stage(2 * w, 4 * w, config.layers[2], eps)
        self.layer4 = make_stage(4 * w, 8 * w, config.layers[3], eps)
        self.bn2 = nn.BatchNorm2d(8 * w, eps=eps)
        self.dropout = nn.Dropout(p=config.dropout)
        side = config.input_size // 16
        self.fc = nn.Linear(8 * w * side * side, config.embedding_dim)
        self.features = nn.BatchNorm1d(config.embedding_dim, eps=eps)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)  # frozen at 1 in arcface_torch

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The un-normalised features of arcface_torch's `IResNet.forward`: [B, 3, S, S] -> [B, D].

        `x` in [-1, 1] is cast to the trunk's dtype; the features come out in the head's dtype
        (float32 for a float16/bfloat16 trunk, as in arcface_torch's fp16 mode).
        """
        s = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"x: expected [B, 3, {s}, {s}], got {tuple(x.shape)}")
        if self.config.input_std != 127.5:
            x = x * (127.5 / self.config.input_std)  # [B, 3, S, S], (pixel - 127.5) / input_std
        x = x.to(self.conv1.weight.dtype)
        x = self.prelu(self.bn1(self.conv1(x)))  # [B, w, S, S]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 8w, S/16, S/16]
        x = torch.flatten(self.bn2(x), 1)  # [B, 8w * (S/16)^2]
        return self.features(self.fc(self.dropout(x).to(self.fc.weight.dtype)))  # [B, D]

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
        device = self.conv1.weight.device
        out = []
        for chunk in images.split(batch_size):
            x = chunk.to(device, non_blocking=True).permute(0, 3, 1, 2).float()  # [b, 3, S, S]
            out.append(self(x / 127.5 - 1.0).float().cpu())  # [b, D]
        self.train(was_training)
        if not out:
            return torch.empty(0, self.embedding_dim)
        return torch.cat(out)  # [B, D]

    def fused(self) -> FusedIResNet:
        """An inference copy for fast input gradients (`iresnet_fused.FusedIResNet`): the same function.

        Eval-mode BatchNorms folded into the neighbouring conv or linear layer where that is exact
        (a per-channel affine where it is not), each block's input gradient written out (convolution
        input-gradients and PReLU masks; only the PReLU inputs are kept for it), channels_last.
        A snapshot of the current weights; equal to `forward` up to rounding (~1e-6 relative in float32).
        """
        if self.training:
            raise ValueError("fused: the model is in training mode; BatchNorm folding needs .eval()")
        from models.embedders.iresnet_fused import FusedIResNet

        return FusedIResNet(self)

    def load_arcface_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an arcface_torch state dict; only BatchNorm `num_batches_tracked` may be missing.

        A missing, unexpected or misshapen key is a ValueError naming it; nothing is loaded then.
        """
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        check_state(state, expected)
        self.load_state_dict(state, strict=False)
        for name, buffer in self.named_buffers():
            if name.endswith("num_batches_tracked") and name not in state:
                buffer.zero_()

    @classmethod
    def from_checkpoint(
        cls,
        file: str | Path,
        config: IResNetConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> IResNetEmbedder:
        """Load an arcface_torch or nizhib checkpoint (`.safetensors`, `.pth`, `.pt`), in eval mode.

        The trunk runs in `dtype`; fc and features stay float32 for float16/bfloat16 (so outputs
        are float32). Weights are frozen (`requires_grad=False`); forward() keeps its gradient
        w.r.t. the input. The global RNG is untouched: the model is built on the meta device.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype}")
        state = load_state_file(file)
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device).set_precision(dtype)  # then the file's values are cast once
        model.load_arcface_state_dict(state)
        return model.requires_grad_(False).eval()

    def set_precision(self, dtype: torch.dtype) -> IResNetEmbedder:
        """Cast the trunk to `dtype` in place; fc and features to float32 at least (returns self)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype}")
        head_dtype = torch.promote_types(dtype, torch.float32)
        self.to(dtype)
        self.fc.to(head_dtype)
        self.features.to(head_dtype)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> IResNetEmbedder:
        """Load `config.json` + `model.safetensors` from a model directory, in eval mode, weights frozen."""
        path = Path(path)
        fields = json.loads((path / CONFIG_FILE).read_text("utf-8"))
        fields["layers"] = tuple(fields["layers"])
        model = cls(IResNetConfig(**fields))
        model.load_arcface_state_dict(load_file(path / WEIGHTS_FILE))
        return model.to(device).eval().requires_grad_(False)

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (contiguous CPU tensors) to `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.config)
        for field in dataclasses.fields(IResNetConfig):
            if field.name in LATER_FIELDS and config[field.name] == field.default:
                del config[field.name]  # keeps config.json of older models (and its pinned sha256) as it was
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / WEIGHTS_FILE, metadata={"format": "pt"})


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone state dict in a `.safetensors`, `.pth` or `.pt` file, on the CPU.

    Pickles load with `weights_only=True` (tensors and plain containers only; anything else is
    refused with a ValueError). A `state_dict_backbone` / `state_dict` wrapper is unwrapped and a
    DataParallel `module.` prefix on every key is stripped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = load_file(path)
    elif suffix in (".pth", ".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).splitlines()[0]
            raise ValueError(f"path: {path} is not a plain tensor checkpoint; refused: {first}") from e
    else:
        raise ValueError(f"path: expected a .safetensors, .pth or .pt file, got {path.name!r}")
    for key in STATE_WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    items = obj.items() if isinstance(obj, Mapping) else [("<top level>", obj)]
    state = {str(k): v for k, v in items}
    not_tensors = {k: type(v).__name__ for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if not_tensors:
        raise ValueError(f"path: {path} is not a state dict of tensors: {not_tensors}")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _first(names: list[str], n: int = 8) -> list[str]:
    """At most `n` names, then how many more (an r18 file offered to an r100 lacks hundreds)."""
    return names if len(names) <= n else [*names[:n], f"... and {len(names) - n} more"]


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError naming every missing, unexpected or misshapen key (`num_batches_tracked` may be missing)."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k}: expected {expected[k]}, found {tuple(v.shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if misshapen:
        problems.append(f"misshapen keys [{'; '.join(_first(misshapen))}]")
    if problems:
        raise ValueError("state: " + ", ".join(problems))


def tiny_model(seed: int = 0, config: IResNetConfig = TINY_CONFIG) -> IResNetEmbedder:
    """The tiny preset built from `seed` (global RNG untouched), in eval mode.

    Random weights with unit BatchNorm statistics; the running statistics are then set from
    one pass over seeded random inputs so that eval-mode features are not degenerate.
    """
    with seeded_construction(seed):
        model = IResNetEmbedder(config)
    s = config.input_size
    calibrate_batchnorm(model, torch.rand(32, 3, s, s, generator=build_generator(seed)) * 2 - 1)
    return model


def build_tiny(path: str | Path, seed: int = 0, config: IResNetConfig = TINY_CONFIG) -> Path:
    """Build the tiny preset from `seed` and save it to `path` (config.json + model.safetensors)."""
    tiny_model(seed, config).save_pretrained(path)
    return Path(path)


@torch.no_grad()
def calibrate_batchnorm(model: IResNetEmbedder, inputs: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to the batch statistics of `inputs` [B, 3, S, S].

    Computed in float64 and rounded (`portable`), so the preset's bytes, and their pin, do not
    depend on the thread count or the CPU.
    """
    dtype = next(model.parameters()).dtype
    saved = {m: m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for m in saved:
        m.momentum = 1.0  # running stats := this batch's stats
    model.double().train()
    model.forward_features(inputs.double())
    for m, value in saved.items():
        m.momentum = value
        m.running_mean.copy_(portable(m.running_mean))
        m.running_var.copy_(portable(m.running_var))
    model.to(dtype).eval()
