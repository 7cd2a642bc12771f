"""`sampler.exclude` in the workers: the tiled nearest search, the random samplers' redraws (a set
that holds exactly the identities the job would draw forces every one to be redrawn), Langevin's
repulsion, the bound checked on every result, and the failures that say why."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from app.settings import Settings
from app.spec import JobSpec
from models.sampling.random import sample_identities
from workers.errors import ExclusionUnavailable, ExclusionUnreachable
from workers.exclusion import Excluded, enforce, nearest_cosine, redraw_until_clear
from workers.local import generate

LATENT = {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"}


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


@pytest.fixture
def models(tmp_path: Path, model_dir: Path) -> Path:
    """A model directory of this test's own (the session's presets linked in), where it installs
    reference sets without touching the shared one."""
    own = tmp_path / "models"
    own.mkdir()
    for p in model_dir.iterdir():
        if p.name != "reference_sets":
            (own / p.name).symlink_to(p)
    return own


def _reference_set(model_dir: Path, name: str, embeddings: torch.Tensor) -> None:
    (model_dir / "reference_sets").mkdir(exist_ok=True)
    save_file({"embeddings": embeddings.contiguous().float()}, str(model_dir / "reference_sets" / f"{name}.safetensors"))


def _angles(x: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(excluded.double(), dim=1).T
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))  # [N, M]


def test_the_tiled_search_finds_what_the_whole_matrix_finds() -> None:
    x, e = _unit(37, 16, 1), _unit(101, 16, 2)
    best, which = nearest_cosine(x, e, tile=7)
    full = x.double() @ e.double().T
    assert torch.allclose(best, full.max(dim=1).values) and torch.equal(which, full.argmax(dim=1))


def test_redraws_replace_exactly_the_identities_too_close_and_enforce_states_the_angle() -> None:
    x = _unit(10, 32, 3)
    excluded = Excluded(torch.cat([x[[2, 7]], _unit(5, 32, 4)]), [{"reference_set": "t", "embeddings": 7}], 30.0)
    fresh = _unit(200, 32, 5)
    out = redraw_until_clear(x, excluded, lambda i, k: fresh[i * 10 + k])
    assert sorted(excluded.redraws) == [2, 7] and torch.equal(out[[0, 1, 3]], x[[0, 1, 3]])
    stats = enforce(out, excluded)
    assert stats["bound_deg"] == 30.0 and stats["min_angle_deg"] >= 30.0 and stats["excluded"] == 7
    assert stats["min_angle_deg"] == pytest.approx(float(_angles(out, excluded.embeddings).min()), abs=1e-3)
    with pytest.raises(ExclusionUnreachable, match=r"identity [27] ended 0.00 degrees .* 2 of 10 identities"):
        enforce(x, excluded)
    with pytest.raises(ExclusionUnreachable, match="redraws"):
        redraw_until_clear(x, Excluded(excluded.embeddings, [], 179.0), lambda i, k: fresh[k])


def test_random_identities_are_redrawn_away_from_a_set_holding_them(tmp_path: Path, models: Path) -> None:
    """The set holds the very points seed 21 draws: without the exclusion each identity would sit
    at 0 degrees from it; with it every one is redrawn to at least the bound."""
    n = 4
    _reference_set(models, "same-draws", sample_identities(21, 0, n, 512))
    spec = JobSpec.model_validate({
        "identities": n, "images_per_identity": 1, "seed": 21, "render": {"steps": 2, "batch_size": 4},
        "quality": {"report": False},
        "sampler": {"method": "random", "exclude": ["same-draws"], "exclude_min_angle_deg": 80}})
    manifest = generate(spec, tmp_path / "out", settings=Settings(model_dir=models))
    ex = manifest["sampling"]["exclusion"]
    assert ex["bound_deg"] == 80 and ex["min_angle_deg"] >= 80 and len(ex["redraws"]) == n
    assert ex["sources"] == [{"reference_set": "same-draws", "embeddings": n, "sha256": ex["sources"][0]["sha256"]}]
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out" / "identities" / "embeddings.safetensors"))["embeddings"]
    assert float(_angles(got, sample_identities(21, 0, n, 512)).min()) >= 80


def _latent_job(tmp_path: Path, model_dir: Path, name: str, sampler: dict[str, Any]) -> dict[str, Any]:
    spec = JobSpec.model_validate({"identities": 4, "images_per_identity": 1, "seed": 31, "models": LATENT,
                                   "variations": {"method": "dispersion", "iterations": 0},
                                   "quality": {"report": False}, "sampler": sampler})
    return generate(spec, tmp_path / name, settings=Settings(model_dir=model_dir))


def test_latent_identities_keep_the_bound_by_redraws_and_by_langevin(tmp_path: Path, models: Path) -> None:
    from safetensors.torch import load_file

    _latent_job(tmp_path, models, "a", {"method": "random"})
    first = load_file(str(tmp_path / "a" / "identities" / "embeddings.safetensors"))["embeddings"]
    _reference_set(models, "latent-a", first)
    bound = 2.0  # iresnet-tiny's random-face embeddings lie close together: a small angle, but > 0
    m = _latent_job(tmp_path, models, "b", {"method": "random", "exclude": ["latent-a"],
                                                "exclude_min_angle_deg": bound})
    again = load_file(str(tmp_path / "b" / "identities" / "embeddings.safetensors"))
    assert len(m["sampling"]["exclusion"]["redraws"]) == 4  # the same seed drew the same identities
    assert float(_angles(again["embeddings"], first).min()) >= bound
    assert again["latents"].shape == (4, again["latents"].shape[1])

    m = _latent_job(tmp_path, models, "c", {"method": "langevin", "iterations": 3, "exclude": ["latent-a"],
                                                "exclude_min_angle_deg": bound})
    ex = m["sampling"]["exclusion"]
    lang = load_file(str(tmp_path / "c" / "identities" / "embeddings.safetensors"))["embeddings"]
    assert ex["min_angle_deg"] >= bound and float(_angles(lang, first).min()) == pytest.approx(ex["min_angle_deg"], abs=1e-3)
    assert m["sampling"]["final"]["reference_angle_min"] is not None  # Langevin saw the references


def test_an_unreachable_bound_fails_saying_how_close_it_got(tmp_path: Path, models: Path) -> None:
    _reference_set(models, "everywhere", _unit(64, 512, 9))
    spec = JobSpec.model_validate({"identities": 2, "images_per_identity": 1, "seed": 4, "quality": {"report": False},
                                   "sampler": {"method": "random", "exclude": ["everywhere"],
                                               "exclude_min_angle_deg": 100}})
    with pytest.raises(ExclusionUnreachable, match="redraws all landed within 100"):
        generate(spec, tmp_path / "out", settings=Settings(model_dir=models))


def test_a_missing_or_misshapen_set_is_named(tmp_path: Path, models: Path) -> None:
    _reference_set(models, "narrow", _unit(3, 8, 1))
    for name, match in (("no-such-set", "no-such-set"), ("narrow", "narrow")):
        spec = JobSpec.model_validate({"identities": 1, "images_per_identity": 1, "quality": {"report": False},
                                       "sampler": {"method": "random", "exclude": [name]}})
        with pytest.raises(ExclusionUnavailable, match=match):
            generate(spec, tmp_path / name, settings=Settings(model_dir=models))
    assert math.isclose(Excluded(_unit(1, 4, 0), [], 60.0).min_cosine, 0.5)
