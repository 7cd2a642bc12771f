"""Model names -> implementation, weight files and their pinned sha256.

The names are those of the public catalogue (`app/catalog.py`; a test checks the two agree).
A model lives in `model_dir / name`. Tiny presets are built there from a fixed seed when missing
(building is not downloading); every other model must be placed there beforehand. Nothing is
loaded unless every pinned weight and tokenizer file is present with its pinned sha256, and
weights load only through safetensors, never through pickle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from models.embedders import iresnet
from models.embedders.iresnet import IResNetEmbedder
from models.generators import arc2face
from models.generators.arc2face import Arc2FaceGenerator

ModelKind = Literal["generator", "embedder"]
Device = str | torch.device


class ModelUnavailable(Exception):
    """A model's weights are missing or do not match their pinned sha256."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class ModelSpec:
    name: str  # catalogue name, as in app/catalog.py
    kind: ModelKind  # "generator" or "embedder"
    family: str  # architecture family: "arc2face", "iresnet", "stylegan2"
    tiny: bool  # a tiny preset: real architecture, small config, random weights from a fixed seed
    license: str  # where the weights come from and under which terms
    files: Mapping[str, str]  # path relative to the model's directory -> pinned sha256 (hex)
    load: Callable[[Path, Device], Any]  # (model directory, device) -> the loaded model
    build: Callable[[Path, int], Path] | None = None  # (directory, seed) -> directory; tiny presets only
    seed: int = 0  # the build seed of a tiny preset


@dataclass(frozen=True)
class VerifyResult:
    name: str  # the model's catalogue name
    ok: bool  # every pinned file is present and matches its sha256
    reason: str | None  # why not, naming each failing file; None when ok
    sha256: dict[str, str]  # relative path -> sha256 of the pinned files found on disk


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="arc2face-tiny",
            kind="generator",
            family="arc2face",
            tiny=True,
            license="no upstream weights: random weights built by idforge from seed 0 (Apache-2.0); "
            "architecture after Arc2Face (Papantoniou et al., ECCV 2024) on Stable Diffusion 1.5",
            files={
                "arc2face/diffusion_pytorch_model.safetensors": (
                    "704734e67e21aae6c9c95c938bcaf8f28b3bb93db73fe8692f3626076b0b3366"
                ),
                "encoder/model.safetensors": (
                    "397544864e028d3eb8c7fff8392e5ce74aeb0d303160bb7331a1859151ebef98"
                ),
                "vae/diffusion_pytorch_model.safetensors": (
                    "c0dcb8483cb91c9c8135e9af868ebb5a3159e19db3c22715f316d01a7770d84d"
                ),
                "tokenizer/vocab.json": "a4280c262edc853748a49ad49282e9cb9f7c1f288194e60a388842a9b3ee573d",
                "tokenizer/merges.txt": "4a5bb5298a1011bbe2f0bc10012badee7cc43b6efd6e0a13a9f820d4fe988691",
            },
            load=lambda path, device: Arc2FaceGenerator.from_pretrained(path, device=device),
            build=lambda path, seed: arc2face.build_tiny(path, seed=seed),
        ),
        ModelSpec(
            name="iresnet-tiny",
            kind="embedder",
            family="iresnet",
            tiny=True,
            license="no upstream weights: random weights built by idforge from seed 0 (Apache-2.0); "
            "layout of insightface arcface_torch iResNet (MIT)",
            files={"model.safetensors": "41848ce3d34d7790c7339a7cbc41d283ca8df0d5fda21ec97d10b15794f89d0b"},
            load=lambda path, device: IResNetEmbedder.from_pretrained(path, device=device),
            build=lambda path, seed: iresnet.build_tiny(path, seed=seed),
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model; ValueError naming `name` otherwise."""
    if name not in SPECS:
        raise ValueError(f"name: unknown model {name!r}; registered: {sorted(SPECS)}")
    return SPECS[name]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(name: str, model_dir: str | Path) -> VerifyResult:
    """Check that every pinned file of `name` is in `model_dir / name` with its pinned sha256."""
    spec = get_spec(name)
    root = Path(model_dir) / name
    found: dict[str, str] = {}
    problems: list[str] = []
    for rel, pinned in spec.files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing from {root}")
            continue
        found[rel] = file_sha256(path)
        if found[rel] != pinned:
            problems.append(f"{rel}: sha256 {found[rel]} does not match the pinned {pinned}")
    reason = "; ".join(problems) if problems else None
    return VerifyResult(name=name, ok=not problems, reason=reason, sha256=found)


def ensure_model(name: str, model_dir: str | Path) -> Path:
    """The verified directory of `name`; a missing tiny preset is built there first.

    The build goes to a temporary sibling directory renamed into place, so concurrent workers
    never see a half-written model. Raises ModelUnavailable when verification fails.
    """
    spec = get_spec(name)
    root = Path(model_dir) / name
    if not root.exists() and spec.build is not None:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root.parent))
        try:
            spec.build(staging, spec.seed)
            os.replace(staging, root)  # atomic; fails if another process got there first
        except OSError:
            if not root.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    result = verify(name, model_dir)
    if not result.ok:
        raise ModelUnavailable(name, result.reason or "verification failed")
    return root


def weights_sha256(name: str, model_dir: str | Path) -> dict[str, str]:
    """Relative path -> sha256 of the verified weight and tokenizer files, for the manifest."""
    result = verify(name, model_dir)
    if not result.ok:
        raise ModelUnavailable(name, result.reason or "verification failed")
    return result.sha256


def load_verified(name: str, model_dir: str | Path, device: Device, kind: ModelKind) -> Any:
    """Load `name` after verifying its files; ModelUnavailable when they do not match the pins."""
    spec = get_spec(name)
    if spec.kind != kind:
        raise ValueError(f"name: {name!r} is a {spec.kind}, not a {kind}")
    result = verify(name, model_dir)
    if not result.ok:
        raise ModelUnavailable(name, result.reason or "verification failed")
    return spec.load(Path(model_dir) / name, device)


def load_generator(name: str, model_dir: str | Path, device: Device = "cpu") -> Arc2FaceGenerator:
    """The verified generator `name` from `model_dir / name`, on `device`."""
    model: Arc2FaceGenerator = load_verified(name, model_dir, device, "generator")
    return model


def load_embedder(name: str, model_dir: str | Path, device: Device = "cpu") -> IResNetEmbedder:
    """The verified embedder `name` from `model_dir / name`, on `device`, in eval mode."""
    model: IResNetEmbedder = load_verified(name, model_dir, device, "embedder")
    return model
