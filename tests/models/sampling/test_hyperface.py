import math
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.sampling import hyperface
from models.sampling.hyperface import (
    PACKING,
    PACKING_REFINE,
    HyperFaceConfig,
    HyperFaceState,
    init_from_gallery,
    optimize,
    optimize_with_restarts,
)
from models.sampling.metrics import min_angle, rankin_bound
from models.sampling.sphere import normalize, uniform_sphere
from models.seeding import make_generator

ROOT = Path(__file__).resolve().parents[3]
# Pure packing (alpha = 0), a local schedule: cool from T = 0.05, for runs that start near an optimum
# (or anywhere, when only the mechanics matter). Known optima from random starts use the defaults of
# `optimize_with_restarts` instead (test_known_codes.py).
LOCAL = HyperFaceConfig(
    iterations=800, learning_rate=0.01, alpha=0.0, temperature=0.05, temperature_final=1e-4,
    separation="max", stats_every=None,
)
SEEDS = range(5)  # every quality test holds for each of these seeds, not for one lucky one
TOLERANCE = 1e-3  # degrees: how close to a known optimum every case must come (found: <= 2e-5)


def deg(radians: float) -> float:
    return math.degrees(radians)


# --- the analytic tiled gradient ----------------------------------------------------------------


@pytest.mark.parametrize("separation", ["mean", "max"])
@pytest.mark.parametrize("tile", [2, 5, 64])
def test_full_pass_gradient_equals_autograd(separation, tile):
    x = uniform_sphere(37, 6, make_generator(0))
    t = 0.07
    g, soft, hard = hyperface._full_pass(x, x, t, tile, separation)
    xx = x.double().requires_grad_()
    s = (xx @ xx.T).masked_fill(torch.eye(37, dtype=torch.bool), -math.inf)
    rows = t * torch.logsumexp(s / t, dim=1)
    loss = rows.mean() if separation == "mean" else t * torch.logsumexp(rows / t, dim=0)
    (37 * loss).backward()  # the pass returns the gradient of N·L_sep
    assert torch.allclose(g.double(), xx.grad, atol=2e-6)
    assert torch.allclose(soft.double(), rows.detach(), atol=1e-6)
    assert torch.allclose(hard.double(), s.max(dim=1).values.detach(), atol=1e-6)
    assert hyperface.separation_loss(soft, t, separation) == pytest.approx(float(loss.detach()), abs=1e-6)


def test_batch_pass_gradient_equals_autograd_with_others_detached():
    x = uniform_sphere(40, 6, make_generator(0))
    rows = torch.tensor([3, 17, 39, 0, 8])
    t = 0.05
    g, soft, _ = hyperface._batch_pass(x, x, rows, t, 7, "mean")
    q = x[rows].double().requires_grad_()
    s = q @ x.double().T
    s[torch.arange(5), rows] = -math.inf
    (t * torch.logsumexp(s / t, dim=1)).sum().backward()
    assert torch.allclose(g.double(), q.grad, atol=2e-6)
    assert torch.allclose(soft.double(), t * torch.logsumexp(s.detach() / t, dim=1), atol=1e-6)


@pytest.mark.parametrize("separation", ["mean", "max"])
def test_neighbour_pass_is_exact_when_it_keeps_every_pair(separation):
    x = uniform_sphere(37, 6, make_generator(0))
    exact = hyperface._full_pass(x, x, 0.07, 5, separation)
    sparse = hyperface._neighbour_pass(x, x, 0.07, 5, separation, 36)  # k = N - 1 (and above)
    for a, b in zip(exact, sparse):
        assert torch.allclose(a, b, atol=2e-6)
    assert torch.allclose(hyperface._neighbour_pass(x, x, 0.07, 64, separation, 99)[0], exact[0], atol=2e-6)


@pytest.mark.parametrize("separation", ["mean", "max"])
def test_neighbour_pass_approximates_exact_gradient_at_low_temperature(separation):
    x = uniform_sphere(600, 16, make_generator(1))
    t = 0.01
    g, soft, hard = hyperface._full_pass(x, x, t, 128, separation)
    gk, softk, hardk = hyperface._neighbour_pass(x, x, t, 128, separation, 16)
    assert torch.allclose(soft, softk, atol=1e-5) and torch.equal(hard, hardk)  # exact normaliser
    cos = torch.nn.functional.cosine_similarity(g.flatten(), gk.flatten(), dim=0)
    assert float(cos) > 0.99
    rows = torch.nn.functional.cosine_similarity(g, gk, dim=1)
    assert float(rows.median()) > 0.99


# --- known optima (alpha = 0) -------------------------------------------------------------------

KNOWN = {  # name: (points, dims, optimal minimum angle in degrees)
    "cross-polytope 6-d": (12, 6, 90.0),
    "simplex 7-d": (8, 7, deg(math.acos(-1 / 7))),
    "Tammes 5": (5, 3, 90.0),
    "Tammes 6 (octahedron)": (6, 3, 90.0),
    "Tammes 12 (icosahedron)": (12, 3, deg(math.acos(1 / math.sqrt(5)))),
    "Tammes 24 (snub cube)": (24, 3, 43.6907671),  # Robinson (1961)
    "24-cell (D4 roots)": (24, 4, 60.0),  # random starts mostly stall at 58.84° (a local optimum)
    "E8 roots": (240, 8, 60.0),
}


def icosahedron() -> torch.Tensor:
    phi = (1 + math.sqrt(5)) / 2
    corners = [[0.0, a, b * phi] for a in (1, -1) for b in (1, -1)]
    return normalize(torch.tensor([p[k:] + p[:k] for k in range(3) for p in corners]))  # cyclic shifts


def cell_24() -> torch.Tensor:
    roots = torch.tensor([[1.0, 1, 0, 0], [1, -1, 0, 0], [-1, 1, 0, 0], [-1, -1, 0, 0]])
    perms = ([0, 1, 2, 3], [0, 2, 1, 3], [0, 2, 3, 1], [2, 0, 1, 3], [2, 0, 3, 1], [2, 3, 0, 1])
    return normalize(torch.cat([roots[:, p] for p in perms]))  # the D4 roots: ±e_i ± e_j


@pytest.mark.parametrize("seed", SEEDS)
def test_sparse_gradient_returns_to_a_perturbed_optimum(seed):
    # the default config switches to the top-k gradient at N >= sparse_from; forced on (k = 5, each
    # vertex's contacts) from a perturbed icosahedron it returns to the optimum like the exact one
    near = normalize(icosahedron() + 0.2 * make_generator(seed).normal(12, 3))
    assert deg(min_angle(near)) < 50
    optimum = KNOWN["Tammes 12 (icosahedron)"][2]
    for neighbours in (None, 5):
        x = optimize(near, None, replace(LOCAL, neighbours=neighbours, sparse_from=0)).embeddings
        assert abs(deg(min_angle(x)) - optimum) <= TOLERANCE, neighbours


@pytest.mark.parametrize("seed", SEEDS)
def test_local_schedule_returns_to_a_perturbed_24_cell(seed):
    near = normalize(cell_24() + 0.1 * make_generator(seed).normal(24, 4))
    assert deg(min_angle(near)) < 55
    assert abs(deg(min_angle(optimize(near, None, LOCAL).embeddings)) - 60.0) <= TOLERANCE


def test_known_optima_are_attained_by_the_codes():
    # the table's values, checked on the codes themselves (and the bounds they meet or not)
    assert abs(deg(min_angle(icosahedron())) - KNOWN["Tammes 12 (icosahedron)"][2]) < 1e-4
    assert abs(deg(min_angle(cell_24())) - 60.0) < 1e-4
    cross = torch.cat([torch.eye(6), -torch.eye(6)])
    assert abs(deg(min_angle(cross)) - 90.0) < 1e-4 and deg(rankin_bound(12, 6)) == 90.0
    simplex = normalize(torch.eye(8) - 1 / 8)  # the centred basis: 8 points spanning a 7-d subspace
    assert abs(deg(min_angle(simplex)) - KNOWN["simplex 7-d"][2]) < 1e-4
    for name in ("Tammes 12 (icosahedron)", "Tammes 24 (snub cube)", "24-cell (D4 roots)", "E8 roots"):
        n, d, optimum = KNOWN[name]
        assert deg(rankin_bound(n, d)) > optimum + 1  # not certified by Rankin: the search must confirm


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "name",
    ["cross-polytope 6-d", "simplex 7-d", "Tammes 12 (icosahedron)", "Tammes 24 (snub cube)", "24-cell (D4 roots)"],
)
def test_paper_objective_reaches_known_optimum(name, seed, record_property):
    # the paper's L_sep (mean over rows of the max) has the same optimum on these symmetric codes
    n, d, optimum = KNOWN[name]
    result = optimize_with_restarts(
        uniform_sphere(n, d, make_generator(seed)), config=replace(PACKING, separation="mean"),
        generator=make_generator(1000 + seed),
    )
    record_property("min_angle_deg", deg(result.min_angle))
    assert optimum - TOLERANCE <= deg(result.min_angle) <= optimum + TOLERANCE


# --- the packer's mechanics ----------------------------------------------------------------------


@pytest.mark.parametrize("separation", ["mean", "max"])
@pytest.mark.parametrize("d", [8, hyperface.WIDE])  # the two layouts of the gradient product
def test_dense_pass_equals_the_tiled_pass(separation, d):
    x = normalize(make_generator(5).normal(2, 30, d))  # [K, N, D]
    temperatures = torch.tensor([0.07, 0.02])
    g, m = hyperface._dense_pass(x, (1 / temperatures)[:, None, None], separation)
    for k in range(2):
        gk, _, hard = hyperface._full_pass(x[k], x[k], float(temperatures[k]), 7, separation)
        assert torch.allclose(g[k], gk, rtol=1e-4, atol=1e-4)
        assert torch.allclose(m[k] * temperatures[k], hard, atol=1e-6)


@pytest.mark.parametrize("separation, alpha", [("max", 0.0), ("mean", 0.0), ("max", 0.3)])
def test_parallel_lanes_follow_optimize(gallery, separation, alpha):
    # the dense batched anneal is optimize's full-batch step (loss, Adam, schedules, gallery refresh)
    starts = normalize(make_generator(2).normal(3, 30, 32))
    config = HyperFaceConfig(
        iterations=25, learning_rate=0.02, alpha=alpha, separation=separation, temperature=0.1,
        temperature_final=0.01, gallery_refresh=7, neighbours=None, stats_every=None,
    )
    temperatures = [0.1, 0.03, 0.1]  # each lane cools from its own temperature (the cold lanes)
    lanes, stopped = hyperface._anneal(starts, gallery, config, temperatures)
    assert not stopped
    for k in range(3):
        one = optimize(starts[k], gallery, replace(config, temperature=temperatures[k])).embeddings
        assert (lanes[k] - one).abs().max() < 1e-4


def test_a_run_stops_where_it_meets_the_stopping_angle():
    # a lane that already meets the bound ends the run before any step moves it, in both paths
    code = torch.cat([torch.eye(6), -torch.eye(6)])  # the cross-polytope: Rankin's bound, 90°
    stop = rankin_bound(12, 6) - hyperface.BOUND_SLACK
    starts = torch.stack([normalize(code + 0.2 * make_generator(0).normal(12, 6)), code])
    lanes, stopped = hyperface._anneal(starts, None, PACKING, None, stop)
    assert stopped and torch.equal(lanes, starts)
    x, stopped = hyperface._run_tiled(code, None, PACKING, stop, 64)
    assert stopped and deg(min_angle(x)) >= 90.0 - TOLERANCE
    lanes, stopped = hyperface._anneal(starts[:1], None, replace(PACKING, iterations=50), None, stop)
    assert not stopped  # 50 steps from a perturbed start fall short: the run goes to its end
    result = optimize_with_restarts(code, generator=make_generator(1))
    assert result.stopped == "bound" and len(result.rounds) == 1 and result.min_angle == result.rounds[0][0]


def test_a_quarter_of_the_lanes_start_cold(monkeypatch):
    seen = []
    real = hyperface._anneal
    monkeypatch.setattr(hyperface, "_anneal", lambda x, g, c, t=None, *a: seen.append(t) or real(x, g, c, t, *a))
    x = uniform_sphere(14, 3, make_generator(0))
    short = {"config": replace(PACKING, iterations=20), "refine": replace(PACKING_REFINE, iterations=5), "rounds": 1}
    optimize_with_restarts(x, generator=make_generator(1), **short)
    assert seen[0] == [1.0] * 12 + [hyperface.COLD_TEMPERATURE] * 4 and seen[1] is None  # anneal, polish
    seen.clear()
    optimize_with_restarts(x, generator=make_generator(1), lanes=3, **short)
    assert seen[0] == [1.0] * 3  # floor(0.25 x 3) = 0: lane 0 (init) is always hot
    seen.clear()
    optimize_with_restarts(x, generator=make_generator(1), cold_share=1.0, cold_temperature=0.2, lanes=2, **short)
    assert seen[0] == [0.2, 0.2]


def test_restarts_stopping_rules():
    # short schedules: only the bookkeeping matters. No round after the first can gain min_gain = 1 rad
    # (the optimum is 43.7°), so "patience" comes exactly one round after the first.
    x = uniform_sphere(24, 3, make_generator(0))
    short = {
        "config": replace(PACKING, iterations=150), "refine": replace(PACKING_REFINE, iterations=30), "lanes": 3,
    }
    a = optimize_with_restarts(x, generator=make_generator(1), min_gain=1.0, **short)
    assert a.stopped == "patience" and len(a.rounds) == 2 and all(len(r) == 3 for r in a.rounds)
    assert a.min_angle == max(max(r) for r in a.rounds) == min_angle(a.embeddings)  # the best is kept
    b = optimize_with_restarts(x, generator=make_generator(1), min_gain=1.0, rounds=1, **short)
    assert b.stopped == "rounds" and b.rounds == a.rounds[:1]  # round 0: the same draws, the same runs
    c = optimize_with_restarts(x, generator=make_generator(1), target=math.radians(1), **short)
    assert c.stopped == "target" and len(c.rounds) == 1
    d = optimize_with_restarts(x, generator=make_generator(1), min_gain=1.0, patience=3, rounds=3, **short)
    assert d.stopped == "rounds" and len(d.rounds) == 3 and d.rounds[:2] == a.rounds
    again = optimize_with_restarts(x, generator=make_generator(1), min_gain=1.0, **short)
    assert torch.equal(again.embeddings, a.embeddings)


def test_restarts_default_lanes_and_sequential_fallback(monkeypatch):
    x = uniform_sphere(8, 7, make_generator(0))
    assert len(optimize_with_restarts(x, generator=make_generator(1)).rounds[0]) == hyperface.MAX_LANES
    threads = torch.get_num_threads()
    calls = []
    real = hyperface.optimize
    monkeypatch.setattr(hyperface, "optimize", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(hyperface, "DENSE_ENTRIES", 8 * 8 - 1)  # one lane's Gram no longer fits: tiled runs
    result = optimize_with_restarts(x, generator=make_generator(1))
    # the anneal meets Rankin's bound: no polish (one call of optimize), and the search ends there
    assert len(result.rounds) == 1 and len(result.rounds[0]) == 1 and len(calls) == 1
    assert result.stopped == "bound" and abs(deg(result.min_angle) - KNOWN["simplex 7-d"][2]) <= TOLERANCE
    monkeypatch.setattr(hyperface, "DENSE_ENTRIES", 1 << 22)
    monkeypatch.setattr(hyperface, "LANE_ENTRIES", 2 * 64)  # lanes run in chunks of two
    result = optimize_with_restarts(x, generator=make_generator(1), lanes=5)
    assert len(result.rounds[0]) == 2 and result.stopped == "bound"  # the first chunk met it: no more chunks
    no_stop = {"rounds": 1, "config": replace(PACKING, iterations=30), "refine": replace(PACKING_REFINE, iterations=5)}
    assert len(optimize_with_restarts(x, generator=make_generator(1), lanes=5, **no_stop).rounds[0]) == 5
    assert len(calls) == 1 and torch.get_num_threads() == threads  # the one-thread block restored it


def test_restarts_with_gallery_keeps_points_near_it(gallery):
    init = init_from_gallery(gallery, 40, make_generator(4))
    config = replace(PACKING, alpha=1.0, iterations=200)
    once = {"generator": make_generator(1), "rounds": 1, "lanes": 2}
    free = optimize_with_restarts(init, gallery, replace(config, alpha=0.0), **once)
    once["generator"] = make_generator(1)
    pulled = optimize_with_restarts(init, gallery, config, **once)
    assert mean_gallery_distance(pulled.embeddings, gallery) < 0.7 * mean_gallery_distance(free.embeddings, gallery)
    assert pulled.min_angle > min_angle(init)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"init": torch.ones(5)}, "init"),
        ({"gallery": torch.ones(5, 4)}, "gallery"),
        ({"config": replace(PACKING, alpha=0.5)}, "gallery"),
        ({"config": replace(PACKING, batch_size=4)}, "config.batch_size"),
        ({"config": replace(PACKING, temperature=0.0)}, "config.temperature"),
        ({"refine": replace(PACKING, learning_rate=0.0)}, "config.learning_rate"),
        ({"lanes": 0}, "lanes"),
        ({"rounds": 0}, "rounds"),
        ({"patience": 0}, "patience"),
        ({"perturbation": -1.0}, "perturbation"),
        ({"cold_share": 1.5}, "cold_share"),
        ({"cold_temperature": 0.0}, "cold_temperature"),
    ],
)
def test_restarts_reject_bad_arguments(kwargs, name):
    args = {"init": uniform_sphere(10, 3, make_generator(0)), "gallery": None} | kwargs
    with pytest.raises(ValueError, match=name):
        optimize_with_restarts(args.pop("init"), generator=make_generator(0), **args)


# --- properties on a realistic shape ------------------------------------------------------------


@pytest.fixture(scope="module")
def gallery() -> torch.Tensor:
    # a clustered "face manifold": points near 20 centres in 32-d
    g = make_generator(3)
    centres = uniform_sphere(20, 32, g)
    return normalize(centres[g.integers(20, (400,))] + 0.3 * g.normal(400, 32))


def test_properties_norms_angle_loss(gallery):
    init = init_from_gallery(gallery, 300, make_generator(4))
    config = HyperFaceConfig(iterations=60, alpha=0.1, tile=64, stats_every=20)
    result = optimize(init, gallery, config)
    assert result.embeddings.shape == (300, 32)
    assert torch.allclose(result.embeddings.norm(dim=1), torch.ones(300), atol=1e-5)
    assert min_angle(result.embeddings) > min_angle(init) + math.radians(10)
    h = result.history
    assert [s.step for s in h] == list(range(1, 61)) and [s.exact for s in h].count(True) == 3
    assert h[-1].loss < h[0].loss
    assert h[-1].exact and h[-1].min_angle == pytest.approx(min_angle(result.embeddings), abs=1e-6)
    assert result.state.step == 60 and result.config == config


def mean_gallery_distance(x: torch.Tensor, gallery: torch.Tensor) -> float:
    return float(torch.cdist(x, gallery).min(dim=1).values.mean())


def test_gallery_term_pulls_toward_gallery(gallery):
    init = init_from_gallery(gallery, 300, make_generator(4))
    free = optimize(init, gallery, HyperFaceConfig(iterations=60, alpha=0.0, stats_every=None))
    pulled = optimize(init, gallery, HyperFaceConfig(iterations=60, alpha=1.0, stats_every=None))
    assert mean_gallery_distance(pulled.embeddings, gallery) < 0.7 * mean_gallery_distance(free.embeddings, gallery)
    assert min_angle(pulled.embeddings) > min_angle(init)


def test_stochastic_variant_improves_and_is_seeded(gallery):
    init = init_from_gallery(gallery, 300, make_generator(4))
    config = HyperFaceConfig(iterations=80, alpha=0.1, batch_size=64, tile=100, stats_every=None)
    a = optimize(init, gallery, config, generator=make_generator(5))
    assert min_angle(a.embeddings) > min_angle(init) + math.radians(5)
    assert torch.allclose(a.embeddings.norm(dim=1), torch.ones(300), atol=1e-5)
    assert torch.equal(a.embeddings, optimize(init, gallery, config, generator=make_generator(5)).embeddings)
    assert not torch.equal(a.embeddings, optimize(init, gallery, config, generator=make_generator(6)).embeddings)
    assert int(a.state.row_steps.sum()) == 80 * 64  # lazy Adam: each step moves exactly its batch


def test_full_batch_deterministic(gallery):
    init = init_from_gallery(gallery, 200, make_generator(4))
    config = HyperFaceConfig(iterations=20, alpha=0.5, tile=64)
    assert torch.equal(optimize(init, gallery, config).embeddings, optimize(init, gallery, config).embeddings)


@pytest.mark.parametrize("batch_size, neighbours", [(None, None), (50, None), (None, 8)])
def test_resume_is_bit_identical(gallery, tmp_path, batch_size, neighbours):
    init = init_from_gallery(gallery, 200, make_generator(4))
    config = HyperFaceConfig(
        iterations=100, alpha=0.5, batch_size=batch_size, gallery_refresh=7, tile=64, neighbours=neighbours, sparse_from=0
    )
    whole = optimize(init, gallery, config, generator=make_generator(9))

    class Interrupted(Exception):
        pass

    def stop_at_50(stats, state):
        if stats.step == 50:
            save_file(state.to_tensors(), tmp_path / "ckpt.safetensors")  # metadata-free
            raise Interrupted  # the worker is killed here

    with pytest.raises(Interrupted):
        optimize(init, gallery, config, generator=make_generator(9), on_step=stop_at_50)
    saved = HyperFaceState.from_tensors(load_file(tmp_path / "ckpt.safetensors"))
    assert saved.step == 50
    # a fresh generator: the saved rng state continues the batch stream
    resumed = optimize(init, gallery, config, generator=make_generator(0), state=saved)
    assert torch.equal(resumed.embeddings, whole.embeddings)
    assert [s.step for s in resumed.history] == list(range(51, 101))
    assert resumed.history == whole.history[50:]


def test_bf16_precision_polishes_in_float32(gallery):
    init = init_from_gallery(gallery, 200, make_generator(4))
    config = HyperFaceConfig(iterations=40, alpha=0.1, precision="bf16", polish_iterations=10, tile=64)
    exact = optimize(init, gallery, replace(config, precision="float32"))
    fast = optimize(init, gallery, config)
    assert torch.allclose(fast.embeddings.norm(dim=1), torch.ones(200), atol=1e-5)
    assert deg(min_angle(fast.embeddings)) == pytest.approx(deg(min_angle(exact.embeddings)), abs=2.0)


def test_init_from_gallery(gallery):
    x = init_from_gallery(gallery, 50, make_generator(0))
    members = (x @ gallery.T).max(dim=1).values
    assert torch.allclose(members, torch.ones(50), atol=1e-5) and len(set(map(tuple, x.tolist()))) == 50
    y = init_from_gallery(gallery, 500, make_generator(0), copy_cosine=0.9)
    assert y.shape == (500, 32) and torch.allclose(y.norm(dim=1), torch.ones(500), atol=1e-5)
    assert torch.allclose((y[:400] @ gallery.T).max(dim=1).values, torch.ones(400), atol=1e-5)
    copies = (y[400:] @ gallery.T).max(dim=1).values
    assert 0.85 < float(copies.mean()) < 1.0 and float(copies.max()) < 0.9999
    assert torch.equal(y, init_from_gallery(gallery, 500, make_generator(0)))


def test_on_step_sees_every_step_and_its_exceptions_propagate():
    init = uniform_sphere(20, 4, make_generator(0))
    seen = []
    optimize(init, None, replace(LOCAL, iterations=5), on_step=lambda s, st: seen.append((s.step, st.step)))
    assert seen == [(i, i) for i in range(1, 6)]

    def cancel(stats, state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(init, None, LOCAL, on_step=cancel)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"init": torch.ones(5)}, "init"),
        ({"init": torch.zeros(4, 3)}, "init"),
        ({"gallery": torch.ones(5, 4)}, "gallery"),
        ({"config": HyperFaceConfig(alpha=0.5)}, "gallery"),
        ({"config": replace(LOCAL, batch_size=4)}, "generator"),
        ({"config": replace(LOCAL, batch_size=99)}, "config.batch_size"),
        ({"config": replace(LOCAL, precision="fp8")}, "config.precision"),
        ({"config": replace(LOCAL, tile=1)}, "config.tile"),
        ({"config": replace(LOCAL, neighbours=0)}, "config.neighbours"),
        ({"config": replace(LOCAL, separation="sum")}, "config.separation"),
        ({"config": replace(LOCAL, temperature_final=0.0)}, "config.temperature_final"),
    ],
)
def test_optimize_rejects_bad_arguments(kwargs, name):
    args = {"init": uniform_sphere(10, 3, make_generator(0)), "gallery": None, "config": LOCAL} | kwargs
    with pytest.raises(ValueError, match=name):
        optimize(args.pop("init"), args.pop("gallery"), args.pop("config"))


def test_tiled_run_never_allocates_n_by_n():
    # N = 6000: an N x N float32 matrix is 137 MiB; with tile 256 a step's working set is a few MiB.
    script = textwrap.dedent(
        """
        import resource, sys, torch
        from models.sampling.hyperface import HyperFaceConfig, optimize
        from models.sampling.sphere import uniform_sphere
        from models.seeding import make_generator
        torch.set_num_threads(1)
        x = uniform_sphere(6000, 8, make_generator(0))
        config = HyperFaceConfig(iterations=2, alpha=0.0, tile=256, stats_every=1)
        optimize(x[:300], None, config)  # warm-up: allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        optimize(x, None, config)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    growth_mib = int(out.stdout.split()[-1]) / 1024
    assert growth_mib < 40, f"peak RSS grew by {growth_mib:.0f} MiB; an N x N float32 is 137 MiB"
