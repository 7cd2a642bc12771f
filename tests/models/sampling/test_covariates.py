"""DisCo covariates: SVM directions and scales, the file format, offsets, the tiny preset's fit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.generators.stylegan2 import StyleGAN2Generator
from models.registry import Registry
from models.sampling.covariates import (
    Covariates,
    disco_offsets,
    fit_covariates,
    fit_from_file,
    image_properties,
    tiny_covariates,
)
from models.seeding import derive_seed, make_generator

D = 16


def planted(m: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Separable latents [m, D] around the origin, labels 1 on the side of a planted unit normal."""
    g = make_generator(seed)
    normal = g.normal(D, dtype=torch.float64)
    normal /= normal.norm()
    x = g.normal(m, D, dtype=torch.float64)
    y = (x @ normal > 0).long()
    x = x + (2 * y - 1)[:, None] * 0.5 * normal  # a margin of 1 between the classes
    return x, y, normal


def direct_scale(x: torch.Tensor, direction: torch.Tensor) -> float:
    d = (x.double() @ direction.double()).numpy()
    return max(-d[d < 0].mean(), d[d > 0].mean())


def test_fit_recovers_a_planted_direction_and_its_scale() -> None:
    x, y, normal = planted()
    cov = fit_covariates(x, {"pose": y})
    direction = cov.directions[0].double()
    assert cov.names == ("pose",) and cov.directions.shape == (1, D)
    assert float(direction @ normal) > 0.99  # class 1 on the positive side
    assert float(direction.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(cov.scales[0]) == pytest.approx(direct_scale(x, direction), rel=1e-5)
    assert cov.info["covariates"]["pose"]["train_accuracy"] == 1.0


def test_excluded_latents_take_no_part_in_the_fit() -> None:
    x, y, normal = planted()
    noise = make_generator(3).normal(50, D, dtype=torch.float64) * 5
    x_all = torch.cat([x, noise])
    y_all = torch.cat([y, torch.full((50,), -1)])
    both = fit_covariates(x_all, {"a": y_all, "b": torch.cat([y, 1 - (noise @ normal > 0).long()])})
    alone = fit_covariates(x, {"a": y})
    torch.testing.assert_close(both.directions[0], alone.directions[0])
    torch.testing.assert_close(both.scales[0], alone.scales[0])
    assert float(both.directions[1].double() @ normal) < 0.99  # "b" saw the flipped noise


def test_save_load_round_trip_and_deterministic_bytes(tmp_path: Path) -> None:
    x, y, _ = planted()
    cov = fit_covariates(x, {"pose": y, "illumination": 1 - y})
    path = cov.save(tmp_path / "cov.safetensors")
    back = Covariates.load(path)
    assert back.names == cov.names and back.info == cov.info
    torch.testing.assert_close(back.directions, cov.directions, rtol=0, atol=0)
    torch.testing.assert_close(back.scales, cov.scales, rtol=0, atol=0)
    assert path.read_bytes() == fit_covariates(x, {"pose": y, "illumination": 1 - y}).to_bytes()


def test_disco_offsets_follow_the_seed_scheme() -> None:
    q, _ = torch.linalg.qr(make_generator(2).normal(D, 3))  # orthonormal columns
    cov = Covariates(("pose", "illumination", "expression"), q.T.contiguous(), torch.tensor([1.0, 2.0, 4.0]))
    off = disco_offsets(cov, [4, 9], 5, seed=11)
    assert off.shape == (2, 5, D)
    u = torch.einsum("iad,kd->iak", off, cov.directions) / cov.scales  # [2, 5, 3]
    assert (u >= -0.5).all() and (u <= 0.5).all() and u.std() > 0.15
    for i, identity in enumerate([4, 9]):
        for a in range(5):
            expected = make_generator(derive_seed(11, "disco", identity, a)).uniform(3) - 0.5
            torch.testing.assert_close(u[i, a], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(disco_offsets(cov, [9], 5, seed=11)[0], off[1])  # shard-independent
    torch.testing.assert_close(disco_offsets(cov, [4, 9], 5, seed=11), off)  # reproducible
    assert not torch.allclose(disco_offsets(cov, [4, 9], 5, seed=12), off)
    scaled = disco_offsets(cov, [4, 9], 5, seed=11, scaling={"illumination": 0.0})
    torch.testing.assert_close(scaled @ cov.directions[1], torch.zeros(2, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_fit_from_file_matches_fit_covariates(tmp_path: Path, suffix: str) -> None:
    x, y, _ = planted()
    arrays = {"latents": x.float().numpy(), "label.pose": y.numpy(), "label.smile": (1 - y).numpy()}
    path = tmp_path / f"labelled{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        save_file({k: torch.from_numpy(v) for k, v in arrays.items()}, str(path))
    got = fit_from_file(path)
    expected = fit_covariates(x.float(), {"pose": y, "smile": 1 - y})
    assert got.names == ("pose", "smile") and got.info["source"] == path.name
    torch.testing.assert_close(got.directions, expected.directions)
    torch.testing.assert_close(got.scales, expected.scales)


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> StyleGAN2Generator:
    reg = Registry(Path(tmp_path_factory.mktemp("models")))
    reg.ensure("stylegan2-tiny")
    return reg.load("stylegan2-tiny")


def test_tiny_covariates_are_real_and_deterministic(generator: StyleGAN2Generator, tmp_path: Path) -> None:
    a = tiny_covariates(generator, seed=3, n=240).save(tmp_path / "a.safetensors")
    b = tiny_covariates(generator, seed=3, n=240).save(tmp_path / "b.safetensors")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    cov = Covariates.load(a)
    assert cov.names == ("pose", "illumination", "expression") and cov.dim == generator.style_dim
    assert cov.info["covariates"]["illumination"]["train_accuracy"] > 0.9
    # the directions change what they were fitted on: moving along "illumination" brightens
    k = cov.names.index("illumination")
    w_avg = generator.latent_avg.float()[None]
    step = 2 * float(cov.scales[k]) * cov.directions[k]
    with torch.no_grad():
        bright = image_properties(generator.synthesis(w_avg + step, noise_mode="const"))["illumination"]
        dark = image_properties(generator.synthesis(w_avg - step, noise_mode="const"))["illumination"]
    assert float(bright - dark) > 0
    assert not torch.equal(tiny_covariates(generator, seed=4, n=240).directions, cov.directions)


@pytest.mark.parametrize("latents, labels, name", [
    (torch.zeros(10), {"a": torch.zeros(10, dtype=torch.long)}, "latents"),
    (torch.zeros(10, 4), {}, "labels"),
    (torch.zeros(10, 4), {"a": torch.zeros(9, dtype=torch.long)}, r"labels\['a'\]"),
    (torch.zeros(10, 4), {"a": torch.zeros(10)}, r"labels\['a'\]"),
    (torch.zeros(10, 4), {"a": torch.full((10,), 2)}, r"labels\['a'\]"),
    (torch.zeros(10, 4), {"a": torch.ones(10, dtype=torch.long)}, r"labels\['a'\]"),
])
def test_fit_rejects_bad_inputs(latents: torch.Tensor, labels: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fit_covariates(latents, labels)


def test_bad_covariates_and_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directions"):
        Covariates(("a",), torch.ones(1, 4), torch.ones(1))  # not unit
    with pytest.raises(ValueError, match="names"):
        Covariates(("a", "a"), torch.eye(2), torch.ones(2))
    with pytest.raises(ValueError, match="scales"):
        Covariates(("a",), torch.eye(1), torch.ones(2))
    cov = Covariates(("a",), torch.eye(1), torch.ones(1))
    with pytest.raises(ValueError, match="scaling"):
        disco_offsets(cov, [0], 2, 0, scaling={"b": 1.0})
    with pytest.raises(ValueError, match="variations"):
        disco_offsets(cov, [0], 0, 0)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="path"):
        Covariates.load(other)
    with pytest.raises(ValueError, match="path"):
        fit_from_file(other)  # no latents
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="path"):
        fit_from_file(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="path"):
        fit_from_file(tmp_path / "missing.npz")
