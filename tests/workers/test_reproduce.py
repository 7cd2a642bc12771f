"""`idforge reproduce` across platforms: a job made under one CPU instruction set (ATEN_CPU_CAPABILITY)
reproduced under another, measured image by image; a tampered image of the job's copy; a manifest
from before the platform block."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app import dataset_index
from workers.cli import main as cli
from workers.provenance import platform_block, platform_differences
from workers.reproduce import DEFAULT_MIN_COSINE

# The latent path (Langevin identities, Dispersion variations, StyleGAN2 + iResNet, both tiny):
# 3 identities x 2 images in 2 shards, the quality report on (the evaluator embeds too).
SPEC: dict[str, Any] = {
    "identities": 3, "images_per_identity": 2, "seed": 4,
    "models": {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"},
    "sampler": {"method": "langevin", "iterations": 6, "batch_size": 4},
    "variations": {"method": "dispersion", "iterations": 3, "batch_size": 5},
    "render": {"batch_size": 4},
}


def _idforge(args: list[str], model_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process, so that ATEN_CPU_CAPABILITY and MKL_CBWR take effect at start."""
    full = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    full.update({"HF_HUB_OFFLINE": "1", "IDFORGE_MODEL_DIR": str(model_dir), "IDFORGE_SHARD_IDENTITIES": "2",
                 **env})
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], env=full, capture_output=True,
                          text=True, timeout=280, check=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """The job made by `idforge generate` under the portable baseline: no SIMD kernels in torch,
    MKL's conditional-numerical-reproducibility mode COMPATIBLE."""
    root = tmp_path_factory.mktemp("isa")
    (root / "spec.json").write_text(json.dumps(SPEC))
    r = _idforge(["generate", str(root / "spec.json"), str(root / "job")], model_dir,
                 ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE")
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "job"


def _has_avx2() -> bool:
    return "avx2" in platform_block("cpu")["cpu_features"]


@pytest.mark.skipif(not _has_avx2(), reason="this CPU has no AVX2 to reproduce under")
def test_a_job_made_without_simd_reproduces_under_avx2_equivalent_image_by_image(
        job: Path, tmp_path: Path, model_dir: Path) -> None:
    theirs = json.loads((job / "manifest.json").read_text())
    assert theirs["platform"]["cpu_capability"] == "DEFAULT"
    assert theirs["platform"]["env"]["MKL_CBWR"] == "COMPATIBLE"
    assert theirs["platform"]["device"] == "cpu" and theirs["platform"]["cuda"] is None
    r = _idforge(["reproduce", str(job), "--out", str(tmp_path / "r"), "--json"], model_dir,
                 ATEN_CPU_CAPABILITY="avx2")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    ours = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert ours["platform"]["cpu_capability"] == "AVX2" and "MKL_CBWR" not in ours["platform"]["env"]
    assert report["platform"]["job"] == theirs["platform"] and report["platform"]["here"] == ours["platform"]
    assert "cpu_capability: DEFAULT -> AVX2" in report["platform"]["differences"]
    assert "env.MKL_CBWR: COMPATIBLE -> unset" in report["platform"]["differences"]

    assert report["verdict"] in ("identical", "equivalent") and report["min_cosine"] == DEFAULT_MIN_COSINE
    rows = report["per_image"]
    assert [row["path"] for row in rows] == [f["path"] for f in dataset_index.local_files(job, theirs)]
    assert len(rows) == 6
    for row in rows:  # every image measured, byte-identical ones included (0 and 1)
        assert isinstance(row["max_pixel_diff"], int) and 0 <= row["max_pixel_diff"] <= 255
        assert DEFAULT_MIN_COSINE <= row["cosine"] <= 1.0
        assert row["status"] in ("identical", "equivalent")
        if row["status"] == "identical":
            assert (row["max_pixel_diff"], row["cosine"]) == (0, 1.0)
    assert report["worst_max_pixel_diff"] == max(row["max_pixel_diff"] for row in rows)
    assert report["lowest_cosine"] == min(row["cosine"] for row in rows)
    assert report["images"]["byte_identical"] == sum(row["status"] == "identical" for row in rows)
    # measured on a 2-core AMD EPYC (AVX2): every image differs in bytes, by at most 4 levels, and
    # the job's FR model puts each at cosine >= 0.99999 to the job's; seeded draws are portable,
    # so nothing larger than float rounding through the networks is expected
    assert report["worst_max_pixel_diff"] <= 32 and report["lowest_cosine"] >= 0.999
    print(f"\ncross-ISA DEFAULT -> AVX2: verdict {report['verdict']}, "
          f"{report['images']['byte_identical']}/6 byte-identical, worst max pixel diff "
          f"{report['worst_max_pixel_diff']}, min cosine {report['lowest_cosine']}")


def test_a_tampered_image_of_the_jobs_copy_differs_and_is_named(job: Path, tmp_path: Path,
                                                               model_dir: Path, monkeypatch: Any) -> None:
    """Another identity's image in place of one of the job's: below the threshold, named, exit 1.
    The manifest also loses its platform block, as written before there was one."""
    copy = tmp_path / "job"
    shutil.copytree(job, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    files = list(dataset_index.local_files(copy, manifest))
    first, last = files[0]["path"], files[-1]["path"]
    (copy / first).write_bytes((job / last).read_bytes())
    del manifest["platform"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("IDFORGE_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("IDFORGE_SHARD_IDENTITIES", "1")  # the manifest's plan wins
    r = CliRunner().invoke(cli, ["reproduce", str(copy), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    assert "platform: the job's manifest does not record one" in lines
    tampered = next(line for line in lines if line.startswith(f"  {first}: "))
    assert tampered.startswith(f"  {first}: differs (max pixel diff ")
    assert f"below {DEFAULT_MIN_COSINE}" in tampered and "does not match its manifest digest" in tampered
    cosine = float(tampered.split("cosine ")[1].split(",")[0])
    assert cosine < DEFAULT_MIN_COSINE
    for f in files[1:]:  # the others: byte-identical (same ISA) or equivalent (the job's)
        line = next(line for line in lines if line.startswith(f"  {f['path']}: "))
        assert line.split(": ")[1].split(" ")[0] in ("identical", "equivalent"), line
    verdicts = [line for line in lines if line.startswith("verdict: ")]
    assert len(verdicts) == 1 and verdicts[0].startswith("verdict: differs (1 image(s) below")
    assert verdicts[0].endswith(f": {first})") and lines[-1] == verdicts[0]
    summary = next(line for line in lines if line.startswith("summary: "))
    assert "1 differ, 0 missing, 0 extra" in summary and f"min cosine {cosine:.6f}" in summary
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["platform"]["device"] == "cpu"


def test_reproduce_refuses_to_render_over_the_jobs_own_dataset(job: Path, model_dir: Path,
                                                               monkeypatch: Any) -> None:
    monkeypatch.setenv("IDFORGE_MODEL_DIR", str(model_dir))
    before = (job / "manifest.json").read_bytes()
    r = CliRunner().invoke(cli, ["reproduce", str(job / "manifest.json"), "--out", str(job)])
    assert r.exit_code != 0 and "the job's own dataset" in r.output
    assert (job / "manifest.json").read_bytes() == before


def test_platform_differences_name_the_numerics_fields_only() -> None:
    a = platform_block("cpu")
    assert platform_differences(a, json.loads(json.dumps(a))) == []
    b = {**a, "python": "0.0", "os": "Other 1", "threads": a["threads"] + 1,
         "libraries": {**a["libraries"], "torch": "0.0"}, "env": {**a["env"], "MKL_CBWR": a["env"].get("MKL_CBWR", "") + "x"},
         "deterministic": {**a["deterministic"], "algorithms": not a["deterministic"]["algorithms"]}}
    got = platform_differences(a, b)
    assert got is not None and sorted(d.split(":")[0] for d in got) == [
        "deterministic.algorithms", "env.MKL_CBWR", "libraries.torch", "threads"]
    assert f"threads: {a['threads']} -> {a['threads'] + 1}" in got
    assert platform_differences(None, a) is None and platform_differences(a, None) is None
