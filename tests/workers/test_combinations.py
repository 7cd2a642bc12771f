"""Every combination the job spec accepts runs: sampler x generator x gallery generator x embedder
x variations, over the tiny presets. A combination is either refused by the spec's checks (the
API's 422, `SpecError`) or a job of 2 identities x 2 images made from it succeeds end to end
(`workers.local.generate`: identities, gallery, variations, rendering, packaging, report)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from app import catalog
from app.settings import Settings
from app.spec import JobSpec, SpecError, check_models
from workers.local import generate
from workers.runtime import ModelCache, model_registry

SAMPLERS: dict[str, dict[str, Any]] = {
    "random": {"method": "random"},
    "hyperface": {"method": "hyperface", "iterations": 3, "gallery_size": 6, "alpha": 0.5},
    "langevin": {"method": "langevin", "iterations": 2, "batch_size": 4},
}
VARIATIONS: dict[str, dict[str, Any]] = {
    "embedding_noise": {"method": "embedding_noise"},
    "dispersion": {"method": "dispersion", "iterations": 2},
    "disco": {"method": "disco", "iterations": 2},
}
GENERATORS = sorted(n for n, e in catalog.CATALOG.items() if e.kind == "generator" and e.tiny)
EMBEDDERS = sorted(n for n, e in catalog.CATALOG.items() if e.kind == "embedder" and e.tiny)
GALLERIES: list[str | None] = [None, *GENERATORS]


def _body(sampler: str, generator: str, gallery: str | None, embedder: str, variations: str) -> dict[str, Any]:
    models: dict[str, Any] = {"generator": generator, "embedder": embedder}
    if gallery is not None:
        models["gallery_generator"] = gallery
    return {"identities": 2, "images_per_identity": 2, "seed": 5, "sampler": SAMPLERS[sampler],
            "variations": VARIATIONS[variations], "models": models,
            "render": {"steps": 2, "guidance_scale": 1.5, "batch_size": 4}}


def _accepted(body: dict[str, Any]) -> JobSpec | None:
    """The spec as POST /v1/jobs reads it (strict), or None when its checks refuse it (a 422)."""
    spec = JobSpec.model_validate(body, strict=True)
    try:
        check_models(spec)
    except SpecError:
        return None
    return spec


ALL = list(itertools.product(SAMPLERS, GENERATORS, GALLERIES, EMBEDDERS, VARIATIONS))
ACCEPTED = [c for c in ALL if _accepted(_body(*c)) is not None]


def test_the_sweep_covers_the_tiny_presets_and_the_pairings_that_matter() -> None:
    assert GENERATORS == ["arc2face-tiny", "stylegan2-tiny"]
    assert EMBEDDERS == ["arcface-onnx-tiny", "iresnet-tiny"]
    accepted = set(ACCEPTED)
    # HyperFace over an unconditional (StyleGAN2) gallery, rendered by Arc2Face: the paper's setup.
    for embedder in EMBEDDERS:
        assert ("hyperface", "arc2face-tiny", "stylegan2-tiny", embedder, "embedding_noise") in accepted
    assert ("langevin", "stylegan2-tiny", None, "iresnet-tiny", "disco") in accepted
    # What the spec refuses, it refuses for a reason a client can read (never silently).
    assert ("hyperface", "stylegan2-tiny", None, "iresnet-tiny", "dispersion") not in accepted
    assert ("langevin", "arc2face-tiny", None, "iresnet-tiny", "embedding_noise") not in accepted
    assert ("random", "stylegan2-tiny", None, "arcface-onnx-tiny", "dispersion") not in accepted
    assert ("random", "arc2face-tiny", None, "iresnet-tiny", "disco") not in accepted


@pytest.fixture(scope="module")
def cache(model_dir: Path) -> ModelCache:
    """One model cache for the sweep: each preset is loaded once."""
    return ModelCache(model_registry(Settings(model_dir=model_dir)), "cpu")


@pytest.mark.parametrize("combo", ACCEPTED, ids=["-".join(str(x) for x in c) for c in ACCEPTED])
def test_every_accepted_combination_succeeds(combo: tuple[str, str, str | None, str, str],
                                             cache: ModelCache, model_dir: Path, tmp_path: Path) -> None:
    spec = _accepted(_body(*combo))
    assert spec is not None
    manifest = generate(spec, tmp_path / "out", settings=Settings(model_dir=model_dir), models=cache)
    counts = manifest["counts"]
    assert counts["identities"] == 2 and counts["images"] == 4, counts
    images = sorted((tmp_path / "out" / "dataset" / "imagefolder").rglob("*.jpg"))
    assert [p.relative_to(tmp_path / "out" / "dataset" / "imagefolder").as_posix() for p in images] == [
        "000000/000.jpg", "000000/001.jpg", "000001/000.jpg", "000001/001.jpg"]
    sampler, generator, gallery, embedder, _ = combo
    assert manifest["models"]["generator"]["name"] == generator
    assert manifest["models"]["embedder"]["name"] == embedder
    if sampler == "hyperface":
        assert manifest["models"]["gallery_generator"]["name"] == (gallery or generator)


def test_report_plots_of_perfectly_separated_scores() -> None:
    """Found by the sweep: when genuine and impostor scores are apart at every threshold, no DET
    point has both error rates above zero, and the log-scaled DET plot raised in matplotlib,
    failing the job in its report. The plots are drawn, and say why the DET curve is empty."""
    import io

    import torch
    from PIL import Image

    from models import quality as q
    from workers.report import _Model
    from workers.report_pages import plots

    m = _Model(key="job", name="iresnet-tiny", n=2)
    m.genuine.add(torch.tensor([0.91, 0.95]))
    m.impostor.add(torch.tensor([0.10, 0.12, 0.15, 0.20]))
    m.rates = q.error_rates(m.genuine, m.impostor)
    _, fmr, fnmr = q.roc_points(m.rates)
    assert not ((fmr > 0) & (fnmr > 0)).any()  # the case that failed
    files = plots({"job": m}, [])
    assert set(files) == {"plots/scores_job.png", "plots/roc.png", "plots/det.png"}
    for data in files.values():
        assert Image.open(io.BytesIO(data)).size == (600, 400)
