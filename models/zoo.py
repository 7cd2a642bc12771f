"""The built-in model table: published models and tiny presets, their files, pins and loaders.

Published weights are not redistributed with idforge and their sha256 are pinned by the operator
(`models/registry.py`). The tiny presets are pinned below and their bytes are shipped in
`models/presets/`, which the registry copies into a model directory; the `_build_*` functions here
(`ModelSpec.build`) are the recipe that made those bytes from fixed seeds, rerun only by
`python -m models.presets build` (rebuilt bytes depend on the CPU's numerics). Each family's loader
takes (model directory, config, device, files present) and returns the model; heavy imports happen
inside the loaders so that reading the table stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from models.modelspec import Device, HubFile, ModelSpec, WeightFile

Loader = Callable[[Path, Mapping[str, Any], Device, set[str]], Any]


def _load_arc2face(root: Path, config: Mapping[str, Any], device: Device, present: set[str]) -> Any:
    from models.generators.arc2face import Arc2FaceGenerator

    if config.get("lcm_lora") in present:
        return Arc2FaceGenerator.from_pretrained(root, device=device, lcm_lora=root / config["lcm_lora"])
    return Arc2FaceGenerator.from_pretrained(root, device=device)


def _load_iresnet(root: Path, config: Mapping[str, Any], device: Device, present: set[str]) -> Any:
    from models.embedders import iresnet

    if config["arch"] == "tiny":
        arch = iresnet.TINY_CONFIG
    else:
        arch = iresnet.IResNetConfig.from_arch(config["arch"], source=config.get("source", "arcface_torch"))
    return iresnet.IResNetEmbedder.from_checkpoint(root / config["weights"], arch, device=device)


def _load_onnx(root: Path, config: Mapping[str, Any], device: Device, present: set[str]) -> Any:
    from models.embedders.onnx import OnnxEmbedder

    return OnnxEmbedder.from_file(root / config["weights"], device=device)


def _load_stylegan2(root: Path, config: Mapping[str, Any], device: Device, present: set[str]) -> Any:
    from models.generators import stylegan2

    cfg = getattr(stylegan2, config["config"])
    return stylegan2.StyleGAN2Generator.from_checkpoint(root / config["weights"], cfg, device=device)


LOADERS: dict[str, Loader] = {
    "arc2face": _load_arc2face,
    "iresnet": _load_iresnet,
    "onnx": _load_onnx,
    "stylegan2": _load_stylegan2,
}


def _build_arc2face_tiny(path: Path, seed: int) -> Path:
    from models.generators import arc2face

    return arc2face.build_tiny(path, seed=seed)


def _build_iresnet_tiny(path: Path, seed: int) -> Path:
    from models.embedders import iresnet

    return iresnet.build_tiny(path, seed=seed)


def _build_onnx_tiny(path: Path, seed: int) -> Path:
    from models.embedders import onnx

    return onnx.build_tiny(path, seed=seed)


def _build_stylegan2_tiny(path: Path, seed: int) -> Path:
    """The tiny StyleGAN2, and DisCo covariates fitted on its own images (`tiny_covariates`)."""
    from models.generators import stylegan2
    from models.sampling.covariates import tiny_covariates

    stylegan2.build_tiny(path, seed=seed)
    generator = stylegan2.StyleGAN2Generator.from_checkpoint(path / stylegan2.CHECKPOINT_FILE, stylegan2.CONFIG_TINY)
    tiny_covariates(generator, seed).save(path / COVARIATES_FILE)
    return path


COVARIATES_FILE = "covariates.safetensors"  # DisCo's directions, beside a StyleGAN2's weights
DISCO_COVARIATES = WeightFile(None, "DisCo covariate directions fitted offline with `idforge covariates fit` "
                              "(docs/covariates.md); needed by variations 'disco' only", optional=True)
TINY_LICENSE = ("no upstream weights: random weights built by idforge from seed 0 and shipped with it "
                "(Apache-2.0); ")
ARC2FACE = "FoivosPar/Arc2Face on Hugging Face"
SD15 = "the Stable Diffusion 1.5 base (stable-diffusion-v1-5/stable-diffusion-v1-5 on Hugging Face)"
# Hugging Face repositories and the commits `idforge models fetch` takes their files from (each a
# commit that holds every file named below; `--revision` overrides). Pins stay the operator's.
ARC2FACE_HUB = ("FoivosPar/Arc2Face", "321709b2e9697ea2a5bd06c8a51b340592333e1e")
SD15_HUB = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "451f4fe16113bff5a5d2269ed5ad43b0592e9a14")
LCM_LORA_HUB = ("latent-consistency/lcm-lora-sdv1-5", "cf2fced511dbe7e26c8d1d397e728fbab875db4b")


def _published(*files: tuple[str, str], hub: tuple[str, str] | None = None) -> dict[str, WeightFile]:
    """Unpinned files; with `hub` = (repository, commit), each is fetched from the same path there."""
    return {rel: WeightFile(None, what, source=HubFile(hub[0], rel, hub[1]) if hub else None)
            for rel, what in files}


ARC2FACE_FILES = {
    **_published(
        ("arc2face/config.json", f"Arc2Face UNet config, {ARC2FACE}"),
        ("arc2face/diffusion_pytorch_model.safetensors", f"Arc2Face UNet weights, {ARC2FACE}"),
        ("encoder/config.json", f"Arc2Face CLIP text encoder config, {ARC2FACE}"),
        ("encoder/pytorch_model.bin", f"Arc2Face CLIP text encoder weights, {ARC2FACE}"),
        hub=ARC2FACE_HUB,
    ),
    **_published(
        ("vae/config.json", f"VAE config, {SD15}"),
        ("vae/diffusion_pytorch_model.safetensors", f"VAE weights, {SD15}"),
        ("tokenizer/vocab.json", f"CLIP tokenizer, {SD15}"),
        ("tokenizer/merges.txt", f"CLIP tokenizer, {SD15}"),
        ("tokenizer/tokenizer_config.json", f"CLIP tokenizer, {SD15}"),
        ("tokenizer/special_tokens_map.json", f"CLIP tokenizer, {SD15}"),
        ("scheduler/scheduler_config.json", f"noise schedule, {SD15}"),
        hub=SD15_HUB,
    ),
    "lcm-lora/pytorch_lora_weights.safetensors": WeightFile(
        None, "LCM-LoRA for SD 1.5 (latent-consistency/lcm-lora-sdv1-5 on Hugging Face): enables the "
        "fast few-step mode", optional=True,
        source=HubFile(LCM_LORA_HUB[0], "pytorch_lora_weights.safetensors", LCM_LORA_HUB[1])),
}

ARCFACE_TORCH = "insightface arcface_torch (github.com/deepinsight/insightface, model zoo)"


def _arcface(arch: str) -> ModelSpec:
    return ModelSpec(
        name=f"arcface-{arch}", kind="embedder", family="iresnet", tiny=False,
        license=f"{ARCFACE_TORCH}: code MIT; the published weights are for non-commercial research only",
        files=_published(("backbone.pth", (f"iResNet-{arch[1:]} backbone state dict `backbone.pth` "
                           f"from {ARCFACE_TORCH}, e.g. the ms1mv3 or glint360k {arch} model"))),
        config={"arch": arch, "weights": "backbone.pth"},
    )


def _legacy(depth: int, file: str) -> ModelSpec:
    return ModelSpec(
        name=f"iresnet{depth}-legacy", kind="embedder", family="iresnet", tiny=False,
        license="nizhib/pytorch-insightface port of the insightface iResNet (MIT code); weights from "
        "insightface's model zoo, non-commercial research only",
        files=_published((file, (f"iResNet-{depth} state dict `{file}` released with "
                           "github.com/nizhib/pytorch-insightface"))),
        # same parameter names as arcface_torch, but BatchNorm eps 2e-5 and inputs scaled by 1/128
        config={"arch": f"r{depth}", "weights": file, "source": "nizhib"},
    )


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="arc2face-tiny", kind="generator", family="arc2face", tiny=True,
            license=TINY_LICENSE + "architecture after Arc2Face (Papantoniou et al., ECCV 2024) on "
            "Stable Diffusion 1.5",
            files={
                "arc2face/config.json": WeightFile(
                    "d00d0bd02fb6fcb67b8148c03492c60a0379cd68738eda6ba8e6d674a38431cd", "tiny UNet config"),
                "encoder/config.json": WeightFile(
                    "589fd7a2061062d45234612ed6ff4e673f60b6a448e3aa71199b723de38bac9f", "tiny CLIP config"),
                "vae/config.json": WeightFile(
                    "918b43520a0266a9dd643f06461e0822cad225488736928f852fec93d43838b8", "tiny VAE config"),
                "scheduler/scheduler_config.json": WeightFile(
                    "c5199b7f36729e64893c1469553cba70298da206e47d7cb8e7f0db263be63905", "noise schedule"),
                "tokenizer/tokenizer_config.json": WeightFile(
                    "9b12871c7c64c7aaaf311c23692260649bb570e6649eed538325969199b31271", "tokenizer config"),
                "tokenizer/special_tokens_map.json": WeightFile(
                    "841c138373f4f9dd8a6b07a2e4d19b1e62b5364d7e09c41762bab5f7b851eb7f", "tokenizer tokens"),
                "arc2face/diffusion_pytorch_model.safetensors": WeightFile(
                    "704734e67e21aae6c9c95c938bcaf8f28b3bb93db73fe8692f3626076b0b3366", "tiny UNet"),
                "encoder/model.safetensors": WeightFile(
                    "397544864e028d3eb8c7fff8392e5ce74aeb0d303160bb7331a1859151ebef98", "tiny CLIP encoder"),
                "vae/diffusion_pytorch_model.safetensors": WeightFile(
                    "c0dcb8483cb91c9c8135e9af868ebb5a3159e19db3c22715f316d01a7770d84d", "tiny VAE"),
                "tokenizer/vocab.json": WeightFile(
                    "a4280c262edc853748a49ad49282e9cb9f7c1f288194e60a388842a9b3ee573d", "tokenizer vocabulary"),
                "tokenizer/merges.txt": WeightFile(
                    "4a5bb5298a1011bbe2f0bc10012badee7cc43b6efd6e0a13a9f820d4fe988691", "tokenizer merges"),
                # not built: a LoRA of the tiny UNet's layers, placed and pinned to try the fast mode
                "lcm-lora/pytorch_lora_weights.safetensors": WeightFile(
                    None, "an LCM-LoRA for the tiny UNet (kohya key layout)", optional=True),
            },
            config={"lcm_lora": "lcm-lora/pytorch_lora_weights.safetensors"},
            build=_build_arc2face_tiny,
        ),
        ModelSpec(
            name="arc2face", kind="generator", family="arc2face", tiny=False,
            license=f"Arc2Face weights ({ARC2FACE}): CC BY-NC 4.0, non-commercial; Stable Diffusion 1.5: "
            "CreativeML OpenRAIL-M",
            files=ARC2FACE_FILES,
            config={"lcm_lora": "lcm-lora/pytorch_lora_weights.safetensors"},
            alignment="landmarks",
        ),
        ModelSpec(
            name="stylegan2-tiny", kind="generator", family="stylegan2", tiny=True,
            license=TINY_LICENSE + "StyleGAN2 architecture (Karras et al., CVPR 2020) in the "
            "rosinality/stylegan2-pytorch layout (MIT)",
            files={
                "stylegan2.pt": WeightFile(
                    "dc673517117bf727090d0f7ad3d5142a2289237a1955f2969c11349c71f41317",
                    "tiny rosinality-format checkpoint (g_ema, latent_avg)"),
                COVARIATES_FILE: WeightFile(
                    "423c5385e720332bb2e67803aad4fef30619dbca84a1b0008f5b8fff944b9ca4",
                    "DisCo covariates fitted on the tiny generator's images"),
            },
            config={"config": "CONFIG_TINY", "weights": "stylegan2.pt"},
            alignment="center",
            build=_build_stylegan2_tiny,
        ),
        ModelSpec(
            name="stylegan2-ffhq-256", kind="generator", family="stylegan2", tiny=False,
            license="StyleGAN2 FFHQ weights: NVIDIA Source Code License-NC (non-commercial); "
            "rosinality/stylegan2-pytorch conversion (MIT code)",
            files={**_published(("stylegan2.pt", ("rosinality-format checkpoint {g_ema, latent_avg} of "
                                  "StyleGAN2 trained on FFHQ at 256 px: rosinality's FFHQ 256 snapshot "
                                  "re-saved offline as docs/stylegan2.md describes"))),
                   COVARIATES_FILE: DISCO_COVARIATES},
            config={"config": "CONFIG_256", "weights": "stylegan2.pt"},
            alignment="ffhq",
        ),
        ModelSpec(
            name="stylegan2-ffhq-1024", kind="generator", family="stylegan2", tiny=False,
            license="StyleGAN2 FFHQ config-f weights: NVIDIA Source Code License-NC (non-commercial); "
            "converted offline to the rosinality layout",
            files={**_published(("stylegan2.pt", ("NVIDIA's stylegan2-ffhq-config-f.pkl converted offline "
                                  "with rosinality's convert_weight.py and renamed; see docs/stylegan2.md"))),
                   COVARIATES_FILE: DISCO_COVARIATES},
            config={"config": "CONFIG_1024", "weights": "stylegan2.pt"},
            alignment="ffhq",
        ),
        ModelSpec(
            name="iresnet-tiny", kind="embedder", family="iresnet", tiny=True,
            license=TINY_LICENSE + "layout of insightface arcface_torch iResNet (MIT)",
            files={
                "config.json": WeightFile(
                    "169c5fccd013f917ba3d04baad71eb55e7dbd85ae1a3383e5802473e01514975", "tiny iResNet config"),
                "model.safetensors": WeightFile(
                    "4ebc5b1b3c7ee2f35ea7f26caafad74e25a45d38474b5c4b57718ccbd0a95272", "tiny iResNet"),
            },
            # read by the same checkpoint loader as the published nets (key and shape checks)
            config={"arch": "tiny", "weights": "model.safetensors"},
            build=_build_iresnet_tiny,
        ),
        *(_arcface(arch) for arch in ("r18", "r34", "r50", "r100", "r200")),
        _legacy(34, "iresnet34-5b0d0e90.pth"),
        _legacy(50, "iresnet50-7f187506.pth"),
        _legacy(100, "iresnet100-73e07ba7.pth"),
        ModelSpec(
            name="arcface-onnx", kind="embedder", family="onnx", tiny=False,
            license=f"insightface antelopev2 recognition model as shipped with {ARC2FACE} (`arcface.onnx`): "
            "non-commercial research only",
            files=_published(("arcface.onnx", f"ArcFace ONNX model `arcface.onnx` from {ARC2FACE}"),
                             hub=ARC2FACE_HUB),
            config={"weights": "arcface.onnx"},
        ),
        ModelSpec(
            name="arcface-onnx-tiny", kind="embedder", family="onnx", tiny=True,
            license=TINY_LICENSE + "the tiny iResNet exported to ONNX",
            files={"model.onnx": WeightFile(
                "9a4757d7d708a8fc93caa8bb30b1a949847d501cd06713b28fede2afa0c48f18",
                "tiny iResNet as an ONNX graph")},
            config={"weights": "model.onnx"},
            build=_build_onnx_tiny,
        ),
    )
}
