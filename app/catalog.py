"""The public model catalogue: which names a job spec may use, and what each can do.

This is data the API needs without importing torch. `models/registry.py` maps the same names to
classes, configs and pinned weights; a test checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModelKind = Literal["generator", "embedder"]
# How a generator is driven: "embedding" = conditioned on a face embedding (Arc2Face);
# "latent" = a latent-space generator (StyleGAN2).
Conditioning = Literal["embedding", "latent"]


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: ModelKind
    family: str  # architecture family: "arc2face", "stylegan2", "iresnet"
    conditioning: Conditioning | None  # generators only
    embedding_dim: int | None  # embedders, and embedding-conditioned generators
    tiny: bool  # a tiny preset: real architecture, small config, built from a fixed seed
    description: str


def _arcface(arch: str) -> CatalogEntry:
    return CatalogEntry(
        name=f"arcface-{arch}", kind="embedder", family="iresnet", conditioning=None, embedding_dim=512,
        tiny=False, description=f"ArcFace iResNet-{arch[1:]} (insightface arcface_torch backbone.pth), "
        "112x112 aligned input, 512-d output; differentiable",
    )


def _legacy(depth: int) -> CatalogEntry:
    return CatalogEntry(
        name=f"iresnet{depth}-legacy", kind="embedder", family="iresnet", conditioning=None,
        embedding_dim=512, tiny=False, description=f"iResNet-{depth} in the older pytorch-insightface "
        "port's checkpoint layout, 112x112 aligned input, 512-d output; differentiable",
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="arc2face",
            kind="generator",
            family="arc2face",
            conditioning="embedding",
            embedding_dim=512,
            tiny=False,
            description="Arc2Face (Stable Diffusion 1.5 conditioned on ArcFace embeddings), 512 px, "
            "DPM-Solver++ 25 steps with guidance 3.0; an LCM-LoRA fast mode when its weights are there",
        ),
        CatalogEntry(
            name="arc2face-tiny",
            kind="generator",
            family="arc2face",
            conditioning="embedding",
            embedding_dim=512,
            tiny=True,
            description="Arc2Face-style diffusers pipeline (UNet, VAE, CLIP text encoder with the "
            "'id' token replaced by the embedding), tiny config; images are not faces",
        ),
        CatalogEntry(
            name="stylegan2-ffhq-256",
            kind="generator",
            family="stylegan2",
            conditioning="latent",
            embedding_dim=None,
            tiny=False,
            description="StyleGAN2 trained on FFHQ at 256 px (rosinality checkpoint layout)",
        ),
        CatalogEntry(
            name="stylegan2-ffhq-1024",
            kind="generator",
            family="stylegan2",
            conditioning="latent",
            embedding_dim=None,
            tiny=False,
            description="StyleGAN2 config-f trained on FFHQ at 1024 px (rosinality checkpoint layout)",
        ),
        CatalogEntry(
            name="stylegan2-tiny",
            kind="generator",
            family="stylegan2",
            conditioning="latent",
            embedding_dim=None,
            tiny=True,
            description="StyleGAN2 architecture with a 32 px output and a few channels; images are not faces",
        ),
        *(_arcface(arch) for arch in ("r18", "r34", "r50", "r100", "r200")),
        *(_legacy(depth) for depth in (34, 50, 100)),
        CatalogEntry(
            name="arcface-onnx",
            kind="embedder",
            family="onnx",
            conditioning=None,
            embedding_dim=512,
            tiny=False,
            description="Arc2Face's arcface.onnx (insightface antelopev2 recogniser) through onnxruntime; "
            "forward only",
        ),
        CatalogEntry(
            name="arcface-onnx-tiny",
            kind="embedder",
            family="onnx",
            conditioning=None,
            embedding_dim=512,
            tiny=True,
            description="the tiny iResNet exported to ONNX, run through onnxruntime; forward only",
        ),
        CatalogEntry(
            name="iresnet-tiny",
            kind="embedder",
            family="iresnet",
            conditioning=None,
            embedding_dim=512,
            tiny=True,
            description="insightface iResNet layout with narrow layers, 112x112 input, 512-d output",
        ),
    )
}

# Which identity samplers and variation methods can drive which generator conditioning.
SAMPLER_CONDITIONING: dict[str, frozenset[str]] = {
    "random": frozenset({"embedding", "latent"}),
    "hyperface": frozenset({"embedding"}),
    "langevin": frozenset({"latent"}),
}
VARIATION_CONDITIONING: dict[str, frozenset[str]] = {
    "embedding_noise": frozenset({"embedding"}),
    "dispersion": frozenset({"latent"}),
    "disco": frozenset({"latent"}),
}
# Methods the workers of this version implement; the others are refused with 422 until they land.
IMPLEMENTED_SAMPLERS = frozenset({"random", "hyperface", "langevin"})
IMPLEMENTED_VARIATIONS = frozenset({"embedding_noise", "dispersion", "disco"})


def generators(conditioning: str | None = None) -> list[str]:
    return sorted(
        n
        for n, e in CATALOG.items()
        if e.kind == "generator" and (conditioning is None or e.conditioning == conditioning)
    )


def embedders() -> list[str]:
    return sorted(n for n, e in CATALOG.items() if e.kind == "embedder")
