import math

import pytest
import torch

from models.sampling import metrics
from models.sampling.embedding_noise import (
    EmbeddingNoiseConfig,
    embedding_noise,
    mean_cosine,
    scale_for_mean_cosine,
)
from models.sampling.random import sample_identities
from models.sampling.sphere import normalize, uniform_sphere
from models.seeding import make_generator


def brute_force(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The N x N reference: nearest-neighbour angles [N] and all pair angles (upper triangle)."""
    x = normalize(x.double())
    s = x @ x.T
    iu = torch.triu_indices(len(x), len(x), offset=1)
    pairs = torch.acos(s[iu[0], iu[1]].clamp(-1, 1))
    s.fill_diagonal_(-2)
    return torch.acos(s.max(dim=1).values.clamp(-1, 1)), pairs


@pytest.mark.parametrize("tile", [2, 3, 7, 64])
def test_tiled_metrics_equal_brute_force(tile):
    x = uniform_sphere(37, 5, make_generator(1))
    nn, pairs = brute_force(x)
    assert torch.allclose(metrics.nearest_neighbour_angles(x, tile).double(), nn, atol=1e-5)
    assert metrics.min_angle(x, tile) == pytest.approx(float(nn.min()), abs=1e-5)
    for angle in (0.3, 0.8, 1.2):
        expected = float((pairs < angle).double().mean())
        assert metrics.fraction_closer_than(x, angle, tile) == pytest.approx(expected, abs=1e-12)
    cos, index = metrics.nearest_neighbours(x, tile)
    s = x @ x.T
    s.fill_diagonal_(-2)
    assert torch.equal(index, s.argmax(dim=1))


def test_min_angle_accurate_for_nearly_identical_points():
    x = torch.tensor([[1.0, 0.0, 0.0], [math.cos(1e-4), math.sin(1e-4), 0.0], [0.0, 0.0, 1.0]])
    assert metrics.min_angle(x) == pytest.approx(1e-4, rel=1e-3)  # acos of a float32 cosine: 0 or 4e-4


def test_known_codes_meet_their_bounds():
    cross = torch.cat([torch.eye(4), -torch.eye(4)])
    assert metrics.min_angle(cross) == pytest.approx(math.pi / 2, abs=1e-6)
    assert metrics.rankin_bound(8, 4) == pytest.approx(math.pi / 2)
    simplex = normalize(torch.eye(5) - 0.2)  # 5 points in a 4-d subspace of R^5
    assert metrics.min_angle(simplex) == pytest.approx(metrics.simplex_bound(5), abs=1e-5)
    assert metrics.rankin_bound(5, 4) == pytest.approx(math.acos(-1 / 4))
    # icosahedron (63.43°) and snub cube (43.69°) lie under the cap-packing bound in 3-d
    assert math.radians(63.43) < metrics.rankin_bound(12, 3) < math.radians(75)
    assert math.radians(43.69) < metrics.rankin_bound(24, 3) < math.radians(55)
    assert metrics.welch_bound(10000, 512) == pytest.approx(math.sqrt(9488 / (512 * 9999)))


def test_uniform_references_match_simulation():
    sim_min, sim_nn = metrics.simulate_uniform(400, 16, make_generator(0), trials=5)
    assert metrics.uniform_expected_nn_angle(400, 16) == pytest.approx(sim_nn, abs=math.radians(0.5))
    assert metrics.uniform_expected_min_angle(400, 16) == pytest.approx(sim_min, abs=math.radians(3))
    assert metrics.uniform_cap_fraction(math.pi / 2, 7) == pytest.approx(0.5, abs=1e-6)


def test_percentiles():
    angles = torch.linspace(0, 1, 101)
    p = metrics.angle_percentiles(angles, q=(0, 50, 100))
    assert p == pytest.approx({0: 0.0, 50: 0.5, 100: 1.0})


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: metrics.min_angle(torch.zeros(5)), "x"),
        (lambda: metrics.min_angle(torch.ones(1, 3)), "x"),
        (lambda: metrics.min_angle(torch.ones(4, 3), tile=0), "tile"),
        (lambda: metrics.fraction_closer_than(torch.eye(3), 4.0), "angle"),
        (lambda: metrics.welch_bound(3, 4), "n"),
        (lambda: metrics.simplex_bound(1), "n"),
        (lambda: metrics.angle_percentiles(torch.ones(3), q=(101,)), "q"),
    ],
)
def test_metrics_reject_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_scale_for_mean_cosine_realised_by_embedding_noise(target):
    scale = scale_for_mean_cosine(target, 512)
    refs = sample_identities(5, 0, 8)
    x = embedding_noise(refs, list(range(8)), 16, job_seed=5, config=EmbeddingNoiseConfig(scale=scale))
    assert float(mean_cosine(refs, x).mean()) == pytest.approx(target, abs=0.01)


def test_scale_for_mean_cosine_edges():
    assert scale_for_mean_cosine(1.0, 512) == 0.0
    assert scale_for_mean_cosine(0.9, 8) > scale_for_mean_cosine(0.9, 512)  # fewer dims, more noise
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="target"):
            scale_for_mean_cosine(bad, 512)
    with pytest.raises(ValueError, match="dim"):
        scale_for_mean_cosine(0.5, 0)
