"""Shared by the /ui and `idforge report` tests: the real API served by uvicorn on a loopback port,
local storage in a temporary directory, and jobs of two teams seeded straight through the JobStore
and the storage (no worker), with a quality report that follows the report contract."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from app.api.main import create_app
from app.jobstore import JobStore
from app.layout import JobKeys
from app.servers import free_port
from app.settings import Settings
from app.spec import JobSpec
from app.storage import LocalStorage, sha256_hex
from tests.conftest import TEAM_KEYS

PREFIX = "jobs"

# The job result's `quality` summary of the succeeded job (the report contract's shape).
QUALITY: dict[str, Any] = {
    "images": 120, "identities": 10,
    "models": {
        "job": {"name": "iresnet-tiny", "eer": 0.0312, "fnmr_at_fmr": {"1e-3": 0.0871, "1e-4": 0.1534},
                "threshold_at_fmr": {"1e-3": 0.412, "1e-4": 0.503}, "genuine_mean": 0.71,
                "impostor_mean": 0.02, "genuine_pairs": 660, "impostor_pairs": 6480,
                "min_centre_angle_deg": 61.24, "nn_centre_angle_deg_mean": 74.31, "close_identities": 2,
                "label_flips": 1, "intra_class_cosine_mean": 0.68},
        "evaluator": {"name": "sface", "eer": 0.0457, "fnmr_at_fmr": {"1e-3": 0.1023, "1e-4": None},
                      "threshold_at_fmr": {"1e-3": 0.388, "1e-4": None}, "genuine_mean": 0.64,
                      "impostor_mean": 0.05, "genuine_pairs": 660, "impostor_pairs": 6480,
                      "min_centre_angle_deg": 48.67, "nn_centre_angle_deg_mean": 66.02,
                      "close_identities": 4, "label_flips": 3, "intra_class_cosine_mean": 0.61},
    },
    "alignment_failures": 5,
    "counts": {"requested": 128, "rendered": 128, "alignment_failures": 5, "filtered": 8, "topped_up": 0},
    "leakage": {"reference": "lfw-sample", "threshold": 0.4, "identities": 1, "max_cosine": 0.4321},
}

# Plot name -> (width, height): distinct sizes, so a test can tell which image the browser decoded.
PLOTS = {"scores_job.png": (64, 40), "scores_evaluator.png": (64, 41), "roc.png": (48, 48),
         "det.png": (50, 48), "contact_sheet.png": (96, 32)}

# A failed job's message, as user-controlled text that must be shown, never parsed, by the page.
FAILURE = {"code": "render_failed", "message": "<b>out of memory</b> on shard 3 & retrying gave up"}


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid RGB PNG of one colour with a diagonal stripe (8-bit, no interlace)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"".join(bytes((255, 255, 255)) if x == y else bytes(rgb)
                                        for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


@dataclass
class Live:
    """The running API and what was seeded into it."""

    url: str
    store: JobStore
    storage: LocalStorage
    jobs: dict[str, str]  # role -> job id: beta, no_report, succeeded, failed, running
    files: dict[str, bytes]  # the succeeded job's report objects, relative to report/

    def key(self, job_id: str, relative: str) -> str:
        return JobKeys.for_job(PREFIX, job_id).key(relative)


@contextmanager
def serve(settings: Settings, store: JobStore, storage: LocalStorage) -> Iterator[str]:
    """uvicorn in a thread on the settings' public URL; stopped on exit."""
    port = int(settings.public_url.rsplit(":", 1)[1])
    server = uvicorn.Server(uvicorn.Config(create_app(settings, store=store, storage=storage),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield settings.public_url
    finally:
        server.should_exit = True
        thread.join(10)


def _create(store: JobStore, owner: str, body: dict[str, Any]) -> str:
    spec = JobSpec.model_validate(body)
    return store.create(owner, spec.normalized(), spec.spec_hash(), identities=spec.identities,
                        images=spec.identities * spec.images_per_identity).job_id


def _succeed(store: JobStore, storage: LocalStorage, job_id: str, quality: dict[str, Any],
             report: dict[str, bytes]) -> None:
    keys = JobKeys.for_job(PREFIX, job_id)
    image = png(8, 8, (90, 120, 150))
    storage.put_bytes(keys.key("dataset/imagefolder/000000/000.png"), image)
    files = [{"path": "dataset/imagefolder/000000/000.png", "identity": 0, "sample": 0,
              "sha256": sha256_hex(image), "bytes": len(image)}]
    storage.put_bytes(keys.manifest, json.dumps({"format": "idforge.manifest/1", "job_id": job_id,
                                                  "files": files}).encode())
    for rel, data in report.items():
        storage.put_bytes(keys.key(f"report/{rel}"), data)
    job = store.get(job_id)
    assert job is not None
    done = job["progress"]
    store.transition(job_id, "running")
    store.set_progress(job_id, "shard00000", identities=done["identities_total"], images=done["images_total"])
    store.set_stage(job_id, "packaging")
    store.transition(job_id, "succeeded", result={"manifest": keys.manifest, "images": done["images_total"],
                                                  "identities": done["identities_total"], "quality": quality})


def report_files() -> dict[str, bytes]:
    """report.json, a self-contained report.html (plots as data: URIs) and the plots' PNGs."""
    plots = {name: png(w, h, (40 + 30 * i, 90, 160)) for i, (name, (w, h)) in enumerate(PLOTS.items())}
    imgs = "".join(f'<img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}">'
                   for n, d in plots.items())
    html = f"<!doctype html><title>idforge quality report</title><h1>Quality report</h1>{imgs}"
    return {"report.json": json.dumps({"format": "idforge.report/1", "summary": QUALITY}).encode(), "report.html": html.encode(),
            **{f"plots/{n}": d for n, d in plots.items()}}


def seed(store: JobStore, storage: LocalStorage) -> tuple[dict[str, str], dict[str, bytes]]:
    """Jobs, oldest first: beta's, alpha's succeeded without a report, alpha's succeeded with one,
    a failed one and a running one at 24 of 80 images."""
    jobs: dict[str, str] = {}
    jobs["beta"] = _create(store, "beta", {"identities": 2, "images_per_identity": 2, "seed": 9})
    store.transition(jobs["beta"], "running")

    jobs["no_report"] = _create(store, "alpha", {"identities": 2, "images_per_identity": 2, "seed": 1,
                                                 "quality": {"report": False}})
    _succeed(store, storage, jobs["no_report"], {}, {})

    files = report_files()
    jobs["succeeded"] = _create(store, "alpha", {"identities": 10, "images_per_identity": 12, "seed": 2,
                                                 "metadata": {"note": "<script>alert(1)</script>"}})
    _succeed(store, storage, jobs["succeeded"], QUALITY, files)

    jobs["failed"] = _create(store, "alpha", {"identities": 4, "images_per_identity": 2, "seed": 3})
    store.transition(jobs["failed"], "running")
    store.transition(jobs["failed"], "failed", error=FAILURE)

    jobs["running"] = _create(store, "alpha", {"identities": 10, "images_per_identity": 8, "seed": 4})
    store.transition(jobs["running"], "running")
    store.set_stage(jobs["running"], "rendering")
    store.set_progress(jobs["running"], "shard00000", identities=3, images=24)
    return jobs, files


@contextmanager
def live_api(redis_url: str, tmp: Path) -> Iterator[Live]:
    """A fresh Redis database, local storage under `tmp`, seeded jobs and the API serving them.

    `redis_url` should name a database of its own (the conftest `store` fixture flushes db 0)."""
    url = f"http://127.0.0.1:{free_port()}"
    settings = Settings(redis_url=redis_url, api_keys=TEAM_KEYS, secret_key="ui-test-secret",
                        storage_dir=tmp / "storage", s3_prefix=PREFIX, public_url=url)
    store = JobStore.from_url(redis_url)
    store.r.flushdb()
    storage = LocalStorage(tmp / "storage", signing_key=settings.signing_key, base_url=url)
    jobs, files = seed(store, storage)
    with serve(settings, store, storage):
        yield Live(url, store, storage, jobs, files)
