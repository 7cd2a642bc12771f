"""Fixed repulsors (`sampler.exclude` in the HyperFace packing): the tiled nearest search, the
projection out of a cap, and both optimisers keeping every point the bound away from every fixed
point, by construction, with a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch

from models.sampling import hyperface
from models.sampling.repulsors import Repulsors, clear, nearest_fixed, push_out
from models.sampling.sphere import normalize
from models.seeding import make_generator


def _sphere(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randn(n, d, generator=g))


def _closest_deg(x: torch.Tensor, fixed: torch.Tensor) -> float:
    cos = (x.double() @ fixed.double().T).max()
    return math.degrees(math.acos(min(1.0, float(cos))))


@pytest.mark.parametrize("tile", [7, 64, 8192])
def test_nearest_fixed_is_the_brute_force_top_k_at_any_tile(tile: int) -> None:
    x, fixed = _sphere(50, 6, 0), _sphere(300, 6, 1)
    got = nearest_fixed(x, fixed, 5, tile)
    want = (x @ fixed.T).topk(5, dim=1).indices
    assert torch.equal(got, want)
    assert nearest_fixed(x, fixed[:3], 5, tile).shape == (50, 3)  # fewer fixed points than k


def test_push_out_puts_a_point_on_the_rim_along_its_great_circle() -> None:
    centre = torch.tensor([[1.0, 0.0, 0.0]])
    rep = Repulsors(centre, math.radians(30), margin=0.0)
    inside = normalize(torch.tensor([[1.0, 0.2, 0.1], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # 12.6°, 0°, 90°
    before = inside.clone()
    out = push_out(inside, rep, torch.zeros(3, 1, dtype=torch.long))
    angles = [math.degrees(math.acos(float(c))) for c in (out @ centre.T).clamp(-1, 1).flatten()]
    assert angles[0] == pytest.approx(30, abs=1e-4) and angles[1] == pytest.approx(30, abs=1e-4)
    assert torch.equal(out[2], before[2])  # outside the cap: untouched
    # along the great circle from the centre through the point: the tangent direction is kept
    t_before = before[0, 1:] / before[0, 1:].norm()
    t_after = out[0, 1:] / out[0, 1:].norm()
    assert torch.allclose(t_before, t_after, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)


def test_clear_checks_every_fixed_point_not_only_the_candidates() -> None:
    fixed = _sphere(5000, 8, 2)
    x = normalize(fixed[:40] + 0.01 * _sphere(40, 8, 3))  # each point sits on a fixed one
    rep = Repulsors(fixed, math.radians(10), neighbours=2)
    out = clear(x.clone(), rep, tile=512)
    assert _closest_deg(out, fixed) >= 10 - 1e-3


def test_optimize_keeps_every_point_out_of_the_caps_and_resumes_exactly() -> None:
    fixed = _sphere(400, 8, 4)
    init = _sphere(60, 8, 5)
    assert _closest_deg(init, fixed) < 20  # the start is inside the caps
    rep = Repulsors(fixed, math.radians(20), refresh=3)
    config = hyperface.HyperFaceConfig(iterations=40, alpha=0.0, learning_rate=0.05)
    full = hyperface.optimize(init, None, config, repulsors=rep)
    assert _closest_deg(full.embeddings, fixed) >= 20 - 1e-3
    assert float(full.history[-1].min_angle) > 0.1  # still a packing, not a collapse onto a rim

    saved: dict[str, torch.Tensor] = {}

    def keep(stats: hyperface.StepStats, state: hyperface.HyperFaceState) -> None:
        if stats.step == 17:  # between two refreshes of the candidates
            saved.update(state.to_tensors())

    hyperface.optimize(init, None, config, repulsors=rep, on_step=keep)
    assert "fixed_nearest" in saved
    resumed = hyperface.optimize(init, None, config, repulsors=rep,
                                 state=hyperface.HyperFaceState.from_tensors(saved))
    assert torch.equal(resumed.embeddings, full.embeddings)


def test_the_restart_packer_honours_repulsors_in_its_dense_lanes() -> None:
    fixed = normalize(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]))  # the poles
    init = _sphere(6, 3, 6)
    result = hyperface.optimize_with_restarts(init, generator=make_generator(7), rounds=2,
                                              repulsors=Repulsors(fixed, math.radians(60)))
    assert _closest_deg(result.embeddings, fixed) >= 60 - 1e-3
    # six points on the equator's band between the 60° caps: a hexagon at best (60°); far from merged
    assert math.degrees(result.min_angle) > 40


def test_repulsors_refuse_what_cannot_be_a_bound() -> None:
    with pytest.raises(ValueError, match="min_angle"):
        Repulsors(_sphere(3, 4, 0), 0.0)
    with pytest.raises(ValueError, match="points"):
        Repulsors(torch.zeros(0, 4), 0.5)
    with pytest.raises(ValueError, match="repulsors.points"):
        hyperface.optimize(_sphere(4, 5, 0), None, hyperface.HyperFaceConfig(iterations=1, alpha=0.0),
                           repulsors=Repulsors(_sphere(3, 4, 0), 0.5))
