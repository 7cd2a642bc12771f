"""Latent generators in the service: random or Langevin identities, Dispersion or DisCo
variations, checkpoints and resume, reproducibility across shard sizes, and the spec's checks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app import dataset_index
from app.layout import JobKeys
from app.settings import Settings
from app.spec import JobSpec, SpecError, check_models
from app.storage import LocalStorage
from models.registry import Registry
from workers import pipelines
from workers.errors import Canceled
from workers.local import generate
from workers.runtime import ModelCache

LATENT: dict[str, Any] = {
    "identities": 5, "images_per_identity": 3, "seed": 4,
    "models": {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"},
    "render": {"batch_size": 4},
}
LANGEVIN: dict[str, Any] = {
    **LATENT,
    "sampler": {"method": "langevin", "iterations": 6, "batch_size": 4},
    "variations": {"method": "disco", "iterations": 3, "batch_size": 5},
}


@pytest.fixture(scope="module")
def models(model_dir: Path) -> ModelCache:
    return ModelCache(Registry(model_dir), "cpu")


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


def test_latent_generators_default_to_dispersion_and_refuse_what_cannot_work() -> None:
    spec = JobSpec.model_validate(LATENT)
    assert spec.variations.method == "dispersion" and spec.variations.iterations == 20
    check_models(spec)
    check_models(JobSpec.model_validate(LANGEVIN))
    for body, field in (
        ({**LATENT, "models": {**LATENT["models"], "embedder": "arcface-onnx-tiny"}}, "models.embedder"),
        ({**LATENT, "variations": {"method": "embedding_noise"}}, "variations.method"),
        ({**LATENT, "models": {"generator": "arc2face-tiny"}, "variations": {"method": "dispersion"}},
         "variations.method"),
        ({**LATENT, "models": {"generator": "arc2face-tiny"}, "sampler": {"method": "langevin"}},
         "sampler.method"),
    ):
        with pytest.raises(SpecError) as e:
            check_models(JobSpec.model_validate(body))
        assert e.value.field == field
    with pytest.raises(ValueError, match="tau"):
        JobSpec.model_validate({**LANGEVIN, "sampler": {"method": "langevin", "tau": 0}})


def test_random_latents_with_dispersion_end_to_end_and_shard_size_does_not_matter(
        tmp_path: Path, model_dir: Path) -> None:
    spec = JobSpec.model_validate(LATENT)
    a = generate(spec, tmp_path / "a", settings=Settings(model_dir=model_dir, shard_identities=2))
    generate(spec, tmp_path / "again", settings=Settings(model_dir=model_dir, shard_identities=2))
    generate(spec, tmp_path / "b", settings=Settings(model_dir=model_dir, shard_identities=5))
    assert a["counts"]["images"] == 15 and a["sampling"]["method"] == "random"
    assert a["seed_derivation"]["dispersion_init"] == "derive_seed(seed, 'dispersion.init', i, s)"
    assert a["realised"]["alignment"] == {"method": "center", "failures": 0}
    assert a["quality"]["alignment_failures"] == 0 and a["quality"]["models"]["evaluator"] is not None
    files_a = _files(tmp_path / "a" / "dataset")
    assert len(files_a) == 15 and files_a == _files(tmp_path / "again" / "dataset")  # byte-identical rerun
    # Another shard plan: the same images up to float rounding in differently composed batches.
    for rel in files_a:
        x = np.asarray(Image.open(tmp_path / "a" / "dataset" / rel), dtype=np.int16)
        y = np.asarray(Image.open(tmp_path / "b" / "dataset" / rel), dtype=np.int16)
        assert np.abs(x - y).mean() < 1.0, rel
    # The variations' latents are kept per shard: 3 shards of at most 2 identities.
    assert sorted(p.parent.name for p in (tmp_path / "a" / "shards").rglob("latents.safetensors")) == [
        "00000", "00001", "00002"]


def test_langevin_and_disco_job_in_process(tmp_path: Path, model_dir: Path) -> None:
    m = generate(JobSpec.model_validate(LANGEVIN), tmp_path, settings=Settings(model_dir=model_dir))
    assert m["counts"]["images"] == 15
    sampling = m["sampling"]
    assert sampling["method"] == "langevin" and sampling["iterations"] == 6
    assert sampling["final"]["step"] == 6 and sampling["final"]["dt"] > 0
    assert set(m["models"]) == {"generator", "embedder"}
    assert "covariates.safetensors" in m["models"]["generator"]["sha256"]
    plain = {**LANGEVIN, "variations": {**LANGEVIN["variations"], "method": "dispersion"}}
    generate(JobSpec.model_validate(plain), tmp_path / "plain", settings=Settings(model_dir=model_dir))
    assert _files(tmp_path / "dataset") != _files(tmp_path / "plain" / "dataset")  # the covariates moved them


def test_langevin_repels_identities_and_resumes_bit_identically(models: ModelCache, tmp_path: Path) -> None:
    spec = JobSpec.model_validate({**LANGEVIN, "identities": 8,
                                   "sampler": {"method": "langevin", "iterations": 10, "batch_size": 3}})

    def run(root: Path, hooks: pipelines.Hooks) -> pipelines.Sampled:
        return pipelines.sample_identities(spec, models, LocalStorage(root), JobKeys(""), checkpoint_steps=3,
                                           hooks=hooks)

    whole = run(tmp_path / "whole", pipelines.Hooks())
    assert whole.latents is not None and whole.latents.shape == (8, 64)
    assert whole.embeddings.shape == (8, 512)
    random = JobSpec.model_validate({**spec.model_dump(), "sampler": {"method": "random"}})
    start = pipelines.sample_identities(random, models, LocalStorage(tmp_path / "r"), JobKeys(""))
    assert start.latents is not None
    cos = whole.embeddings @ whole.embeddings.T - 2 * torch.eye(8)
    cos0 = start.embeddings @ start.embeddings.T - 2 * torch.eye(8)
    assert cos.max() < cos0.max()  # the closest pair is further apart than where it started

    steps: list[int] = []
    with pytest.raises(Canceled):
        run(tmp_path / "cut", pipelines.Hooks(
            progress=lambda d, t, u: steps.append(d) if u == "Langevin steps" else None,
            should_stop=lambda: bool(steps) and steps[-1] >= 7))
    assert (tmp_path / "cut" / "identities" / "checkpoint.safetensors").exists()
    events: list[tuple[str, dict[str, Any]]] = []
    again = run(tmp_path / "cut", pipelines.Hooks(event=lambda t, **d: events.append((t, d))))
    assert ("resumed", {"stage": "sampling_identities", "step": 6}) in events
    assert again.latents is not None and torch.equal(again.latents, whole.latents)


def test_disco_without_covariates_fails_naming_the_file(tmp_path: Path, model_dir: Path) -> None:
    import shutil

    from models.registry import ensure_model

    models = tmp_path / "models"
    shutil.copytree(ensure_model("stylegan2-tiny", model_dir), models / "stylegan2-tiny")
    shutil.copytree(ensure_model("iresnet-tiny", model_dir), models / "iresnet-tiny")
    (models / "stylegan2-tiny" / "covariates.safetensors").unlink()
    with pytest.raises(Exception, match="covariates.safetensors"):
        generate(JobSpec.model_validate(LANGEVIN), tmp_path / "out", settings=Settings(model_dir=models))


def test_disco_top_up_disperses_new_blocks_and_keeps_the_first_images(tmp_path: Path, model_dir: Path) -> None:
    """Latent path with the quality filter: replacements are a further dispersed block per short
    identity (their own init, noise and DisCo streams); kept first images are unchanged."""
    from safetensors.torch import load_file

    spec = {**LANGEVIN, "identities": 3, "sampler": {"method": "random"}}
    plain = generate(JobSpec.model_validate(spec), tmp_path / "plain", settings=Settings(model_dir=model_dir))
    x = load_file(str(tmp_path / "plain" / "shards" / "00000" / "features.safetensors"))["job"]  # [3, 3, E]
    loo = (x * torch.nn.functional.normalize(x.sum(1, keepdim=True) - x, dim=-1)).sum(-1)  # [3, 3]
    threshold = round(float(loo.flatten().sort().values[2]), 5)  # the two lowest first images fail
    filtered = {**spec, "quality": {"min_identity_similarity": threshold, "max_topup_rounds": 10}}
    m = generate(JobSpec.model_validate(filtered), tmp_path / "f", settings=Settings(model_dir=model_dir))
    assert m["counts"]["images"] == 9 and m["counts"]["filtered"] >= 2 and m["counts"]["topped_up"] >= 2
    first = {f["path"]: f["sha256"] for f in dataset_index.local_files(tmp_path / "plain", plain)}
    m_files = list(dataset_index.local_files(tmp_path / "f", m))
    kept_first = [f for f in m_files if f["sample"] < 3]
    assert len(kept_first) <= 7 and all(first[f["path"]] == f["sha256"] for f in kept_first)
    latents = load_file(str(tmp_path / "f" / "shards" / "00000" / "latents.safetensors"))
    assert latents["latents"].shape[:2] == (3, 3)
    assert sorted(latents["samples"].flatten().tolist()) == sorted(f["sample"] for f in m_files)
