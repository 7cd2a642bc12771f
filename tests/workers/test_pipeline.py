"""The worker pipeline in-process with the tiny presets: shards, orchestration against a real
Redis (tasks land on the real broker lists), redelivery, cancellation and reproducibility."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from app import dataset_index
from app.jobstore import JobStore
from app.layout import JobKeys
from app.queue import FINALIZE, RENDER_SHARD, TaskQueue
from app.servers import RedisServer
from app.settings import Settings
from app.spec import JobSpec, plan_shards
from app.storage import LocalStorage
from models.alignment.cropper import Cropper
from models.registry import Registry
from workers import artifacts, finalize, jobs
from workers.errors import Canceled, JobGone
from workers.local import generate
from workers.pipelines import Hooks, embedding
from workers.runtime import ModelCache, Runtime

SPEC: dict[str, Any] = {"identities": 5, "images_per_identity": 2, "seed": 3,
                        "render": {"steps": 3, "batch_size": 3}}


def test_plan_shards_covers_every_identity_once() -> None:
    for n, size in ((1, 1), (5, 2), (64, 64), (65, 64), (1000, 7)):
        shards = plan_shards(n, size)
        flat = [i for r in shards for i in r]
        assert flat == list(range(n)) and max(len(r) for r in shards) <= size
    with pytest.raises(ValueError, match="identities"):
        plan_shards(0, 4)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# How far an image may move when its batch is composed differently (another shard plan), in grey
# levels of the decoded file, measured with this test's job at seeds 0-5 under ATEN_CPU_CAPABILITY
# default and avx2 with 1 and 2 threads (24 runs of 10 images): PNG, the rendered pixels themselves,
# differ by at most 1 (0-41 values of an image set: float rounding that straddles a level). JPEG
# turns such a level into up to 7 (a requantised DCT coefficient moves a whole 8x8 block), with no
# useful bound, so the test writes PNG; 2 leaves one level of margin over what was measured.
SHARD_PLAN_MAX_DIFF = 2


def test_generate_is_reproducible_and_shard_size_does_not_change_images(
        tmp_path: Path, model_dir: Path) -> None:
    spec = JobSpec.model_validate({**SPEC, "output": {"image_format": "png"}})
    m1 = generate(spec, tmp_path / "a", settings=Settings(model_dir=model_dir, shard_identities=2))
    m2 = generate(spec, tmp_path / "b", settings=Settings(model_dir=model_dir, shard_identities=2))
    m3 = generate(spec, tmp_path / "c", settings=Settings(model_dir=model_dir, shard_identities=5))
    a, b = _files(tmp_path / "a" / "dataset"), _files(tmp_path / "b" / "dataset")
    # 10 images, a WebDataset tar per shard and the Parquet index: byte-identical reruns
    assert sorted(k for k in a if not k.startswith("imagefolder/")) == [
        "index.parquet", "objects.jsonl", "webdataset/000000.tar", "webdataset/000001.tar",
        "webdataset/000002.tar"]
    assert len(a) == 15 and a == b
    files1 = list(dataset_index.local_files(tmp_path / "a", m1))
    assert files1 == list(dataset_index.local_files(tmp_path / "b", m2)) and m1["spec_hash"] == m2["spec_hash"]
    assert len(files1) == 10 and "files" not in m1
    assert m1["outputs"] == m2["outputs"]
    # Same images whatever the shard plan: each depends only on (seed, identity, sample), up to
    # float rounding in differently composed batches (SHARD_PLAN_MAX_DIFF).
    import numpy as np
    from PIL import Image

    for rel in (k for k in a if k.startswith("imagefolder/")):
        x = np.asarray(Image.open(tmp_path / "a" / "dataset" / rel), dtype=np.int16)
        y = np.asarray(Image.open(tmp_path / "c" / "dataset" / rel), dtype=np.int16)
        assert rel.endswith(".png") and np.abs(x - y).max() <= SHARD_PLAN_MAX_DIFF, rel
    assert m3["counts"]["shards"] == 1 and m1["counts"]["shards"] == 3


def test_other_seed_gives_other_images(tmp_path: Path, model_dir: Path) -> None:
    s = Settings(model_dir=model_dir)
    generate(JobSpec.model_validate({**SPEC, "identities": 1}), tmp_path / "a", settings=s)
    generate(JobSpec.model_validate({**SPEC, "identities": 1, "seed": 4}), tmp_path / "b",
             settings=s)
    a, b = _files(tmp_path / "a" / "dataset"), _files(tmp_path / "b" / "dataset")
    assert len(a) == 5 and a.keys() == b.keys() and all(a[k] != b[k] for k in a)


@pytest.fixture
def rt(redis_server: RedisServer, store: JobStore, tmp_path: Path, model_dir: Path) -> Runtime:
    s = Settings(redis_url=redis_server.url, storage_dir=tmp_path / "storage",
                 model_dir=model_dir, shard_identities=2)
    return Runtime(settings=s, store=store, storage=LocalStorage(s.storage_dir),
                   queue=TaskQueue.from_settings(s), models=ModelCache(Registry(model_dir), "cpu"))


def _submit(rt: Runtime, body: dict[str, Any]) -> tuple[str, JobSpec]:
    spec = JobSpec.model_validate(body)
    made = rt.store.create("alpha", spec.normalized(), spec.spec_hash(),
                           identities=spec.identities,
                           images=spec.identities * spec.images_per_identity)
    return made.job_id, spec


def _tasks(rt: Runtime, queue: str) -> list[tuple[str, list[Any]]]:
    out = []
    while (raw := rt.store.r.rpop(queue)) is not None:
        msg = json.loads(raw)
        out.append((msg["headers"]["task"], json.loads(__import__("base64").b64decode(
            msg["body"]))[0]))
    return out


def test_orchestration_runs_shards_and_tolerates_redelivery(rt: Runtime) -> None:
    job_id, spec = _submit(rt, SPEC)
    jobs.sample_identities(rt, job_id)
    assert _tasks(rt, "gpu") == []  # held by the scheduler, not sent
    keys = JobKeys.for_job(rt.settings.s3_prefix, job_id)
    first = rt.storage.get_bytes(keys.identities)
    jobs.sample_identities(rt, job_id)  # redelivered: resumes from the saved identities, holds once
    assert rt.storage.get_bytes(keys.identities) == first
    assert rt.scheduler.snapshot().jobs[job_id].total == 3
    assert rt.scheduler.release() == [(job_id, 0)]  # no worker heartbeats: one slot
    for k in range(3):  # released one at a time, each as the previous one finishes
        assert _tasks(rt, "gpu") == [(RENDER_SHARD, [job_id, k])]
        jobs.render_shard(rt, job_id, k)
        rt.scheduler.release()
    assert _tasks(rt, "gpu") == [] and job_id not in rt.scheduler.snapshot().jobs
    jobs.render_shard(rt, job_id, 1)  # redelivered after it finished: skipped, not re-counted
    assert _tasks(rt, "cpu") == [(FINALIZE, [job_id]), (FINALIZE, [job_id])]
    job = rt.store.get(job_id)
    assert job is not None and job["progress"]["images_done"] == 10
    jobs.finalize(rt, job_id)
    with pytest.raises(JobGone):  # a second finalize finds a terminal job: nothing to do
        jobs.finalize(rt, job_id)
    job = rt.store.get(job_id)
    assert job is not None and job["status"] == "succeeded", job
    manifest = json.loads(rt.storage.get_bytes(keys.manifest))
    index = rt.storage.get_bytes(keys.index)
    listed = list(dataset_index.iter_index(lambda a, n: index[a:a + n], len(index)))
    assert manifest["counts"]["images"] == 10 and len(listed) == 10 and "files" not in manifest
    assert manifest["index"]["sha256"] == manifest["outputs"]["dataset/index.parquet"]["sha256"]
    assert job["result"]["manifest"] == keys.manifest


def test_finalize_before_every_shard_is_done_waits(rt: Runtime) -> None:
    job_id, _ = _submit(rt, SPEC)
    jobs.sample_identities(rt, job_id)
    jobs.render_shard(rt, job_id, 0)
    jobs.finalize(rt, job_id)
    job = rt.store.get(job_id)
    assert job is not None and job["status"] == "running"
    assert not rt.storage.exists(JobKeys.for_job(rt.settings.s3_prefix, job_id).manifest)


def test_cancel_stops_between_batches(rt: Runtime) -> None:
    job_id, spec = _submit(rt, {**SPEC, "render": {"steps": 2, "batch_size": 1}})
    jobs.sample_identities(rt, job_id)
    batches = []

    def stop_after_two() -> bool:
        batches.append(1)
        if len(batches) == 3:
            rt.store.request_cancel(job_id)
        return rt.store.status(job_id) == "canceling"

    keys = JobKeys.for_job(rt.settings.s3_prefix, job_id)
    refs = artifacts.load_identities(rt.storage, keys)[0:2]
    with pytest.raises(Canceled):
        embedding.render_references(spec, 0, range(0, 2), refs, rt.models.generator("arc2face-tiny"),
                                    rt.models.embedder("iresnet-tiny"), rt.storage, keys,
                                    hooks=Hooks(should_stop=stop_after_two))
    assert len(batches) == 3  # two batches of one image rendered, then it stopped before the third
    # A shard's outputs are written when it completes: a canceled shard leaves none.
    assert list(rt.storage.list_keys(keys.key("dataset"))) == []
    assert not rt.storage.exists(keys.shard_done(0))
    with pytest.raises(JobGone):
        jobs.render_shard(rt, job_id, 1)  # the next task sees `canceling` and finishes the cancel
    job = rt.store.get(job_id)
    assert job is not None and job["status"] == "canceled"
    assert rt.storage.exists(keys.key("CANCELED"))


def test_a_task_that_keeps_killing_its_worker_fails_the_job(rt: Runtime, monkeypatch: Any) -> None:
    from workers import runtime, tasking

    monkeypatch.setattr(runtime, "_runtime", rt)
    job_id, _ = _submit(rt, SPEC)
    rt.store.transition(job_id, "running")
    for _ in range(rt.settings.max_task_attempts):  # deliveries that died mid-task
        tasking.TaskLedger(rt.store.r).incr_attempt(job_id, "render_shard:0")

    class Task:
        name = "idforge.test"

        class request:
            retries = 0

    tasking.run(Task(), job_id, "render_shard:0", jobs.render_shard, 0)  # type: ignore[arg-type]
    job = rt.store.get(job_id)
    assert job is not None and job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost" and "render_shard:0" in job["error"]["message"]


def test_manifest_seed_derivation_reproduces_the_seeds(tmp_path: Path, model_dir: Path) -> None:
    """The manifest's seed recipe, followed literally, gives the seeds it lists."""
    import hashlib

    m = generate(JobSpec.model_validate({**SPEC, "identities": 2}), tmp_path,
                 settings=Settings(model_dir=model_dir))
    assert "json.dumps" in m["seed_derivation"]["function"]

    def by_recipe(*parts: object) -> int:
        blob = json.dumps(list(parts), separators=(",", ":")).encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1

    for f in dataset_index.local_files(tmp_path, m):
        assert f["seed"] == by_recipe(m["seed"], "render", f["identity"], f["sample"])


def test_images_without_a_face_are_flagged_and_counted(rt: Runtime) -> None:
    job_id, spec = _submit(rt, {**SPEC, "identities": 2, "images_per_identity": 2})
    jobs.sample_identities(rt, job_id)
    keys = JobKeys.for_job(rt.settings.s3_prefix, job_id)
    refs = artifacts.load_identities(rt.storage, keys)[0:2]
    # The tiny generator's images are noise: landmark alignment finds no face in any of them.
    res = embedding.render_references(spec, 0, range(0, 2), refs, rt.models.generator("arc2face-tiny"),
                                      rt.models.embedder("iresnet-tiny"), rt.storage, keys,
                                      crop=Cropper("landmarks"))
    assert res.alignment == "landmarks" and res.alignment_failures == 4
    assert [f["aligned"] for f in res.files] == [False] * 4
    shard = artifacts.load_shard(rt.storage, keys, 0)
    assert shard["alignment"] == "landmarks"
    assert finalize.counts(spec, [shard])["alignment_failures"] == 4


def test_a_job_naming_a_model_without_weights_fails_at_once_naming_the_files(
        rt: Runtime, monkeypatch: Any) -> None:
    from workers import runtime, tasking

    monkeypatch.setattr(runtime, "_runtime", rt)
    job_id, _ = _submit(rt, {**SPEC, "models": {"embedder": "arcface-r50"}})

    class Task:
        name = "idforge.test"

        class request:
            retries = 0

    tasking.run(Task(), job_id, "sample_identities", jobs.sample_identities)  # type: ignore[arg-type]
    job = rt.store.get(job_id)
    assert job is not None and job["status"] == "failed"
    assert job["error"]["code"] == "model_unavailable"
    assert "backbone.pth" in job["error"]["message"] and "arcface_torch" in job["error"]["message"]
    assert rt.storage.exists(JobKeys.for_job(rt.settings.s3_prefix, job_id).spec) is False  # nothing ran


def test_fast_mode_runs_with_pinned_lcm_lora_and_fails_fast_without(
        rt: Runtime, tmp_path: Path, model_dir: Path, monkeypatch: Any) -> None:

    from models.registry import ensure_model, load_overrides
    from tests.models.generators.test_arc2face import place_pinned_lcm_lora
    from workers import runtime, tasking

    monkeypatch.setattr(runtime, "_runtime", rt)
    body = {**SPEC, "identities": 2, "images_per_identity": 1, "render": {"mode": "fast"}}
    assert JobSpec.model_validate(body).render.steps == 4  # the fast mode's own defaults

    class Task:
        name = "idforge.test"

        class request:
            retries = 0

    # Without its LCM-LoRA weights the job fails at its first task, saying which file goes where.
    job_id, _ = _submit(rt, body)
    tasking.run(Task(), job_id, "sample_identities", jobs.sample_identities)  # type: ignore[arg-type]
    job = rt.store.get(job_id)
    assert job is not None and job["status"] == "failed" and job["error"]["code"] == "model_unavailable"
    assert "lcm-lora/pytorch_lora_weights.safetensors" in job["error"]["message"]

    # Placed and pinned, the worker loads it and renders with 4 LCM steps.
    models = tmp_path / "models"
    shutil.copytree(ensure_model("arc2face-tiny", model_dir), models / "arc2face-tiny")
    shutil.copytree(ensure_model("iresnet-tiny", model_dir), models / "iresnet-tiny")
    pins = tmp_path / "registry.json"
    place_pinned_lcm_lora(models, model_dir, pins)
    fast_rt = Runtime(settings=rt.settings, store=rt.store, storage=rt.storage, queue=rt.queue,
                      models=ModelCache(Registry(models, load_overrides(pins)), "cpu"))
    monkeypatch.setattr(runtime, "_runtime", fast_rt)
    job_id, _ = _submit(rt, body)
    tasking.run(Task(), job_id, "sample_identities", jobs.sample_identities)  # type: ignore[arg-type]
    tasking.run(Task(), job_id, "render_shard:0", jobs.render_shard, 0)  # type: ignore[arg-type]
    tasking.run(Task(), job_id, "finalize", jobs.finalize)  # type: ignore[arg-type]
    job = rt.store.get(job_id)
    assert job is not None and job["status"] == "succeeded", job
    manifest = json.loads(rt.storage.get_bytes(JobKeys.for_job(rt.settings.s3_prefix, job_id).manifest))
    assert manifest["spec"]["render"]["mode"] == "fast" and manifest["spec"]["render"]["steps"] == 4
    assert "lcm-lora/pytorch_lora_weights.safetensors" in manifest["models"]["generator"]["sha256"]
