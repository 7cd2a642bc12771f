"""The same bits under every CPU code path: shipped tiny presets and every job draw.

Each setting runs in a fresh interpreter (this file, run as a script) with ATEN_CPU_CAPABILITY
forcing torch's kernels onto one instruction-set path (default = the baseline build without AVX,
avx2, and avx512 where the CPU has it), 1 or 2 torch threads, and MKL_CBWR=COMPATIBLE. There it

  (a) materialises every tiny preset with `Registry(fresh dir).ensure(name)`, reports each file's
      sha256, loads each preset through the registry and runs a small forward pass;
  (b) hashes a fixed set of job draws: identities, raw `Stream` draws, sphere points, variation,
      Langevin, dispersion and DisCo noise, Arc2Face initial latents, StyleGAN2 random noise maps.

The test requires the capability to have taken effect, every preset file to match its pin, every
setting to give the same draw digests, and those digests to equal the ones pinned below (a change
of a draw algorithm changes datasets, so it must change this file too). Forward passes compute
floats on the chosen kernels, so their outputs only have to agree closely.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

# sha256 of (dtype, shape, bytes) of each job draw; see _draws.
PINNED_DRAWS: dict[str, str] = {
    "sample_identities(7, 0, 5, 512)":
        "133a50bb00850739228ee10950787d6e486bf0ac08b6d1aa576d908a2235b440",
    "g = make_generator(123); g.normal(64, 4, 8, 8)":
        "d638086342b3ed924003f35300942454e975e7927eea3161063713e2c4c57b62",
    "then g.uniform(1000)":
        "6fee5fd24f80be07dd0cf0f924f0f27c088800d7fda0ae3199930c09f3c48389",
    "then g.uniform(1000, dtype=float64)":
        "10a4ba4bbb03b969351db953110354a9243439f018424b78f7abeb1504dc52fd",
    "then g.permutation(1000)":
        "2b1e0a8792d1ade9505f7bc3188c5a4abaa5db5ec006a7cd30480e69763d2e97",
    "then g.integers(10, 100)":
        "80d98a8523dd37721224ee6074f591666e3f6c2bae4d23be65f19e01fb651eba",
    "then g.normal(7, dtype=float64)":
        "d29b63f09231170775062374c89fe1732c94830f57165523b6d6f9e9be43b55c",
    "uniform_sphere(1000, 512, make_generator(123))":
        "0cef2e19bb09d29a4feacf7bbd01369e882ef5d78d17e1537bb11a5979fe638a",
    "embedding_noise(sample_identities(7, 10, 3), [10, 11, 12], 4, 7, first_sample=2)":
        "39838567e73a93571b321cb897d6e8045b9aa20d1a904ba1a5aaec478b49c0be",
    "cone_variations(sample_identities(7, 10, 3), [10, 11, 12], 4, 7, ConeConfig(35), first_sample=2)":
        "97daf95aaf9cf94d3bdb74727dcaba96b3610fdea8fa3edc5572c20102ca735f",
    "langevin_noise(7, range(5), 3, 512)":
        "5b93f0b8c764eda9b715077976bf39cb56e0779f38328ed674ed3b82cf4e4616",
    "dispersion._normals(DISPERSION_INIT, 7, [0, 4, 9], 3, 64, first=1)":
        "8a0749371bd7b11a093ef6b5c5864332cd188cdfa1d5355e6b1e940d4cbb62e1",
    "dispersion.step_noise([0, 4, 9], 7, 3, 5, 64)":
        "1d635805f69ae12057fc553c25c42022c939290af2741917df938b58a1e1c409",
    "disco_offsets(unit directions, [0, 5], 4, 7, first_variation=3)":
        "993fb9df8838c4bf04b1bf26c53e7731f498aeb660f5be4b02eb0a6b6523d05c",
    "arc2face-tiny initial_latents([1, 2, 3])":
        "7d81647a14788cfac634ff72e317abb4f51ff60d73c5f0c112a1d90e4a98a0cc",
    "stylegan2-tiny _layer_noise(2, 'random', make_generator(5))":
        "f0c9181fc3f8682ff56d06f03a4c39eb244b27a88476b3aa4fe7906be334786a",
}

CAPABILITY = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}  # env value -> reported


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _settings() -> list[tuple[str, int]]:
    flags = _cpu_flags()
    capabilities = ["default"]
    capabilities += ["avx2"] if "avx2" in flags else []
    capabilities += ["avx512"] if "avx512f" in flags else []
    return [(c, t) for c in capabilities for t in (1, 2)]


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


def _draws(arc2face: Any, stylegan2: Any) -> dict[str, str]:
    """Digests of job draws, named by the call: each is seed-defined, so the same bits everywhere."""
    from models.sampling import covariates, dispersion, langevin
    from models.sampling.cone import ConeConfig, cone_variations
    from models.sampling.embedding_noise import embedding_noise
    from models.sampling.random import sample_identities
    from models.sampling.sphere import uniform_sphere
    from models.seeding import DISPERSION_INIT, make_generator

    g = make_generator(123)  # one stream, drawn in this order
    # DisCo's u ~ U(-0.5, 0.5) per (identity, variation), read back exactly through unit directions
    unit = covariates.Covariates(names=("a", "b", "c"), directions=torch.eye(3), scales=torch.ones(3))
    draws = {
        "sample_identities(7, 0, 5, 512)": lambda: sample_identities(7, 0, 5, 512),
        "g = make_generator(123); g.normal(64, 4, 8, 8)": lambda: g.normal(64, 4, 8, 8),
        "then g.uniform(1000)": lambda: g.uniform(1000),
        "then g.uniform(1000, dtype=float64)": lambda: g.uniform(1000, dtype=torch.float64),
        "then g.permutation(1000)": lambda: g.permutation(1000),
        "then g.integers(10, 100)": lambda: g.integers(10, 100),
        "then g.normal(7, dtype=float64)": lambda: g.normal(7, dtype=torch.float64),
        "uniform_sphere(1000, 512, make_generator(123))":
            lambda: uniform_sphere(1000, 512, make_generator(123)),
        "embedding_noise(sample_identities(7, 10, 3), [10, 11, 12], 4, 7, first_sample=2)":
            lambda: embedding_noise(sample_identities(7, 10, 3), [10, 11, 12], 4, 7,
                                               first_sample=2),
        "cone_variations(sample_identities(7, 10, 3), [10, 11, 12], 4, 7, ConeConfig(35), first_sample=2)":
            lambda: cone_variations(sample_identities(7, 10, 3), [10, 11, 12], 4, 7, ConeConfig(35.0),
                                    first_sample=2),
        "langevin_noise(7, range(5), 3, 512)": lambda: langevin.langevin_noise(7, range(5), 3, 512),
        "dispersion._normals(DISPERSION_INIT, 7, [0, 4, 9], 3, 64, first=1)":
            lambda: dispersion._normals(DISPERSION_INIT, 7, [0, 4, 9], 3, 64, first=1),
        "dispersion.step_noise([0, 4, 9], 7, 3, 5, 64)":
            lambda: dispersion.step_noise([0, 4, 9], 7, 3, 5, 64),
        "disco_offsets(unit directions, [0, 5], 4, 7, first_variation=3)":
            lambda: covariates.disco_offsets(unit, [0, 5], 4, 7, first_variation=3),
        "arc2face-tiny initial_latents([1, 2, 3])": lambda: arc2face.initial_latents([1, 2, 3]),
        "stylegan2-tiny _layer_noise(2, 'random', make_generator(5))":
            lambda: torch.cat([n.flatten() for n in stylegan2._layer_noise(2, "random", make_generator(5))]),
    }
    return {name: _digest(draw()) for name, draw in draws.items()}  # in order: g is one stream


def probe(model_dir: Path) -> dict:
    """What one setting reports (run in a fresh interpreter: `python tests/models/test_portability.py DIR`)."""
    torch.set_num_threads(int(os.environ["IDFORGE_PROBE_THREADS"]))
    import models
    from models.registry import Registry, hash_file
    from models.seeding import make_generator
    from models.zoo import SPECS

    reg = Registry(model_dir)
    files: dict[str, dict[str, str]] = {}
    for name, spec in SPECS.items():
        if spec.tiny:
            root = reg.ensure(name)  # copies the shipped files, then verifies them against the pins
            files[name] = {rel: hash_file(root / rel) for rel in spec.files if (root / rel).is_file()}

    iresnet = reg.load("iresnet-tiny", kind="embedder")
    onnx = reg.load("arcface-onnx-tiny", kind="embedder")
    stylegan2 = reg.load("stylegan2-tiny", kind="generator")
    arc2face = reg.load("arc2face-tiny", kind="generator")
    images = make_generator(11).integers(256, 4, 112, 112, 3).to(torch.uint8)  # [4, 112, 112, 3]
    z = make_generator(12).normal(2, stylegan2.style_dim)  # [2, D]
    identities = iresnet.embed_images(images)  # [4, 512]
    forward = {
        "iresnet-tiny.embed_images": identities.tolist(),
        "arcface-onnx-tiny.embed_images": onnx.embed_images(images).tolist(),
        "stylegan2-tiny.render(z, const noise)": stylegan2.render(z, noise_mode="const").tolist(),
        "arc2face-tiny.render(2 steps)": arc2face.render(identities[:2], [1, 2], steps=2).tolist(),
    }
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "models": str(Path(models.__file__).resolve().parent),
        "files": files,
        "draws": _draws(arc2face, stylegan2),
        "forward": forward,
    }


def _run_settings(tmp: Path) -> dict[tuple[str, int], dict]:
    """Each setting's report, two fresh interpreters at a time."""
    settings = _settings()
    reports: dict[tuple[str, int], dict] = {}
    for i in range(0, len(settings), 2):
        procs = []
        for capability, threads in settings[i:i + 2]:
            env = {
                **os.environ,
                "ATEN_CPU_CAPABILITY": capability,
                "MKL_CBWR": "COMPATIBLE",
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "IDFORGE_PROBE_THREADS": str(threads),
                "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            }
            model_dir = tmp / f"{capability}-{threads}"  # fresh: every preset is materialised anew
            procs.append(((capability, threads), subprocess.Popen(
                [sys.executable, __file__, str(model_dir)], env=env, cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for setting, proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{setting}: probe failed\n{stderr[-4000:]}"
            reports[setting] = json.loads(stdout.strip().splitlines()[-1])
    return reports


def test_presets_and_job_draws_are_the_same_bits_on_every_cpu_code_path(tmp_path: Path) -> None:
    from models.zoo import SPECS

    pins = {name: {rel: f.sha256 for rel, f in spec.required().items()}
            for name, spec in SPECS.items() if spec.tiny}
    reports = _run_settings(tmp_path)
    assert ("default", 1) in reports and len(reports) >= 2
    for (capability, threads), r in reports.items():
        setting = f"ATEN_CPU_CAPABILITY={capability}, {threads} thread(s)"
        took = (r["capability"], r["threads"], r["mkl_cbwr"])
        assert took == (CAPABILITY[capability], threads, "COMPATIBLE"), f"{setting}: not in effect: {took}"
        assert r["models"] == str(ROOT / "models"), f"{setting}: imported models from {r['models']}"
        for name, digests in pins.items():
            assert r["files"][name] == digests, f"{setting}: {name} does not match its pins"

    first_setting, first = next(iter(reports.items()))
    for setting, r in reports.items():
        differ = sorted(k for k in first["draws"] if r["draws"].get(k) != first["draws"][k])
        assert not differ and r["draws"].keys() == first["draws"].keys(), \
            f"job draws differ between {first_setting} and {setting}: {differ}"
    changed = sorted(k for k in PINNED_DRAWS if first["draws"].get(k) != PINNED_DRAWS[k])
    assert first["draws"].keys() == PINNED_DRAWS.keys() and not changed, \
        f"job draws differ from the pinned digests (a draw algorithm changed?): {changed}"

    # Forward passes compute floats on the chosen kernels: close, not necessarily equal.
    for name, values in first["forward"].items():
        ref = torch.tensor(values, dtype=torch.float64)
        if name.endswith("embed_images"):
            assert ref.shape == (4, 512) and ((ref.norm(dim=1) - 1).abs() < 1e-5).all(), name  # unit rows
        else:
            assert ref.shape == (2, 32, 32, 3) and ref.std() > 1, name  # uint8 images, not a constant
        for setting, r in reports.items():
            got = torch.tensor(r["forward"][name], dtype=torch.float64)
            atol = 1e-5 if name.endswith("embed_images") else 2  # unit embeddings; uint8 pixels
            diff = (got - ref).abs().max().item()
            assert diff <= atol, f"{name}: {setting} differs from {first_setting} by {diff} (> {atol})"


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]))))
