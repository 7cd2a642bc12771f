"""A preview and the job that continues it, in-process on the tiny latent path (`workers.local`,
`workers.preview`): the preview renders its first identities with a contact sheet; the full job's
plan begins with the preview's shards, its rendering of them gives the preview's bytes, and the
worker copies them (and the identities) instead, falling back to rendering what is gone."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from app.layout import JobKeys
from app.settings import Settings
from app.spec import JobSpec
from app.storage import LocalStorage
from workers import preview
from workers.local import generate

PREVIEW_ID = "j0000000000000400000000"
FULL_ID = "j0000000000000500000000"
SPEC: dict[str, Any] = {"identities": 7, "images_per_identity": 2, "seed": 13,
                        "models": {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"},
                        "variations": {"method": "dispersion", "iterations": 2},
                        "output": {"formats": ["imagefolder", "webdataset", "recordio"]},
                        "quality": {"report": True, "evaluator_sample": 4}}


def _index(out: Path) -> dict[tuple[int, int], str]:
    rows = pq.read_table(out / "dataset/index.parquet").to_pylist()
    return {(r["identity"], r["sample"]): r["sha256"] for r in rows if not r.get("filtered")}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Any]:
    """The preview of 3 of 7 identities (shards of 2: [0, 2), [2, 3)) stored as job PREVIEW_ID under
    `jobs/`, and the full job rendered whole from its spec (as `idforge reproduce` does)."""
    root = tmp_path_factory.mktemp("preview")
    settings = Settings(model_dir=model_dir, shard_identities=2)
    look = JobSpec.model_validate({**SPEC, "preview": {"identities": 3}})
    m = generate(look, root / "jobs" / PREVIEW_ID, settings=settings)
    (root / "jobs" / PREVIEW_ID / "spec.json").write_text(json.dumps(look.normalized()))  # as a worker stores it
    full = JobSpec.model_validate({**SPEC, "from_preview": {"job": PREVIEW_ID, "identities": 3}})
    whole = generate(full, root / "whole", settings=settings)
    plain = generate(JobSpec.model_validate(SPEC), root / "plain", settings=settings)
    return {"root": root, "manifest": m, "full": full, "whole": whole, "plain": plain}


def test_a_preview_renders_its_first_identities_and_a_contact_sheet(made: dict[str, Any]) -> None:
    m, out = made["manifest"], made["root"] / "jobs" / PREVIEW_ID
    assert m["preview"] == {"identities": 3, "of": 7, "contact_sheet": "preview/contact_sheet.png"}
    assert m["counts"]["identities"] == 3 and m["counts"]["images"] == 6 and m["plan"]["shards"] == 2
    assert m["labels"] == {"first": 0, "end": 3}
    assert {i for i, _ in _index(out)} == {0, 1, 2}
    sheet = Image.open(io.BytesIO((out / "preview/contact_sheet.png").read_bytes()))
    assert sheet.height == 3 * 112 and sheet.width >= 2 * 112
    assert m["outputs"]["preview/contact_sheet.png"]["size"] == (out / "preview/contact_sheet.png").stat().st_size
    assert (out / "dataset/recordio/property").read_text().split(",")[0] == "3"  # classes: the rendered ones
    assert json.loads((out / "report/report.json").read_text())  # a report, whatever its evaluator sample holds


def test_the_full_job_renders_the_preview_s_images_byte_for_byte(made: dict[str, Any]) -> None:
    shown = _index(made["root"] / "jobs" / PREVIEW_ID)
    whole = _index(made["root"] / "whole")
    assert made["whole"]["plan"]["shards"] == 4  # [0, 2) [2, 3) | [3, 5) [5, 7)
    assert len(whole) == 14 and all(whole[k] == v for k, v in shown.items())
    # The same spec without the preview plans [0, 2) [2, 4) [4, 6) [6, 7): in the shard both plans
    # share, the images are equal (elsewhere batches of another shape may round differently on
    # another machine, so only the shared shard is checked).
    plain = _index(made["root"] / "plain")
    assert all(plain[k] == whole[k] for k in whole if k[0] < 2)


def test_the_worker_takes_the_preview_s_identities_and_shards_and_renders_what_is_gone(made: dict[str, Any]) -> None:
    root, full = made["root"], made["full"]
    storage, src, keys = LocalStorage(root), JobKeys.for_job("jobs", PREVIEW_ID), JobKeys.for_job("jobs", FULL_ID)
    assert preview.take_identities(full, storage, "jobs", keys)
    assert storage.get_bytes(keys.identities) == storage.get_bytes(src.identities)
    plan = full.shard_plan(2)
    for k in (0, 1):
        record = preview.take_shard(full, storage, "jobs", keys, k, plan[k])
        assert record is not None and record["reused_from"] == PREVIEW_ID
        for rel in [f["path"] for f in record["files"]] + sorted(record["outputs"]):
            assert storage.get_bytes(keys.key(rel)) == storage.get_bytes(src.key(rel))
        assert storage.get_bytes(keys.shard_features(k)) == storage.get_bytes(src.shard_features(k))
        assert storage.exists(keys.shard_latents(k)) and storage.exists(keys.shard_done(k))
    assert preview.take_shard(full, storage, "jobs", keys, 2, plan[2]) is None  # not the preview's
    # A preview image gone (its data deleted meanwhile): the shard is rendered instead.
    other = JobKeys.for_job("jobs", "j0000000000000600000000")
    (root / src.key(f"dataset/imagefolder/{1:06d}/{0:03d}.jpg")).unlink()
    assert preview.take_shard(full, storage, "jobs", other, 0, plan[0]) is None
    assert not storage.exists(other.shard_done(0))
    assert preview.take_shard(JobSpec.model_validate(SPEC), storage, "jobs", other, 0, plan[0]) is None
    # A job whose data would differ from the preview's (the API refuses it; the worker checks again).
    reseeded = JobSpec.model_validate({**SPEC, "seed": 14, "from_preview": {"job": PREVIEW_ID, "identities": 3}})
    assert preview.take_shard(reseeded, storage, "jobs", other, 1, plan[1]) is None
    assert not preview.take_identities(reseeded, storage, "jobs", other)
