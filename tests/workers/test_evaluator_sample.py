"""The quality report's evaluator sample: which identities SFace embeds (`quality.evaluator_sample`),
seeded from the job seed, and what a job with a sample writes: NaN evaluator rows and null
`evaluator_centre_cosine` outside it, the sample and its confidence in the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from app.settings import Settings
from app.spec import JobSpec
from workers.local import generate
from workers.shard import evaluator_identities

SPEC: dict[str, Any] = {"identities": 6, "images_per_identity": 2, "seed": 9, "render": {"steps": 2, "batch_size": 4},
                        "output": {"formats": ["imagefolder"]}}


@pytest.mark.parametrize(("n", "a", "sample"), [(100, 10, 1000), (1000, 50, 1000), (1000, 16, 1000),
                                                (500, 3, 7), (40, 7, 2), (3, 5, 100)])
def test_the_sample_is_whole_identities_of_the_documented_size(n: int, a: int, sample: int) -> None:
    mask = evaluator_identities(n, a, sample, 5)
    assert mask.shape == (n,) and mask.dtype == torch.bool
    want = n if sample >= n * a else min(n, max(2, math.ceil(sample / a)))
    assert int(mask.sum()) == want


def test_the_sample_is_deterministic_per_job_seed_and_all_means_every_identity() -> None:
    a = evaluator_identities(10_000, 50, 1000, 5)
    assert torch.equal(a, evaluator_identities(10_000, 50, 1000, 5))
    evaluator_identities.cache_clear()
    assert torch.equal(a, evaluator_identities(10_000, 50, 1000, 5))  # recomputed, not only cached
    assert not torch.equal(a, evaluator_identities(10_000, 50, 1000, 6))
    assert bool(evaluator_identities(10_000, 50, "all", 5).all())
    assert bool(evaluator_identities(10, 50, 500, 5).all())  # asks for the whole job
    # pinned: the identities of seed 5 (a change here changes every report's sample)
    assert a.nonzero().flatten()[:5].tolist() == [1466, 1603, 1610, 1886, 2248]
    with pytest.raises(ValueError, match="sample"):
        evaluator_identities(10, 5, 1, 5)


def test_the_spec_field() -> None:
    assert JobSpec.model_validate({"identities": 1, "images_per_identity": 1}).quality.evaluator_sample == 500
    spec = JobSpec.model_validate({"identities": 1, "images_per_identity": 1, "quality": {"evaluator_sample": "all"}})
    assert spec.quality.evaluator_sample == "all"
    for bad in (1, 0, "some", 2.5):
        with pytest.raises(ValueError):
            JobSpec.model_validate({"identities": 1, "images_per_identity": 1, "quality": {"evaluator_sample": bad}})


def run(tmp_path: Path, model_dir: Path, sample: Any) -> tuple[Path, dict[str, Any]]:
    spec = JobSpec.model_validate({**SPEC, "quality": {"evaluator_sample": sample}})
    out = tmp_path / f"job-{sample}"
    return out, generate(spec, out, settings=Settings(model_dir=model_dir, shard_identities=4))


def evaluator_rows(out: Path, m: dict[str, Any]) -> dict[int, torch.Tensor]:
    """identity -> its evaluator rows [A, 128], from every shard's features."""
    rows = {}
    for k in range(m["plan"]["shards"]):
        t = load_file(str(out / f"shards/{k:05d}/features.safetensors"))
        rows.update({int(i): t["evaluator"][r] for r, i in enumerate(t["identities"])})
    return rows


def test_a_job_embeds_its_sample_and_the_report_says_so(tmp_path: Path, model_dir: Path) -> None:
    out, m = run(tmp_path, model_dir, 4)  # 4 images: 2 identities of 6
    want = set(evaluator_identities(6, 2, 4, 9).nonzero().flatten().tolist())
    assert len(want) == 2
    rows = evaluator_rows(out, m)
    assert {i for i, r in rows.items() if bool(r.isfinite().all())} == want
    assert all(bool(r.isnan().all()) for i, r in rows.items() if i not in want)
    index = pq.read_table(out / "dataset/index.parquet").to_pylist()
    assert len(index) == 12
    for row in index:
        assert (row["evaluator_centre_cosine"] is not None) == (row["identity"] in want), row
        assert row["centre_cosine"] is not None
    report = json.loads((out / "report/report.json").read_bytes())
    sample = report["evaluator_sample"]
    assert (sample["identities"], sample["images"], sample["of_images"], sample["all"]) == (2, 4, 12, False)
    ev = report["summary"]["models"]["evaluator"]
    assert ev["genuine_pairs"] == 2 and ev["impostor_pairs"] == 4  # 2 identities x 2 images
    assert ev["confidence"]["supported"] == {"1e-3": False, "1e-4": False}
    assert report["summary"]["models"]["job"]["genuine_pairs"] == 6  # the job model: every image
    assert "Evaluator sample: 2 of 6 identities, 4 of 12 images" in (out / "report/report.html").read_text()
    assert m["quality"]["models"]["evaluator"]["sample"]["identities"] == 2

    again_out, again = run(tmp_path / "again", model_dir, 4)  # the same seed: the same sample, the same bytes
    assert (again_out / "report/report.json").read_bytes() == (out / "report/report.json").read_bytes()

    all_out, every = run(tmp_path, model_dir, "all")
    assert all(bool(r.isfinite().all()) for r in evaluator_rows(all_out, every).values())
    report = json.loads((all_out / "report/report.json").read_bytes())
    assert report["evaluator_sample"]["all"] is True and report["summary"]["models"]["evaluator"]["genuine_pairs"] == 6
    index = pq.read_table(all_out / "dataset/index.parquet").to_pylist()
    assert all(row["evaluator_centre_cosine"] is not None for row in index)
    # the images and the job model's figures do not depend on the evaluator's sample
    assert report["summary"]["models"]["job"] == json.loads((out / "report/report.json").read_bytes())["summary"][
        "models"]["job"]


class _Doubler:
    """A stand-in evaluator: the mean pixel of each crop, twice, as a [B, 2] embedding."""

    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        m = aligned.float().mean(dim=(1, 2, 3))  # [B]
        return torch.stack([m, 2 * m], dim=1)


@pytest.mark.parametrize("threaded", [False, True])
def test_the_evaluator_runs_inline_or_on_a_thread_with_the_same_results(threaded: bool) -> None:
    from workers.shard import _Background

    bg = _Background(_Doubler(), threaded)
    try:
        crops = torch.arange(4 * 2 * 2 * 3, dtype=torch.uint8).view(4, 2, 2, 3)
        bg.submit([(0, 0), (0, 1)], crops[:2])
        bg.submit([], crops[:0])  # a batch with no sampled image
        bg.submit([(3, 0), (3, 1)], crops[2:])
        got = bg.collect()
    finally:
        bg.close()
    assert list(got) == [(0, 0), (0, 1), (3, 0), (3, 1)]
    for k, p in enumerate(got):
        assert torch.equal(got[p], _Doubler().embed(crops[k:k + 1])[0])
    assert bg.collect() == {}
