"""The `hyperface` sampler in the service: gallery from the gallery generator, checkpoints,
resume after an interruption, and the job spec's checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from app.layout import JobKeys
from app.settings import Settings
from app.spec import JobSpec, SpecError, check_models
from app.storage import LocalStorage
from models.registry import Registry
from workers import pipelines
from workers.errors import Canceled
from workers.local import generate
from workers.pipelines import embedding
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


def _sample(spec: JobSpec, models: ModelCache, root: Path, hooks: pipelines.Hooks,
            ) -> pipelines.Sampled:
    return pipelines.sample_identities(spec, models, LocalStorage(root), JobKeys(""), checkpoint_steps=10,
                                       gallery_chunk=16, hooks=hooks)


def test_hyperface_packs_identities_apart_starting_from_the_gallery(
        models: ModelCache, tmp_path: Path) -> None:
    spec = JobSpec.model_validate(HF)
    progress: list[tuple[int, int, str]] = []
    got = _sample(spec, models, tmp_path, pipelines.Hooks(
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
    whole = _sample(spec, models, tmp_path / "whole", pipelines.Hooks())
    steps: list[int] = []

    def stop_at_35() -> bool:
        return bool(steps) and steps[-1] >= 35

    with pytest.raises(Canceled):  # the worker died (here: stopped) at step 35
        _sample(spec, models, tmp_path / "cut", pipelines.Hooks(
            progress=lambda d, t, u: steps.append(d) if u == "optimiser steps" else None,
            should_stop=stop_at_35))
    assert (tmp_path / "cut" / "identities" / "checkpoint.safetensors").exists()
    events: list[tuple[str, dict[str, Any]]] = []
    resumed_steps: list[int] = []
    again = _sample(spec, models, tmp_path / "cut", pipelines.Hooks(
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


# The HyperFace paper's gallery: FR embeddings of unconditionally generated faces (StyleGAN2),
# rendered by Arc2Face. Issue 13: accepted with 202, then failed in sample_identities
# ("'StyleGAN2Generator' object has no attribute 'embedding_dim'").
HF_STYLEGAN_GALLERY: dict[str, Any] = {
    "identities": 4, "images_per_identity": 2, "seed": 13,
    "sampler": {"method": "hyperface", "iterations": 20, "alpha": 0.1, "gallery_size": 12},
    "models": {"generator": "arc2face-tiny", "gallery_generator": "stylegan2-tiny",
               "embedder": "iresnet-tiny"},
    "render": {"steps": 2, "batch_size": 8},
}


def test_latent_gallery_is_the_embedders_view_of_random_stylegan2_faces(
        models: ModelCache, tmp_path: Path) -> None:
    """Gallery item k = the job's embedder on the centre crop (stylegan2-tiny's alignment) of the
    generator's image of z_k ~ N(0, I) from derive_seed(seed, "gallery", k), truncated to 0.7."""
    from models.seeding import derive_seed, make_generator

    spec = JobSpec.model_validate(HF_STYLEGAN_GALLERY)
    check_models(spec)
    gallery = embedding.build_gallery(spec, models, LocalStorage(tmp_path), JobKeys(""), chunk=5,
                                      hooks=pipelines.Hooks())
    assert gallery.shape == (12, 512)  # the embedder's dimension: it is the embedder's view
    assert torch.allclose(gallery.norm(dim=1), torch.ones(12), atol=1e-5)
    assert torch.pdist(gallery).min() > 1e-4  # twelve different faces
    # Item 7 from its own seed alone, by the public pieces: the same bits as the chunked build.
    gen, emb = models.generator("stylegan2-tiny"), models.embedder("iresnet-tiny")
    z = make_generator(derive_seed(13, "gallery", 7)).normal(gen.style_dim)[None]  # [1, D]
    image = gen.render(z, truncation_psi=0.7)  # [1, S, S, 3] uint8
    crop = models.cropper("stylegan2-tiny")
    assert crop.alignment == "center"
    assert torch.allclose(emb.embed_images(crop(image).crops).float(), gallery[7:8], atol=1e-5)
    # Another seed, another gallery.
    other = embedding.build_gallery(JobSpec.model_validate({**HF_STYLEGAN_GALLERY, "seed": 14}), models,
                                    LocalStorage(tmp_path / "other"), JobKeys(""), chunk=16,
                                    hooks=pipelines.Hooks())
    assert not torch.allclose(other, gallery, atol=1e-3)


@pytest.mark.integration
def test_hyperface_with_a_stylegan2_gallery_through_the_service(tmp_path: Path, model_dir: Path) -> None:
    """The issue's job through the real service: the API under uvicorn, a Celery worker process,
    redis-server; the job succeeds and its manifest names the StyleGAN2 gallery."""
    import os

    import httpx

    from app.client import Client
    from app.servers import RedisServer, free_port
    from models.registry import ensure_model
    from tests.conftest import TEAM_KEYS
    from tests.servers import Proc, wait_http

    for name in ("arc2face-tiny", "stylegan2-tiny", "iresnet-tiny"):
        ensure_model(name, model_dir)  # in place before the worker reads the directory
    redis = RedisServer(tmp_path / "redis").start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDFORGE_REDIS_URL": redis.url,
           "IDFORGE_API_KEYS": TEAM_KEYS, "IDFORGE_STORAGE_DIR": str(tmp_path / "storage"),
           "IDFORGE_MODEL_DIR": str(model_dir), "IDFORGE_PUBLIC_URL": url,
           "IDFORGE_SHARD_IDENTITIES": "2", "IDFORGE_GALLERY_CHUNK": "5"}
    worker = Proc(["worker", "--queues", "gpu,cpu", "--concurrency", "1"], env, tmp_path / "worker.log")
    api = Proc(["serve", "--port", str(port)], env, tmp_path / "api.log")
    try:
        wait_http(f"{url}/healthz", proc=api)
        r = httpx.post(f"{url}/v1/jobs", json=HF_STYLEGAN_GALLERY, headers={"Authorization": "Bearer key-alpha"})
        assert r.status_code == 202, r.text
        client = Client(url, "key-alpha")
        job = client.wait(r.json()["id"], timeout=300, interval=0.5)
        assert job["status"] == "succeeded", (job, (tmp_path / "worker.log").read_text()[-3000:])
        assert job["progress"]["images_done"] == 8
        manifest = httpx.get(client.artifacts(job["id"])["manifest_url"]).json()
        assert manifest["models"]["gallery_generator"]["name"] == "stylegan2-tiny"
        assert manifest["models"]["generator"]["name"] == "arc2face-tiny"
        assert manifest["sampling"]["method"] == "hyperface" and manifest["sampling"]["gallery_size"] == 12
        assert manifest["counts"]["images"] == 8
    finally:
        api.stop()
        worker.stop()
        redis.stop()


def test_fast_mode_with_a_stylegan2_gallery_needs_only_arc2faces_lcm_lora(
        redis_server: Any, store: Any, tmp_path: Path, model_dir: Path, monkeypatch: Any) -> None:
    """The fast mode is Arc2Face's LCM-LoRA sampling; a StyleGAN2 gallery renders as it always does.
    The worker's fail-fast check asked the StyleGAN2 gallery generator for LCM-LoRA weights too,
    failing every such job at its first task even with Arc2Face's weights in place."""
    import shutil


    from app.queue import TaskQueue
    from models.registry import ensure_model, load_overrides
    from tests.models.generators.test_arc2face import place_pinned_lcm_lora
    from workers import jobs, runtime, tasking
    from workers.runtime import Runtime

    root = tmp_path / "models"
    for name in ("arc2face-tiny", "stylegan2-tiny", "iresnet-tiny"):
        shutil.copytree(ensure_model(name, model_dir), root / name)
    pins = tmp_path / "registry.json"
    place_pinned_lcm_lora(root, model_dir, pins)
    s = Settings(redis_url=redis_server.url, storage_dir=tmp_path / "storage", model_dir=root,
                 shard_identities=4, gallery_chunk=6)
    rt = Runtime(settings=s, store=store, storage=LocalStorage(s.storage_dir), queue=TaskQueue.from_settings(s),
                 models=ModelCache(Registry(root, load_overrides(pins)), "cpu"))
    monkeypatch.setattr(runtime, "_runtime", rt)
    spec = JobSpec.model_validate({**HF_STYLEGAN_GALLERY, "render": {"mode": "fast", "batch_size": 8}})
    check_models(spec)
    made = store.create("alpha", spec.normalized(), spec.spec_hash(), identities=spec.identities,
                        images=spec.identities * spec.images_per_identity)

    class Task:
        name = "idforge.test"

        class request:
            retries = 0

    tasking.run(Task(), made.job_id, "sample_identities", jobs.sample_identities)
    job = store.get(made.job_id)
    assert job is not None and job["status"] == "running", job.get("error") if job else None
    tasking.run(Task(), made.job_id, "render_shard:0", jobs.render_shard, 0)
    tasking.run(Task(), made.job_id, "finalize", jobs.finalize)
    job = store.get(made.job_id)
    assert job is not None and job["status"] == "succeeded", job
    manifest = json.loads(rt.storage.get_bytes(JobKeys.for_job(s.s3_prefix, made.job_id).manifest))
    assert manifest["spec"]["render"]["mode"] == "fast"
    assert manifest["models"]["gallery_generator"]["name"] == "stylegan2-tiny"
