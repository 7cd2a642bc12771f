"""The `hyperface` sampler in the service: gallery from the gallery generator, checkpoints,
resume after an interruption, and the job spec's checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from app.settings import Settings
from app.spec import JobSpec, SpecError, check_models
from app.storage import JobKeys, LocalStorage
from workers import identities
from workers.local import generate
from workers.pipeline import Canceled
from models.registry import Registry
from workers.runtime import ModelCache

HF: dict[str, Any] = {
    "identities": 12, "images_per_identity": 2, "seed": 9,
    "sampler": {"method": "hyperface", "iterations": 60, "alpha": 0.1, "gallery_size": 40,
                "learning_rate": 0.02},
    "render": {"steps": 2, "batch_size": 8},
}


@pytest.fixture(scope="module")
def models(model_dir: Path) -> ModelCache:
    return ModelCache(Registry(model_dir), "cpu")


def _sample(spec: JobSpec, models: ModelCache, root: Path, hooks: identities.Hooks,
            ) -> identities.Sampled:
    return identities.sample(spec, models, LocalStorage(root), JobKeys(""), checkpoint_steps=10,
                             gallery_chunk=16, hooks=hooks)


def test_hyperface_packs_identities_apart_starting_from_the_gallery(
        models: ModelCache, tmp_path: Path) -> None:
    spec = JobSpec.model_validate(HF)
    progress: list[tuple[int, int, str]] = []
    got = _sample(spec, models, tmp_path, identities.Hooks(
        progress=lambda d, t, u: progress.append((d, t, u))))
    x = got.embeddings
    assert x.shape == (12, 512)
    assert torch.allclose(x.norm(dim=1), torch.ones(12), atol=1e-5)
    assert got.stats["min_angle_deg"] > got.stats["init_min_angle_deg"]
    assert ("gallery images" in {u for _, _, u in progress}
            and (60, 60, "optimiser steps") in progress)
    # The gallery was saved chunk by chunk: 40 images in chunks of 16.
    chunks = sorted(p.name for p in (tmp_path / "identities" / "gallery").iterdir())
    assert chunks == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]


def test_interrupted_sampling_resumes_from_its_checkpoint_to_the_same_result(
        models: ModelCache, tmp_path: Path) -> None:
    spec = JobSpec.model_validate(HF)
    whole = _sample(spec, models, tmp_path / "whole", identities.Hooks())
    steps: list[int] = []

    def stop_at_35() -> bool:
        return bool(steps) and steps[-1] >= 35

    with pytest.raises(Canceled):  # the worker died (here: stopped) at step 35
        _sample(spec, models, tmp_path / "cut", identities.Hooks(
            progress=lambda d, t, u: steps.append(d) if u == "optimiser steps" else None,
            should_stop=stop_at_35))
    assert (tmp_path / "cut" / "identities" / "checkpoint.safetensors").exists()
    events: list[tuple[str, dict[str, Any]]] = []
    resumed_steps: list[int] = []
    again = _sample(spec, models, tmp_path / "cut", identities.Hooks(
        progress=lambda d, t, u: resumed_steps.append(d) if u == "optimiser steps" else None,
        event=lambda t, **d: events.append((t, d))))
    assert ("resumed", {"stage": "sampling_identities", "step": 30}) in events
    assert resumed_steps[0] == 31  # it did not start again from step 1
    assert torch.equal(again.embeddings, whole.embeddings)  # bit-identical on CPU


def test_hyperface_job_end_to_end_in_process(tmp_path: Path, model_dir: Path) -> None:
    m = generate(JobSpec.model_validate(HF), tmp_path, settings=Settings(model_dir=model_dir))
    assert m["counts"]["images"] == 24
    assert m["sampling"]["method"] == "hyperface" and m["sampling"]["gallery_size"] == 40
    assert set(m["models"]) == {"generator", "embedder", "gallery_generator"}
    assert m["realised"]["noise_scale"] == 0.05 and m["realised"]["variations"] == "embedding_noise"


def test_target_cosine_sets_the_noise_scale_and_is_realised(tmp_path: Path,
                                                            model_dir: Path) -> None:
    spec = JobSpec.model_validate({"identities": 6, "images_per_identity": 8, "seed": 1,
                                   "variations": {"method": "embedding_noise",
                                                  "target_cosine": 0.9},
                                   "render": {"steps": 1, "batch_size": 16}})
    m = generate(spec, tmp_path, settings=Settings(model_dir=model_dir))
    realised = m["realised"]["reference_cosine"] | {"noise_scale": m["realised"]["noise_scale"]}
    assert abs(realised["mean"] - 0.9) < 0.02 and realised["noise_scale"] < 0.05
    marker = json.loads((tmp_path / "shards" / "00000" / "done.json").read_text())
    assert len(marker["reference_cosine"]) == 6


def test_hyperface_spec_checks() -> None:
    spec = JobSpec.model_validate(HF)
    check_models(spec)  # arc2face-tiny and iresnet-tiny are both 512-d
    with pytest.raises(ValueError):
        JobSpec.model_validate({**HF, "sampler": {**HF["sampler"], "batch_size": 1}})
    with pytest.raises(ValueError):
        JobSpec.model_validate({**HF, "variations": {"method": "embedding_noise",
                                                     "target_cosine": 1.5}})
    bad = JobSpec.model_validate({**HF, "models": {"gallery_generator": "iresnet-tiny"}})
    with pytest.raises(SpecError) as e:
        check_models(bad)
    assert e.value.field == "models.gallery_generator"
