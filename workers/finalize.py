"""The job's last two stages, once every shard is done: `evaluating` (the quality report) and
`packaging` (each format's finalize step in `workers.outputs`: RecordIO, the Parquet index of every
image; then the manifest).

Both stream over the shards' stored outputs: one shard's features, file list or RecordIO segment
at a time, never the dataset (`shards` may be `artifacts.ShardRecords`, which reads each shard's
done.json when a pass reaches it). The manifest's size does not grow with the images: the Parquet
index lists them, and the manifest pins its sha256 (`index`).

  report/report.json, report/report.html, report/plots/*.png
  dataset/recordio/train.rec, train.idx, train.lst, property    (recordio)
  dataset/index.parquet                                          every image, kept or filtered
  manifest.json                                                  written last
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from app import __version__, catalog, dataset_index, layout
from app.layout import JobKeys
from app.spec import EmbeddingNoise, JobSpec
from app.storage import Storage, sha256_hex
from models.embedders.sface import SFACE_COSINE_THRESHOLD
from workers import artifacts, pipelines, provenance, report
from workers.errors import Incomplete, ReferenceUnavailable
from workers.outputs import PackageContext, asked_for
from workers.reference_sets import ReferenceSet, load_reference_set
from workers.shard import IMAGE_EXT

THUMBNAIL_IDENTITIES = 6  # identities on the report's contact sheet
THUMBNAIL_SAMPLES = 8  # images of each
PREVIEW_SHEET_IDENTITIES = 64  # identities on a preview's contact sheet (the first ones)
def reference_for(spec: JobSpec, model_dir: Path) -> ReferenceSet | None:
    """The job's leakage reference set, or None when it asks for no leakage check."""
    leakage = spec.quality.leakage
    if leakage is None:
        return None
    dim = catalog.CATALOG[spec.models.embedder].embedding_dim
    if dim is None:
        raise ReferenceUnavailable(f"embedder {spec.models.embedder!r} has no known embedding size")
    return load_reference_set(model_dir, leakage.reference, dim, spec.models.embedder)


# ---- evaluating --------------------------------------------------------------------------------

def _features(storage: Storage, keys: JobKeys, shard: int) -> dict[str, torch.Tensor]:
    return st_load(storage.get_bytes(keys.shard_features(shard)))


def shard_features(storage: Storage, keys: JobKeys, shards: Sequence[dict[str, Any]]
                   ) -> Callable[[], Iterator[report.ShardFeatures]]:
    """A pass over the shards' stored features, one shard in memory at a time."""
    def passes() -> Iterator[report.ShardFeatures]:
        for s in shards:
            t = _features(storage, keys, s["shard"])
            yield report.ShardFeatures(identities=[int(i) for i in t["identities"]], job=t["job"],
                                       evaluator=t.get("evaluator"), aligned=t["aligned"].bool(),
                                       samples=t["samples"])
    return passes


def shard_image(storage: Storage, keys: JobKeys, f: dict[str, Any]) -> bytes:
    """A kept image of a shard's file list, from wherever its shard put it: the loose file, the
    shard's tar, or the record in the shard's RecordIO segment (train.rec is not joined yet)."""
    if f.get("path"):
        return storage.get_bytes(keys.key(f["path"]))
    if f.get("tar") and f.get("tar_offset") is not None:
        return storage.get_range(keys.key(f["tar"]), int(f["tar_offset"]), int(f["size"]))
    if f.get("record_offset") is not None:
        segment = keys.shard_recordio(int(f["shard"]))
        return dataset_index.read_record(lambda a, n: storage.get_range(segment, a, n), int(f["record_offset"]))
    raise ValueError(f"image ({f['identity']}, {f['sample']}): its shard records no location")


def thumbnails(storage: Storage, keys: JobKeys, shards: Sequence[dict[str, Any]],
               identities: int = THUMBNAIL_IDENTITIES) -> list[tuple[int, list[bytes]]]:
    """The first identities' first images, for a contact sheet."""
    out: dict[int, list[bytes]] = {}
    for s in shards:
        for f in s["files"]:
            i = f["identity"]
            if len(out) >= identities and i not in out:
                return list(out.items())
            if len(out.setdefault(i, [])) < THUMBNAIL_SAMPLES:
                out[i].append(shard_image(storage, keys, f))
    return list(out.items())


def counts(spec: JobSpec, shards: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The job's counts, in one pass over the shards."""
    c = {"requested": spec.rendered_identities * spec.images_per_identity, "rendered": 0, "alignment_failures": 0,
         "filtered": 0, "topped_up": 0, "images": 0, "unused_candidates": 0}
    for s in shards:
        kept, filtered = len(s["files"]), len(s.get("filtered", []))
        rendered = int(s.get("rendered", kept))
        c["rendered"] += rendered
        c["alignment_failures"] += int(s.get("alignment_failures", 0))
        c["filtered"] += filtered
        c["topped_up"] += int(s.get("topped_up", 0))
        c["images"] += kept
        # top-up candidates that passed the filter after their identity was full again
        c["unused_candidates"] += rendered - kept - filtered
    return c


def evaluate(job_id: str, spec: JobSpec, storage: Storage, keys: JobKeys, shards: Sequence[dict[str, Any]], *,
             reference: ReferenceSet | None) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Build the quality report and write report/...; returns its summary (the job result's `quality`)
    and the job FR model's label flips, bool [N, A] (None with a single identity)."""
    has_evaluator = bool(shards) and "evaluator" in _features(storage, keys, shards[0]["shard"])
    leakage = None
    if reference is not None and spec.quality.leakage is not None:
        leakage = report.Leakage(reference.name, reference.embeddings, spec.quality.leakage.threshold)
    built = report.build_report(report.ReportInputs(
        job_id=job_id, embedder=spec.models.embedder,
        evaluator="sface-2021dec-int8bq" if has_evaluator else None,
        evaluator_threshold=SFACE_COSINE_THRESHOLD if has_evaluator else None,
        identities=spec.rendered_identities, images_per_identity=spec.images_per_identity, seed=spec.seed,
        shards=shard_features(storage, keys, shards), thumbnails=thumbnails(storage, keys, shards),
        counts=counts(spec, shards), leakage=leakage, variations=realised(spec, shards),
        exclusion=artifacts.identities_stats(storage, keys).get("exclusion")))
    for name, data in sorted(built.files.items()):
        storage.put_bytes(keys.report(name), data, _content_type(name))
    return built.summary, built.label_flips


def _content_type(name: str) -> str:
    return {"json": "application/json", "html": "text/html; charset=utf-8", "png": "image/png"}.get(
        name.rsplit(".", 1)[-1], "application/octet-stream")


# ---- packaging ---------------------------------------------------------------------------------

def package(spec: JobSpec, storage: Storage, keys: JobKeys, shards: Sequence[dict[str, Any]],
            label_flips: torch.Tensor | None = None) -> dict[str, dict[str, Any]]:
    """Write the job-level dataset objects; returns their sizes and sha256s, for the manifest. The
    shards' own dataset objects (WebDataset tars) are listed in `layout.OBJECTS`, which the returned
    table pins (with its row count), so the manifest does not grow with the shards."""
    outputs: dict[str, dict[str, Any]] = {}
    ctx = PackageContext(spec=spec, storage=storage, keys=keys, shards=shards,
                         ext=IMAGE_EXT[spec.output.image_format], label_flips=label_flips, objects=outputs)
    for output in asked_for(spec):  # RecordIO's train.rec/.idx/.lst/property, the Parquet index
        output.package(ctx)
    identities = storage.get_bytes(keys.identities)
    outputs[keys.relative(keys.identities)] = {"size": len(identities),
                                               "sha256": sha256_hex(identities)}
    if spec.preview is not None:  # the first identities at a glance
        sheet = report.contact_sheet(thumbnails(storage, keys, shards, PREVIEW_SHEET_IDENTITIES))
        storage.put_bytes(keys.key(layout.CONTACT_SHEET), sheet, "image/png")
        outputs[layout.CONTACT_SHEET] = {"size": len(sheet), "sha256": sha256_hex(sheet)}
    index = outputs.get(layout.INDEX)
    if index is not None:  # what the manifest pins of the index (outputs has its digest too)
        index["rows"], index["row_groups"] = ctx.index_rows, ctx.index_row_groups
    _write_objects(ctx)
    return dict(sorted(outputs.items()))


def _write_objects(ctx: PackageContext) -> None:
    """`layout.OBJECTS`: each shard's dataset objects, a JSON line each in (shard, path) order,
    streamed one shard record at a time; its digest and row count go to the manifest's outputs."""
    rows = 0
    with tempfile.TemporaryDirectory(prefix="idforge-objects-") as tmp:
        path = Path(tmp) / "objects.jsonl"
        with path.open("wb") as out:
            for s in ctx.shards:
                for rel, meta in sorted(s.get("outputs", {}).items()):
                    if rel.startswith("dataset/"):
                        line = {"path": rel, "shard": s["shard"], "size": meta["size"], "sha256": meta["sha256"]}
                        out.write(json.dumps(line, sort_keys=True).encode() + b"\n")
                        rows += 1
        ctx.upload(layout.OBJECTS, path, "application/x-ndjson")
    ctx.objects[layout.OBJECTS]["rows"] = rows


# ---- the manifest ------------------------------------------------------------------------------

def realised(spec: JobSpec, shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the variations and the cropping did: for embedding noise, the sigma used and the realised
    cosine of each identity's sample embeddings to its reference; how images were aligned and how
    many had no detectable face (kept as centre crops, flagged `aligned: false`)."""
    failures, n, total, low, widest = 0, 0, 0.0, None, None
    for s in shards:  # one pass, one shard at a time
        failures += int(s.get("alignment_failures", 0))
        for c in s.get("reference_cosine", []):
            n, total, low = n + 1, total + c, c if low is None else min(low, c)
        for x in s.get("reference_angle_max", []):
            widest = x if widest is None else max(widest, x)
    first = shards[0] if len(shards) else {}
    out: dict[str, Any] = {"variations": spec.variations.method,
                           "alignment": {"method": first.get("alignment") if len(shards) else None,
                                         "failures": failures}}
    if n:
        out["noise_scale"] = first.get("noise_scale")
        out["reference_cosine"] = {"mean": round(total / n, 6), "min": low}
    v = spec.variations
    if isinstance(v, EmbeddingNoise) and v.cone_degrees is not None:
        # Every conditioning embedding lies within the cone: its widest angle to its reference.
        out["cone"] = {"half_angle_deg": v.cone_degrees, "max_angle_deg": widest,
                       "within": widest is not None and widest <= v.cone_degrees + 1e-4}
    return out


def build_manifest(*, job_id: str, spec: JobSpec, shards: Sequence[dict[str, Any]], shard_identities: int,
                   models: dict[str, dict[str, Any]], quality: dict[str, Any], sampling: dict[str, Any],
                   timings: dict[str, float], outputs: dict[str, dict[str, Any]],
                   reference: ReferenceSet | None = None, platform: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Everything needed to reproduce the job and to check a reproduction, byte for byte.

    `platform` (`workers.provenance.platform_block`): what the bytes' numerics depend on (library
    versions, device, CPU capability, threads, deterministic flags); manifests from before it have
    none, and `idforge reproduce` reads them all the same."""
    ext = IMAGE_EXT[spec.output.image_format]
    index = outputs.get(layout.INDEX, {})
    latent = spec.variations.method in ("dispersion", "disco")
    return {
        "format": f"idforge.manifest/{dataset_index.MANIFEST_VERSION}",
        # 3: the images are listed by the Parquet index alone (`index`); 2 and older: inline `files`
        "manifest_version": dataset_index.MANIFEST_VERSION,
        "job_id": job_id,
        "code_version": __version__,
        "spec": spec.normalized(),
        "spec_hash": spec.spec_hash(),
        "seed": spec.seed,
        "seed_derivation": {**(pipelines.latent.SEED_DERIVATION if latent else pipelines.embedding.SEED_DERIVATION),
                            "top_up": "replacement candidates are samples A..2A-1, 2A..3A-1, ... of the "
                                      "identity, with the same derivations"},
        # The shard plan: latent generators batch an identity's samples together, so the plan is part
        # of what reproduces the exact bytes.
        "plan": {"shard_identities": shard_identities, "shards": len(shards)},
        "platform": platform,
        "models": models,
        "licenses": sorted({m["license"] for m in models.values() if m.get("license")}),
        "reference_set": {"name": reference.name, "sha256": reference.sha256} if reference else None,
        # Identity i is labelled labels.first + i in every format; `extends`: the job whose labels
        # this one continues (and whose identities it excluded), else null.
        "labels": {"first": spec.output.label_offset,
                   "end": spec.output.label_offset + spec.rendered_identities},
        "extends": spec.extends,
        # A preview: its identities rendered of the job's, and its contact sheet; a job that continues
        # one: the preview, and how many of its shards it took from it (`workers.preview`).
        **({"preview": {"identities": spec.preview.identities, "of": spec.identities,
                        "contact_sheet": layout.CONTACT_SHEET}} if spec.preview is not None else {}),
        **({"from_preview": {**p.model_dump(), "shards_reused": sum(1 for s in shards if s.get("reused_from"))}}
           if (p := spec.continued_preview) is not None else {}),
        "counts": {**counts(spec, shards), "identities": spec.rendered_identities,
                   "images_per_identity": spec.images_per_identity, "shards": len(shards)},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "realised": realised(spec, shards),
        "quality": quality,
        "sampling": sampling,
        "layout": layout.manifest_layout(spec.output.formats, ext, spec.quality.report,
                                         spec.preview is not None),
        "outputs": outputs,
        # The per-image listing: path or tar member or RecordIO record, identity, sample, seed, size,
        # sha256, flags. Sorted by (identity, sample) within each row group (a shard), kept images
        # first; a reader pages it by row group (`app.dataset_index`).
        "index": {"path": layout.INDEX, "sha256": index.get("sha256"), "size": index.get("size"),
                  "rows": index.get("rows"), "row_groups": index.get("row_groups"),
                  "sort": ["identity", "sample"]},
    }


def write_manifest(storage: Storage, keys: JobKeys, manifest: dict[str, Any]) -> None:
    """Written last: the dataset exists iff the manifest exists."""
    storage.put_bytes(keys.manifest, json.dumps(manifest, indent=1, sort_keys=True).encode(),
                      "application/json")


def finish(job_id: str, spec: JobSpec, storage: Storage, keys: JobKeys, shards: Sequence[dict[str, Any]], *,
           shard_identities: int, models: dict[str, dict[str, Any]], reference: ReferenceSet | None,
           on_stage: Callable[[str], None] = lambda stage: None, device: str | None = None) -> dict[str, Any]:
    """Evaluate, package and write the manifest (last); returns the manifest. `device`: where the
    models ran, for the manifest's platform block (default: CUDA when this process sees one)."""
    expected = spec.rendered_identities * spec.images_per_identity
    images = sum(len(s["files"]) for s in shards)  # one shard's file list in memory at a time
    if images != expected:
        raise Incomplete(f"{images} images in the shards for {expected} expected")
    t0 = time.perf_counter()
    on_stage("evaluating")
    quality: dict[str, Any] = {}
    flips = None
    if spec.quality.report:
        quality, flips = evaluate(job_id, spec, storage, keys, shards, reference=reference)
    t1 = time.perf_counter()
    on_stage("packaging")
    outputs = package(spec, storage, keys, shards, flips)
    sampling = artifacts.identities_stats(storage, keys)
    manifest = build_manifest(
        job_id=job_id, spec=spec, shards=shards, shard_identities=shard_identities, models=models,
        quality=quality, sampling=sampling, outputs=outputs, reference=reference,
        platform=provenance.platform_block(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        timings={"sampling_identities": float(sampling.get("seconds", 0.0)),
                 "rendering_shards_sum": sum(float(s["seconds"]) for s in shards), "evaluating": t1 - t0,
                 "packaging": time.perf_counter() - t1})
    write_manifest(storage, keys, manifest)
    return manifest
