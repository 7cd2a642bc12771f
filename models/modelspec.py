"""What the registry knows about a model: its kind, family, config, files and their pins."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

ModelKind = Literal["generator", "embedder"]
# How generated images are cropped to the embedder's 112x112 input: "center" = a fixed centre
# crop (tiny presets, whose images are not faces); "landmarks" = YuNet five-point alignment to
# the ArcFace template (diffusion output); "ffhq" = the fixed FFHQ crop (StyleGAN output).
Alignment = Literal["center", "landmarks", "ffhq"]
Device = str | torch.device


class ModelUnavailable(Exception):
    """A model's weights are missing, unpinned, or do not match their pinned sha256."""

    code = "model_unavailable"  # the job error code a job fails with

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class HubFile:
    """Where a published file lives on the Hugging Face Hub, for `idforge models fetch` (an operator's
    command; nothing reads this at run time)."""

    repo: str  # the model repository, "owner/name"
    path: str  # the file's path inside the repository
    revision: str  # the 40-hex commit it is fetched at ("main" only where no commit is known)


@dataclass(frozen=True)
class WeightFile:
    sha256: str | None  # pinned hex sha256; None = to be pinned in the operator's registry file
    what: str  # what the file is and where it is published, for "missing file" messages
    optional: bool = False  # absent is fine (e.g. LCM-LoRA weights); present means pinned and used
    source: HubFile | None = None  # its Hugging Face home; None = placed by hand (no Hub copy)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # catalogue name, as in app/catalog.py
    kind: ModelKind  # "generator" or "embedder"
    family: str  # loader family: "arc2face", "iresnet", "onnx", "stylegan2"
    tiny: bool  # a tiny preset: real architecture, small config, random weights from a fixed seed
    license: str  # where the weights come from and under which terms
    files: Mapping[str, WeightFile]  # path relative to the model's directory -> pin and description
    config: Mapping[str, Any] = field(default_factory=dict)  # family-specific loader arguments
    alignment: Alignment = "center"  # generators: how their images are cropped for embedding
    # None: `model_dir / name`; else an absolute directory or an `s3://bucket/prefix` the files
    # are fetched from into `model_dir / name` (checked against the pins as they arrive).
    location: str | None = None
    build: Callable[[Path, int], Path] | None = None  # (directory, seed) -> directory; tiny presets only
    seed: int = 0  # the build seed of a tiny preset

    def required(self) -> dict[str, WeightFile]:
        return {rel: f for rel, f in self.files.items() if not f.optional}


@dataclass(frozen=True)
class VerifyResult:
    name: str  # the model's catalogue name
    ok: bool  # every required file is present, pinned and matches its sha256
    reason: str | None  # why not, naming each failing file; None when ok
    sha256: dict[str, str]  # relative path -> sha256 of the pinned files found on disk
    missing: tuple[str, ...] = ()  # required files absent from the model's directory
    root: Path | None = None  # where the files were looked for
