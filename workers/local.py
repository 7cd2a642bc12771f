"""`idforge generate`: run a job spec in-process into a local directory, no service."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.settings import Settings
from app.spec import JobSpec, check_models
from app.storage import JobKeys, LocalStorage
from models import registry
from workers import pipeline
from workers.runtime import pick_device, quiet_libraries


def generate(spec: JobSpec, out_dir: Path, *, settings: Settings | None = None,
             on_progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    """Render the dataset of `spec` into `out_dir`; returns the manifest."""
    check_models(spec)
    quiet_libraries()
    s = settings or Settings()
    device = pick_device(s.device)
    storage, keys = LocalStorage(out_dir), JobKeys("")
    for name in (spec.models.generator, spec.models.embedder):
        registry.ensure_model(name, s.model_dir)
    gen = registry.load_generator(spec.models.generator, s.model_dir, device)
    emb = registry.load_embedder(spec.models.embedder, s.model_dir, device)
    t0 = time.perf_counter()
    refs = pipeline.sample_identities(spec)
    pipeline.save_identities(storage, keys, refs)
    total = spec.identities * spec.images_per_identity
    shards, done = [], 0
    for k, ids in enumerate(pipeline.plan_shards(spec.identities, s.shard_identities)):
        base = done
        res = pipeline.render_shard(spec, k, ids, refs[ids.start:ids.stop], gen, emb, storage,
                                    keys, on_progress=lambda i, m: on_progress(base + m, total))
        done += len(res.files)
        shards.append(pipeline.load_shard(storage, keys, k))
    quality = pipeline.quality_summary(storage, keys, shards) if spec.quality.report else {}
    models = {role: {"name": n, "license": registry.get_spec(n).license,
                     "sha256": registry.weights_sha256(n, s.model_dir)}
              for role, n in (("generator", spec.models.generator),
                              ("embedder", spec.models.embedder))}
    manifest = pipeline.build_manifest(job_id="local", spec=spec, shards=shards, models=models,
                                       quality=quality,
                                       timings={"total": time.perf_counter() - t0})
    pipeline.write_manifest(storage, keys, manifest)
    return manifest
