"""Composing identity sets through the whole service (real Redis, SeaweedFS, a Celery worker, the
API): a second job that excludes the first keeps every identity at least the bound away from the
first job's identities, checked by angle on the identity files both jobs stored; with the same
seed, the second job would otherwise have drawn exactly the first one's identities."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from tests.integration.test_faults import BUCKET, LATENT, Stack

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {"identities": 6, "images_per_identity": 2, "seed": 71, "models": LATENT,
                        "variations": {"method": "dispersion", "iterations": 0}, "quality": {"report": True}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("composition"), model_dir)
    try:
        yield s
    finally:
        s.stop()


def _identities(stack: Stack, job_id: str) -> dict[str, torch.Tensor]:
    body = stack.s3.client().get_object(Bucket=BUCKET, Key=f"jobs/{job_id}/identities/embeddings.safetensors")["Body"]
    return load(io.BytesIO(body.read()).getvalue())


def _angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(y.double(), dim=1).T
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def test_a_job_excluding_another_keeps_its_identities_away_by_the_bound(stack: Stack) -> None:
    first = stack.wait_job(stack.alpha.submit(SPEC)["id"], timeout=240)
    assert first["status"] == "succeeded", stack.logs()
    same = stack.wait_job(stack.alpha.submit({**SPEC, "output": {"formats": ["webdataset"]}})["id"], timeout=240)
    a, same_ids = _identities(stack, first["id"]), _identities(stack, same["id"])
    assert float(_angles(a["embeddings"], same_ids["embeddings"]).diagonal().max()) < 1e-3  # the same draws

    bound = 2.0
    spec = {**SPEC, "sampler": {"method": "random", "exclude": [first["id"]], "exclude_min_angle_deg": bound}}
    second = stack.wait_job(stack.alpha.submit(spec)["id"], timeout=240)
    assert second["status"] == "succeeded", (second, stack.logs())
    b = _identities(stack, second["id"])
    assert float(_angles(b["embeddings"], a["embeddings"]).min()) >= bound
    manifest = stack.alpha.artifacts(second["id"])["manifest"]
    ex = manifest["sampling"]["exclusion"]
    assert ex["sources"] == [{"job": first["id"], "identities": 6}] and ex["min_angle_deg"] >= bound
    assert len(ex["redraws"]) == 6

    # Reproducible from its manifest: `idforge reproduce` fetches the excluded job's identities.
    out = stack.root / "reproduced"
    r = subprocess.run([sys.executable, "-m", "workers.cli", "reproduce", second["id"], "--out", str(out),
                        "--url", stack.url, "--api-key", "key-alpha", "--json"],
                       env=stack.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["verdict"] in ("identical", "equivalent")

    # Past what the sampler can reach, the job fails and says how close it got.
    failed = stack.wait_job(stack.alpha.submit({**spec, "seed": 72, "sampler": {
        **spec["sampler"], "exclude_min_angle_deg": 170}})["id"], timeout=240)
    assert failed["status"] == "failed" and failed["error"]["code"] == "exclusion_unreachable"
    assert "170" in failed["error"]["message"]


def test_an_extension_continues_the_labels_and_downloads_with_its_parent_as_one_dataset(stack: Stack) -> None:
    import tarfile

    parent = stack.wait_job(stack.alpha.submit({**SPEC, "seed": 81})["id"], timeout=240)
    assert parent["status"] == "succeeded", stack.logs()
    child = stack.wait_job(stack.alpha.submit({"extends": parent["id"], "identities": 4,
                                               "sampler": {"method": "random", "exclude_min_angle_deg": 2}})["id"],
                           timeout=240)
    assert child["status"] == "succeeded", (child, stack.logs())
    assert child["spec"]["sampler"]["exclude"] == [parent["id"]] and child["spec"]["seed"] != 81
    a, b = _identities(stack, parent["id"]), _identities(stack, child["id"])
    assert float(_angles(b["embeddings"], a["embeddings"]).min()) >= 2

    art = stack.alpha.artifacts(child["id"], limit=100)
    manifest = art["manifest"]
    assert manifest["extends"] == parent["id"] and manifest["labels"] == {"first": 6, "end": 10}
    assert sorted({f["label"] for f in art["files"]}) == [6, 7, 8, 9]
    assert sorted({f["identity"] for f in art["files"]}) == [0, 1, 2, 3]  # seeds: the job's own identities
    assert all(f["path"].startswith(f"dataset/imagefolder/{f['label']:06d}/") for f in art["files"])

    out = stack.root / "family"
    n = stack.alpha.download(child["id"], out, family=True)
    assert n == 6 * 2 + 4 * 2
    folders = sorted(p.name for p in (out / "dataset" / "imagefolder").iterdir())
    assert folders == [f"{k:06d}" for k in range(10)]  # one ImageFolder, parent's labels then the child's
    family = json.loads((out / "family.json").read_text())["jobs"]
    assert [(j["job"], j["labels"], j["images"]) for j in family] == [(parent["id"], [0, 6], 12),
                                                                       (child["id"], [6, 10], 8)]
    classes = []
    for tar in sorted((out / "jobs" / child["id"] / "dataset" / "webdataset").glob("*.tar")):
        with tarfile.open(tar) as t:
            classes += [int(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".cls")]
    assert sorted(set(classes)) == [6, 7, 8, 9]
    assert (out / "jobs" / parent["id"] / "manifest.json").is_file()


def test_a_hyperface_packing_keeps_excluded_identities_out_by_construction(stack: Stack) -> None:
    spec = {"identities": 6, "images_per_identity": 1, "seed": 91, "quality": {"report": False},
            "sampler": {"method": "hyperface", "alpha": 0, "gallery_size": 8},
            "render": {"steps": 1, "batch_size": 8}}
    first = stack.wait_job(stack.alpha.submit(spec)["id"], timeout=300)
    assert first["status"] == "succeeded", stack.logs()
    assert first["spec"]["sampler"]["restarts"] == 8  # pure packing: the restart packer
    a = _identities(stack, first["id"])["embeddings"]
    pairs = _angles(a, a) + torch.eye(6) * 180
    assert float(pairs.min()) > 101.5 * 0.99  # six points in 512-d: the regular simplex, 101.54°

    # The same seed, so the same gallery and starting points: only the repulsors keep it away.
    bound = 80.0
    second = stack.wait_job(stack.alpha.submit({**spec, "sampler": {
        **spec["sampler"], "exclude": [first["id"]], "exclude_min_angle_deg": bound}})["id"], timeout=300)
    assert second["status"] == "succeeded", (second, stack.logs())
    b = _identities(stack, second["id"])["embeddings"]
    assert float(_angles(b, a).min()) >= bound - 1e-3
    ex = stack.alpha.artifacts(second["id"], limit=1)["manifest"]["sampling"]["exclusion"]
    assert ex["min_angle_deg"] >= bound - 1e-3 and ex["sources"] == [{"job": first["id"], "identities": 6}]


def _listing(stack: Stack, job_id: str) -> dict[tuple[int, int], dict[str, Any]]:
    files = stack.alpha.artifacts(job_id, limit=1000)["files"]
    return {(f["identity"], f["sample"]): f for f in files}


def test_a_preview_promoted_to_the_full_job_keeps_its_identities_and_images_byte_for_byte(stack: Stack) -> None:
    """Shards of 3 identities: the preview of 4 of 8 renders [0, 3) and [3, 4); the full job's plan
    breaks there too, takes both shards and the identities from the preview, renders [4, 7) and
    [7, 8), and reproduces from its manifest byte for byte (so the copied images are exactly what
    it would have rendered)."""
    import httpx
    from PIL import Image

    full = {**SPEC, "identities": 8, "seed": 61, "output": {"formats": ["imagefolder", "webdataset", "recordio"]}}
    look = stack.wait_job(stack.alpha.submit({**full, "preview": {"identities": 4}})["id"], timeout=240)
    assert look["status"] == "succeeded", (look, stack.logs())
    art = stack.alpha.artifacts(look["id"], limit=1000)
    m = art["manifest"]
    assert m["preview"] == {"identities": 4, "of": 8, "contact_sheet": "preview/contact_sheet.png"}
    assert m["counts"]["identities"] == 4 and m["counts"]["images"] == 8 and m["plan"]["shards"] == 2
    assert _identities(stack, look["id"])["embeddings"].shape[0] == 8  # every identity sampled
    sheet = next(o for o in art["objects"] if o["path"] == "preview/contact_sheet.png")
    img = Image.open(io.BytesIO(httpx.get(sheet["url"]).content))
    assert img.height == 4 * 112  # a row per previewed identity

    job = stack.wait_job(stack.alpha.submit({"from_preview": look["id"]})["id"], timeout=240)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["spec"]["from_preview"] == {"job": look["id"], "identities": 4} and "preview" not in job["spec"]
    m = stack.alpha.artifacts(job["id"], limit=1)["manifest"]
    assert m["from_preview"] == {"job": look["id"], "identities": 4, "shards_reused": 2}
    assert m["counts"]["identities"] == 8 and m["counts"]["images"] == 16 and m["plan"]["shards"] == 4
    events = [e["type"] for e in httpx.get(f"{stack.url}/v1/jobs/{job['id']}/events?limit=1000",
                                           headers={"Authorization": "Bearer key-alpha"}).json()["events"]]
    assert events.count("shard_reused") == 2 and "identities_reused" in events
    a, b = _identities(stack, look["id"]), _identities(stack, job["id"])
    assert all(torch.equal(a[k], b[k]) for k in a)

    shown, ours = _listing(stack, look["id"]), _listing(stack, job["id"])
    assert len(shown) == 8 and len(ours) == 16
    for key, f in shown.items():  # the preview's images are the full job's, byte for byte
        assert ours[key]["sha256"] == f["sha256"] and ours[key]["path"] == f["path"]
        assert httpx.get(ours[key]["url"]).content == httpx.get(f["url"]).content

    out = stack.root / "reproduced-full"
    r = subprocess.run([sys.executable, "-m", "workers.cli", "reproduce", job["id"], "--out", str(out),
                        "--url", stack.url, "--api-key", "key-alpha", "--json"],
                       env=stack.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["verdict"] == "identical", r.stdout


def test_cone_variations_run_through_the_service_and_the_manifest_confirms_the_cone(stack: Stack) -> None:
    """The worker validates the stored, normalised spec again (a cone spec once failed there)."""
    spec = {"identities": 3, "images_per_identity": 3, "seed": 17, "quality": {"report": False},
            "variations": {"method": "embedding_noise", "cone_degrees": 35}, "render": {"steps": 1, "batch_size": 9}}
    job = stack.wait_job(stack.alpha.submit(spec)["id"], timeout=240)
    assert job["status"] == "succeeded", (job, stack.logs())
    cone = stack.alpha.artifacts(job["id"], limit=1)["manifest"]["realised"]["cone"]
    assert cone["half_angle_deg"] == 35 and cone["within"] is True and 30 < cone["max_angle_deg"] <= 35.0001
