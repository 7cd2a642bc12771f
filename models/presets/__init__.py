"""The tiny presets' files, shipped as bytes: `models/presets/<name>/...`, the model directory's layout.

Why shipped and not built. The four tiny presets (`arc2face-tiny`, `stylegan2-tiny`, `iresnet-tiny`,
`arcface-onnx-tiny`) are random weights from a fixed seed, and their files are pinned by sha256 in
`models/zoo.py` like any published model's. They used to be built at run time from that seed. But
the bytes a build writes depend on the CPU's numerics: torch's `uniform_`/`randn` initialisers are
vectorised per instruction set (AVX2, AVX-512, the scalar path) and differ in the last bit; float32
BatchNorm statistics and the tiny StyleGAN2's mean latent are reductions whose order follows the
vector width and thread count, so rounding them to a grid still flips values that sit on a grid
boundary; the DisCo covariates come from an SVM fit over rendered images. A build on an AVX-512
machine therefore matched none of the pins, and a service that refuses unpinned bytes refused its
own presets. Rounding cannot make computed floats portable; only exact construction or shipped
bytes can, and for trained-looking random networks shipped bytes are the simple, honest answer:
the presets are data, like published weights, and idforge ships them.

How they are used. `Registry.ensure(name)` materialises a missing tiny preset by copying the files
its spec names from here into a temporary sibling of `model_dir / name`, checking each against its
pin, and renaming the directory into place (atomic: concurrent workers never see half a preset).
An existing directory is never replaced: a tampered preset in the model directory is refused, not
repaired. The files are package data (`pyproject.toml`), so a wheel carries them; `.gitattributes`
marks them binary so that no checkout rewrites their line endings (the JSON and text files are
pinned too).

How they were made. The build functions in `models/zoo.py` (`ModelSpec.build`, from
`models.seeding.build_generator` and `seeded_construction`) are the recipe that made these bytes, on
an x86-64 AVX2 machine with torch 2.13.0, diffusers 0.42.1 and transformers 5.23.0.
`python -m models.presets build [--out DIR] [NAME ...]` reruns it and prints each file's sha256
beside its pin; rebuilt bytes match only on a machine with the same numerics (same instruction set
paths, same library versions), which is exactly why the presets are shipped rather than rebuilt.
`python -m models.presets check` verifies the shipped files of this installation against the pins.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models.modelspec import ModelSpec, ModelUnavailable

PRESETS_DIR = Path(__file__).resolve().parent  # holds one directory per tiny preset

__all__ = ["PRESETS_DIR", "copy_preset", "shipped_files"]


def shipped_files(spec: ModelSpec, source: Path = PRESETS_DIR) -> dict[str, Path]:
    """Relative path -> shipped file, for each file of `spec` present under `source / spec.name`.

    Raises ModelUnavailable naming the missing files when a required one is absent (an installation
    without its package data, or a preset that idforge does not ship).
    """
    root = Path(source) / spec.name
    found = {rel: root / rel for rel in spec.files if (root / rel).is_file()}
    missing = sorted(set(spec.required()) - set(found))
    if missing:
        raise ModelUnavailable(spec.name, f"{len(missing)} shipped preset file(s) missing from {root}: "
                               f"{', '.join(missing)}; reinstall idforge with its package data "
                               "(models/presets), or place the files yourself")
    return found


def copy_preset(spec: ModelSpec, dest: Path, source: Path = PRESETS_DIR) -> list[str]:
    """Copy the shipped files of `spec` into the directory `dest` (created); returns their relative paths.

    Only the files the spec names are copied; optional ones that are not shipped are skipped. File
    modes are not copied (a read-only installation gives writable copies).
    """
    files = shipped_files(spec, source)
    for rel, src in sorted(files.items()):
        target = Path(dest) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return sorted(files)
