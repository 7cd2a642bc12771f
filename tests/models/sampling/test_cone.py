"""Cone variations: every sample within the half-angle, uniform in solid angle (checked against the
cap's closed-form distribution in 3-d and its concentration at the rim in 512-d), addressable per
(identity, sample) whatever the batch, and refused with a named argument when malformed. The bits
on every CPU path are pinned in tests/models/test_portability.py."""

from __future__ import annotations

import math

import pytest
import torch

from models.sampling.cone import ConeConfig, angles_deg, cone_table, cone_variations
from models.seeding import make_generator, normalize_exact


def _refs(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return normalize_exact(make_generator(seed).normal(n, d))


@pytest.mark.parametrize(("dim", "theta"), [(3, 35.0), (16, 10.0), (128, 60.0), (512, 35.0), (512, 90.0), (512, 1.0)])
def test_every_sample_is_a_unit_vector_within_the_cone(dim: int, theta: float) -> None:
    refs = _refs(6, dim)
    x = cone_variations(refs, list(range(6)), 40, 7, ConeConfig(theta))
    assert x.shape == (6, 40, dim) and x.dtype == torch.float32
    assert ((x.norm(dim=2) - 1).abs() < 1e-6).all()
    a = angles_deg(refs, x)
    assert a.max().item() <= theta + 1e-4, a.max()
    assert a.min().item() > 0


def test_in_3d_the_angles_follow_the_uniform_cap() -> None:
    """P(phi <= a) = (1 - cos a) / (1 - cos theta) for a uniform point of the cap in 3-d: the
    empirical CDF of 6,000 samples stays within a Kolmogorov-Smirnov band (1.63/sqrt(n): p = 0.01)."""
    theta = 35.0
    x = cone_variations(_refs(30, 3), list(range(30)), 200, 11, ConeConfig(theta))
    a = angles_deg(_refs(30, 3), x).flatten().sort().values
    n = a.numel()
    cap = 1 - math.cos(math.radians(theta))
    expected = (1 - torch.cos(torch.deg2rad(a))) / cap
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (empirical - expected).abs().max().item() < 1.63 / math.sqrt(n)


def test_in_512d_the_mass_sits_at_the_rim() -> None:
    x = cone_variations(_refs(10, 512), list(range(10)), 50, 3, ConeConfig(35.0))
    a = angles_deg(_refs(10, 512), x).flatten()
    assert 34.9 < a.median().item() < 35.0 and a.quantile(0.01).item() > 34.5


def test_the_table_is_a_distribution_function_from_the_rim_to_the_pole() -> None:
    t, cdf = cone_table(512, 35.0)
    assert t[0] == pytest.approx(math.cos(math.radians(35.0)), abs=1e-15) and t[-1] == 1.0
    assert cdf[0] == 0.0 and cdf[-1] == 1.0 and (cdf[1:] >= cdf[:-1]).all()


def test_a_sample_is_the_same_whatever_batch_or_first_sample_computes_it() -> None:
    refs = _refs(5, 64)
    whole = cone_variations(refs, [10, 11, 12, 13, 14], 6, 9, ConeConfig(20.0))
    part = cone_variations(refs[[1, 3]], [11, 13], 3, 9, ConeConfig(20.0), first_sample=3)
    assert torch.equal(part, whole[[1, 3], 3:6])
    other_seed = cone_variations(refs, [10, 11, 12, 13, 14], 6, 10, ConeConfig(20.0))
    assert not torch.equal(other_seed, whole)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"config": ConeConfig(0.0)}, "half_angle_deg"),
    ({"config": ConeConfig(91.0)}, "half_angle_deg"),
    ({"samples": -1}, "samples"),
    ({"identity_ids": [1]}, "identity_ids"),
])
def test_malformed_arguments_are_refused_by_name(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"references": _refs(2, 8), "identity_ids": [0, 1], "samples": 2,
                               "job_seed": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        cone_variations(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dim"):
        cone_table(2, 30.0)
