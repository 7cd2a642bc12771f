"""The whole service, all real: redis-server and SeaweedFS S3 (SigV4) on free loopback ports,
a Celery worker subprocess, and the API under uvicorn."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.client import Client
from app.servers import RedisServer, free_port
from models.embedders.onnx import build_tiny as build_onnx_tiny
from models.registry import file_sha256
from tests.conftest import TEAM_KEYS
from tests.servers import S3_KEY, S3_SECRET, Proc, SeaweedS3, wait_http
from workers.provenance import platform_block

pytestmark = pytest.mark.integration


class Service:
    def __init__(self, url: str, redis: RedisServer, s3: SeaweedS3, worker: Proc, root: Path) -> None:
        self.url, self.redis, self.s3, self.worker, self.root = url, redis, s3, worker, root
        self.alpha = Client(url, "key-alpha")
        self.beta = Client(url, "key-beta")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("service")
    redis = RedisServer(root / "redis").start()
    s3 = SeaweedS3(root / "s3").start(bucket="idforge-it")
    port = free_port()
    # The worker's own model directory: the tiny presets, plus a published name (arcface-onnx)
    # whose file lives under an S3 prefix and is pinned by the operator's registry file.
    shutil.copytree(model_dir, root / "models")
    # A tiny preset whose file was tampered with: the worker must refuse it, not rebuild it.
    shutil.rmtree(root / "models" / "arcface-onnx-tiny", ignore_errors=True)
    (root / "models" / "arcface-onnx-tiny").mkdir()
    (root / "models" / "arcface-onnx-tiny" / "model.onnx").write_bytes(b"not the pinned graph")
    onnx_file = build_onnx_tiny(root / "onnx-build", seed=3) / "model.onnx"
    s3.client().upload_file(str(onnx_file), "idforge-it", "weights/arcface-onnx/arcface.onnx")
    (root / "registry.yaml").write_text(
        "models:\n  arcface-onnx:\n    location: s3://idforge-it/weights/arcface-onnx/\n"
        f"    sha256:\n      arcface.onnx: {file_sha256(onnx_file)}\n")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "IDFORGE_REDIS_URL": redis.url,
        "IDFORGE_API_KEYS": TEAM_KEYS,
        "IDFORGE_SECRET_KEY": "integration-secret",
        "IDFORGE_STORAGE": "s3",
        "IDFORGE_S3_ENDPOINT_URL": s3.endpoint,
        "IDFORGE_S3_BUCKET": "idforge-it",
        "IDFORGE_S3_ACCESS_KEY_ID": S3_KEY,
        "IDFORGE_S3_SECRET_ACCESS_KEY": S3_SECRET,
        "IDFORGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "IDFORGE_MODEL_DIR": str(root / "models"),
        "IDFORGE_MODEL_REGISTRY": str(root / "registry.yaml"),
        "IDFORGE_SHARD_IDENTITIES": "3",
        "IDFORGE_PRESIGN_EXPIRY_S": "600",
        "IDFORGE_CHECKPOINT_STEPS": "5",
        "IDFORGE_TASK_LEASE_S": "3",  # a killed worker's task is taken over within seconds
    }
    worker = Proc(["worker", "--queues", "gpu,cpu", "--concurrency", "1"], env,
                  root / "worker.log")
    api = Proc(["serve", "--port", str(port)], env, root / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=api)
        yield Service(f"http://127.0.0.1:{port}", redis, s3, worker, root)
    finally:
        api.stop()
        worker.stop()
        s3.stop()
        redis.stop()


def test_job_end_to_end_through_presigned_urls(service: Service) -> None:
    spec = {"identities": 5, "images_per_identity": 3, "seed": 11,
            "render": {"steps": 4, "batch_size": 4}, "metadata": {"ci_run": "it-1"}}
    r = httpx.post(f"{service.url}/v1/jobs", json=spec,
                   headers={"Authorization": "Bearer key-alpha"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"].endswith(f"/v1/jobs/{job_id}")
    stages: set[str] = set()
    job = service.alpha.wait(job_id, timeout=240, interval=0.2,
                             on_update=lambda j: stages.add(j.get("stage") or ""))
    assert job["status"] == "succeeded", job
    assert job["progress"]["images_done"] == job["progress"]["images_total"] == 15
    assert {"rendering", "packaging"} <= stages | {"packaging"}
    assert job["result"]["images"] == 15

    art = service.alpha.artifacts(job_id, limit=6)
    files = list(art["files"])
    while art["has_more"]:
        art = service.alpha.artifacts(job_id, limit=6, after=art["next"])
        files += art["files"]
    manifest = httpx.get(art["manifest_url"]).json()
    assert manifest["counts"]["images"] == 5 * 3 == len(files)
    assert manifest["spec"]["metadata"] == {"ci_run": "it-1"}
    assert set(manifest["models"]) == {"generator", "embedder"}
    assert all(len(h) == 64 for h in manifest["models"]["generator"]["sha256"].values())
    pairs = set()
    for f in files:
        assert f["url"].startswith(service.s3.endpoint) and "X-Amz-Signature" in f["url"]
        data = httpx.get(f["url"]).content
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.size, img.mode) == ("JPEG", (112, 112), "RGB")
        pairs.add((f["identity"], f["sample"]))
        assert f["path"] == f"dataset/imagefolder/{f['identity']:06d}/{f['sample']:03d}.jpg"
    assert pairs == {(i, s) for i in range(5) for s in range(3)}  # no duplicate, no gap
    # A tampered presigned URL is refused by the S3 server itself (SigV4).
    bad = files[0]["url"].replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert httpx.get(bad).status_code == 403
    # The event log tells the story.
    events = httpx.get(f"{service.url}/v1/jobs/{job_id}/events",
                       headers={"Authorization": "Bearer key-alpha"}).json()["events"]
    assert [e["to"] for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]


def test_every_format_the_report_and_a_byte_identical_reproduction(
        service: Service, tmp_path: Path, monkeypatch: Any) -> None:
    """A job with every layout, run by the real worker on S3; its report through the API; then
    `idforge reproduce JOB` re-runs it here from the manifest and gets the same bytes."""
    import pyarrow.parquet as pq
    import webdataset as wds
    from click.testing import CliRunner

    from workers.cli import main as cli

    spec = {"identities": 4, "images_per_identity": 3, "seed": 21, "render": {"steps": 2, "batch_size": 4},
            "output": {"formats": ["imagefolder", "webdataset", "recordio"]}}
    job_id = service.alpha.submit(spec)["id"]
    job = service.alpha.wait(job_id, timeout=240, interval=0.2)
    assert job["status"] == "succeeded", job
    q = job["result"]["quality"]
    assert q["images"] == 12 and q["models"]["job"]["genuine_pairs"] == 12
    assert q["models"]["evaluator"]["name"].startswith("sface")
    assert job["result"]["counts"]["rendered"] == 12
    art = service.alpha.artifacts(job_id)
    objects = {o["path"]: o for o in art["objects"]}
    assert set(objects) == {"dataset/webdataset/000000.tar", "dataset/webdataset/000001.tar",
                            "dataset/recordio/train.rec", "dataset/recordio/train.idx",
                            "dataset/recordio/train.lst", "dataset/recordio/property",
                            "dataset/index.parquet", "dataset/objects.jsonl", "identities/embeddings.safetensors"}
    for o in objects.values():
        data = httpx.get(o["url"]).content
        assert hashlib.sha256(data).hexdigest() == o["sha256"]
        (tmp_path / o["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / o["path"]).write_bytes(data)
    samples = [s for k in (0, 1) for s in wds.WebDataset(str(tmp_path / f"dataset/webdataset/00000{k}.tar"),
                                                          shardshuffle=False)]
    assert sorted(int(s["cls"]) for s in samples) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(pq.read_table(tmp_path / "dataset/index.parquet")) == 12
    assert (tmp_path / "dataset/recordio/property").read_text() == "4,112,112"
    html = httpx.get(art["report"]["html"])
    assert html.status_code == 200 and "data:image/png;base64," in html.text
    assert set(art["report"]["plots"]) >= {"roc.png", "det.png", "scores_job.png", "contact_sheet.png"}

    for name, value in (("IDFORGE_API_KEY", "key-alpha"), ("IDFORGE_MODEL_DIR", str(service.root / "models")),
                        ("IDFORGE_MODEL_REGISTRY", str(service.root / "registry.yaml"))):
        monkeypatch.setenv(name, value)
    r = CliRunner().invoke(cli, ["reproduce", job_id, "--url", service.url, "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    assert "images: 12/12 byte-identical; dataset objects: 7/7 byte-identical" in r.output
    assert r.output.splitlines()[-1] == "verdict: identical"
    # Under another CPU instruction set (no SIMD in torch) the bytes may differ: each image that does
    # is measured against the job's copy, fetched through its presigned URL.
    if platform_block("cpu")["cpu_capability"] != "DEFAULT":
        p = subprocess.run([sys.executable, "-m", "workers.cli", "reproduce", job_id, "--url", service.url,
                            "--out", str(tmp_path / "isa"), "--json"], capture_output=True, text=True,
                           env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}, timeout=280, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        rep = json.loads(p.stdout)
        assert rep["verdict"] in ("identical", "equivalent")
        assert "cpu_capability: " + platform_block("cpu")["cpu_capability"] + " -> DEFAULT" in \
            rep["platform"]["differences"]
        assert len(rep["per_image"]) == 12 and all(
            row["cosine"] >= 0.95 and row["max_pixel_diff"] is not None and row["note"] is None
            for row in rep["per_image"])
        print(f"\nservice job, {platform_block('cpu')['cpu_capability']} worker -> DEFAULT reproduce: "
              f"{rep['images']['byte_identical']}/12 byte-identical, worst max pixel diff "
              f"{rep['worst_max_pixel_diff']}, min cosine {rep['lowest_cosine']}")


def test_jobs_without_loose_images_download_and_reproduce_from_the_index(
        service: Service, tmp_path: Path, monkeypatch: Any) -> None:
    """WebDataset-only and RecordIO-only jobs on S3: no loose image is stored, the index names each
    image's tar member or record, the artifacts pages list them (paged through ranged reads of the
    index), `idforge download` fetches and checks them, `idforge reproduce` re-renders them and
    compares image by image through the index."""
    from click.testing import CliRunner

    from app import dataset_index
    from app.storage import S3Storage
    from workers.cli import main as cli

    base = {"identities": 4, "images_per_identity": 2, "seed": 31, "quality": {"report": False},
            "models": {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"},
            "variations": {"method": "dispersion", "iterations": 2}, "render": {"batch_size": 8}}
    ids = {fmt: service.alpha.submit({**base, "output": {"formats": [fmt]}})["id"]
           for fmt in ("webdataset", "recordio")}
    s3 = S3Storage("idforge-it", client=service.s3.client())
    for name, value in (("IDFORGE_API_KEY", "key-alpha"), ("IDFORGE_MODEL_DIR", str(service.root / "models")),
                        ("IDFORGE_MODEL_REGISTRY", str(service.root / "registry.yaml"))):
        monkeypatch.setenv(name, value)
    for fmt, job_id in ids.items():
        job = service.alpha.wait(job_id, timeout=240, interval=0.2)
        assert job["status"] == "succeeded", job
        assert not list(s3.list_keys(f"jobs/{job_id}/dataset/imagefolder"))
        pages = [service.alpha.artifacts(job_id, limit=3)]
        while pages[-1]["has_more"]:
            pages.append(service.alpha.artifacts(job_id, limit=3, after=pages[-1]["next"]))
        files = [f for p in pages for f in p["files"]]
        assert [(f["identity"], f["sample"]) for f in files] == [(i, s) for i in range(4) for s in range(2)]
        assert len(pages) == 3 and "files" not in pages[0]["manifest"]
        assert pages[0]["manifest"]["manifest_version"] == 3
        for f in files:
            assert f["path"] is None and "X-Amz-Signature" in f["url"]
            if fmt == "webdataset":
                assert f["member"] == f"{f['identity']:06d}_{f['sample']:03d}.jpg"
                # the image's bytes straight from its tar, by the Range the listing gives
                data = httpx.get(f["url"], headers={"Range": f["range"]}).content
            else:
                assert f["record_id"] == 1 + 2 * f["identity"] + f["sample"] and "range" not in f
                data = dataset_index.read_record(
                    lambda a, n, u=f["url"]: httpx.get(u, headers={"Range": f"bytes={a}-{a + n - 1}"}).content,
                    f["record_offset"])
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
        got = service.alpha.download(job_id, tmp_path / fmt)
        assert got == 8 and not (tmp_path / fmt / "dataset/imagefolder").exists()
        assert len(list(dataset_index.local_files(tmp_path / fmt))) == 8
        r = CliRunner().invoke(cli, ["reproduce", job_id, "--url", service.url, "--out", str(tmp_path / f"r-{fmt}")])
        assert r.exit_code == 0, r.output
        assert "images: 8/8 byte-identical" in r.output and r.output.splitlines()[-1] == "verdict: identical"
    # A forged cursor is a 422 naming `after`, not a 500.
    r = httpx.get(f"{service.url}/v1/jobs/{ids['webdataset']}/artifacts", params={"after": "MC4wLjA"},
                  headers={"Authorization": "Bearer key-alpha"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.after"


def test_models_come_from_the_registry_and_absent_ones_fail_fast(service: Service) -> None:
    auth = {"Authorization": "Bearer key-alpha"}
    deadline = time.monotonic() + 60
    while True:  # the worker publishes what it verified once its pool process is up
        models = {m["name"]: m for m in httpx.get(f"{service.url}/v1/models", headers=auth).json()["models"]}
        if models["arcface-onnx"]["available"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(m["available"] for n, m in models.items() if m["tiny"] and n != "arcface-onnx-tiny"), models
    tampered = models["arcface-onnx-tiny"]
    assert tampered["available"] is False and "does not match the pinned" in tampered["reason"]
    log = (service.root / "worker.log").read_text()
    assert "model arcface-onnx-tiny refused: model.onnx: sha256" in log
    assert "model arc2face refused: 11 file(s) missing" in log
    # Fetched from the S3 prefix and checked against the operator's pin.
    assert models["arcface-onnx"]["available"] is True, models["arcface-onnx"]
    arc2face = models["arc2face"]
    assert arc2face["available"] is False
    assert "arc2face/diffusion_pytorch_model.safetensors" in arc2face["reason"]

    # A job naming a model whose weights are absent is refused at once, naming the files.
    r = httpx.post(f"{service.url}/v1/jobs", headers=auth, json={
        "identities": 2, "images_per_identity": 1,
        "models": {"generator": "arc2face", "embedder": "arcface-onnx"}})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["code"] == "model_unavailable" and err["errors"][0]["field"] == "models.generator"
    assert "encoder/pytorch_model.bin" in err["detail"] and "FoivosPar/Arc2Face" in err["detail"]

    # The worker runs a job with the S3-fetched ONNX embedder.
    job_id = service.alpha.submit({"identities": 3, "images_per_identity": 2, "seed": 2,
                                   "models": {"embedder": "arcface-onnx"},
                                   "render": {"steps": 2}})["id"]
    job = service.alpha.wait(job_id, timeout=120, interval=0.2)
    assert job["status"] == "succeeded", job
    manifest = httpx.get(service.alpha.artifacts(job_id)["manifest_url"]).json()
    embedder = manifest["models"]["embedder"]
    assert embedder["name"] == "arcface-onnx"
    assert embedder["sha256"] == {"arcface.onnx": file_sha256(service.root / "onnx-build" / "model.onnx")}


def test_same_idempotency_key_twice_gives_one_job(service: Service) -> None:
    spec = {"identities": 2, "images_per_identity": 1, "render": {"steps": 2}}
    a = service.alpha.submit(spec, idempotency_key="it-idem")
    b = service.alpha.submit(spec, idempotency_key="it-idem")
    assert a["id"] == b["id"]
    assert service.alpha.wait(a["id"], timeout=120)["status"] == "succeeded"
    listed = httpx.get(f"{service.url}/v1/jobs?limit=100",
                       headers={"Authorization": "Bearer key-alpha"}).json()["jobs"]
    assert sum(1 for j in listed if j["spec"] == a["spec"]) == 1


def test_cancel_mid_job_ends_canceled(service: Service) -> None:
    spec = {"identities": 30, "images_per_identity": 8, "render": {"steps": 8, "batch_size": 2}}
    job_id = service.alpha.submit(spec)["id"]
    deadline = time.monotonic() + 120
    while True:
        job = service.alpha.job(job_id)
        if job["progress"]["images_done"] > 0:
            break
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)
    assert service.alpha.cancel(job_id)["status"] in ("canceling", "canceled")
    job = service.alpha.wait(job_id, timeout=60, interval=0.2)
    assert job["status"] == "canceled"
    assert job["progress"]["images_done"] < 240  # it stopped, it did not run to the end
    assert service.alpha.cancel(job_id)["status"] == "canceled"  # idempotent


def test_teams_are_isolated_and_bad_keys_refused(service: Service) -> None:
    job_id = service.alpha.submit({"identities": 1, "images_per_identity": 1,
                                   "render": {"steps": 1}})["id"]
    other = httpx.get(f"{service.url}/v1/jobs/{job_id}",
                      headers={"Authorization": "Bearer key-beta"})
    assert other.status_code == 404 and other.json()["code"] == "not_found"
    wrong = httpx.get(f"{service.url}/v1/jobs/{job_id}",
                      headers={"Authorization": "Bearer key-gamma"})
    assert wrong.status_code == 401
    assert wrong.headers["content-type"].startswith("application/problem+json")
    assert service.alpha.wait(job_id, timeout=120)["status"] == "succeeded"
    art = httpx.get(f"{service.url}/v1/jobs/{job_id}/artifacts",
                    headers={"Authorization": "Bearer key-beta"})
    assert art.status_code == 404


def test_readiness_reports_all_backends(service: Service) -> None:
    r = httpx.get(f"{service.url}/readyz")
    body: dict[str, Any] = r.json()
    assert r.status_code == 200 and body["checks"] == {"redis": "ok", "storage": "ok",
                                                        "broker": "ok"}


def _pool_children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_worker_killed_mid_sampling_resumes_from_checkpoint(service: Service) -> None:
    import signal

    spec = {"identities": 24, "images_per_identity": 1, "seed": 5,
            "sampler": {"method": "hyperface", "iterations": 4000, "gallery_size": 32,
                        "alpha": 0.1},
            "render": {"steps": 1, "batch_size": 16}}
    job_id = service.alpha.submit(spec)["id"]
    deadline = time.monotonic() + 120
    while True:  # wait until the optimiser is past a checkpoint
        job = service.alpha.job(job_id)
        st = job["progress"]["stage"]
        if st["unit"] == "optimiser steps" and st["done"] >= 12:
            break
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.05)
    children = _pool_children(service.worker.proc.pid)
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)  # the pool process dies mid-task, as on OOM
    job = service.alpha.wait(job_id, timeout=240, interval=0.2)
    assert job["status"] == "succeeded", job
    events = httpx.get(f"{service.url}/v1/jobs/{job_id}/events",
                       headers={"Authorization": "Bearer key-alpha"}).json()["events"]
    resumed = [int(e["step"]) for e in events if e["type"] == "resumed"]
    assert resumed and resumed[0] >= 10, events  # from its checkpoint, not from scratch
    assert job["result"]["images"] == 24


def test_langevin_identities_with_disco_variations(service: Service) -> None:
    """A latent-space job through the real worker: Langevin in one checkpointed task, then
    DisCo per shard (IDFORGE_SHARD_IDENTITIES=3: two shards)."""
    job_id = service.alpha.submit({
        "identities": 5, "images_per_identity": 2, "seed": 8,
        "models": {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"},
        "sampler": {"method": "langevin", "iterations": 8},
        "variations": {"method": "disco", "iterations": 3}})["id"]
    job = service.alpha.wait(job_id, timeout=180, interval=0.2)
    assert job["status"] == "succeeded", job
    manifest = httpx.get(service.alpha.artifacts(job_id)["manifest_url"]).json()
    assert manifest["counts"]["images"] == 10 and manifest["counts"]["shards"] == 2
    assert manifest["sampling"]["method"] == "langevin"
    assert manifest["spec"]["variations"]["method"] == "disco"
    events = httpx.get(f"{service.url}/v1/jobs/{job_id}/events",
                       headers={"Authorization": "Bearer key-alpha"}).json()["events"]
    # IDFORGE_CHECKPOINT_STEPS=5: the Langevin state was saved at step 5 of 8
    assert [int(e["step"]) for e in events if e["type"] == "checkpoint"] == [5]
