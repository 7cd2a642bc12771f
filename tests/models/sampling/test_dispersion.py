"""Dispersion: the batched forces and trajectories against a one-variation-at-a-time loop.

The loop below is the issue's straightforward reference: each variation is re-rendered with
gradients while every other latent is held fixed, and its whole potential (attraction, pair
repulsion, pull to w_avg) is differentiated by autograd through the plain modules (the batched
sampler runs the embedder's fused view). The tiny presets run in float64 there.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

from models.registry import Registry
from models.sampling.dispersion import (
    DispersionConfig,
    disperse,
    forces,
    initial_variations,
    reference_embeddings,
    repulsion_forces,
)
from models.sampling.latent_face import LatentFace
from models.seeding import derive_seed, make_generator

SEED = 5
IDS = [3, 7]  # global identity indices (not 0..n-1 on purpose)


@pytest.fixture(scope="module")
def face(tmp_path_factory: pytest.TempPathFactory) -> LatentFace:
    reg = Registry(Path(tmp_path_factory.mktemp("models")))
    reg.ensure("stylegan2-tiny")
    reg.ensure("iresnet-tiny")
    return LatentFace(reg.load("stylegan2-tiny"), reg.load("iresnet-tiny"), "center")


@pytest.fixture(scope="module")
def face64(face: LatentFace) -> LatentFace:
    return LatentFace(copy.deepcopy(face.generator).double(), copy.deepcopy(face.embedder).double(), "center")


@pytest.fixture(scope="module")
def plain64(face64: LatentFace) -> LatentFace:
    """The same models without the fused embedder view: what the reference loop runs."""
    return LatentFace(face64.generator, face64.embedder, "center", fused=False)


def w_refs(face: LatentFace, ids: list[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return face.initial_latents([1000 + i for i in ids]).to(dtype)  # [n, D]


# --- the straightforward reference ---------------------------------------------------------------


def loop_force(face: LatentFace, w: torch.Tensor, e_ref: torch.Tensor, i: int, a: int,
               cfg: DispersionConfig) -> torch.Tensor:
    """-grad of variation (i, a)'s potential, the others fixed: [D]."""
    wa = w[i, a].detach().clone().requires_grad_(True)
    e = face.embed(wa[None])[0]
    theta = torch.arccos(0.999999 * torch.dot(e, e_ref[i]))
    u = cfg.attraction / 4 * theta**2
    for b in range(w.shape[1]):
        if b != a:
            d = torch.linalg.vector_norm(wa - w[i, b].detach())
            if d < cfg.repulsion_radius:
                u = u + cfg.repulsion / 2 * (cfg.repulsion_radius - d) ** 2
    w_avg = face.w_avg.to(w.dtype)
    u = u + cfg.latent_pull / 2 * (wa - w_avg).square().sum()
    (g,) = torch.autograd.grad(u, wa)
    return -g


def loop_run(face: LatentFace, w_ref: torch.Tensor, ids: list[int], variations: int,
             cfg: DispersionConfig) -> torch.Tensor:
    """Dispersion one variation at a time, random draws from the documented seed scheme."""
    with torch.no_grad():
        e_ref = torch.stack([face.embed(w_ref[i:i + 1])[0] for i in range(len(ids))])
    d = w_ref.shape[1]

    def normal(*parts: int | str) -> torch.Tensor:
        return make_generator(derive_seed(SEED, *parts)).normal(d).to(w_ref.dtype)

    w = torch.stack([torch.stack([w_ref[i] + cfg.init_scale * normal("dispersion.init", ident, a)
                                  for a in range(variations)]) for i, ident in enumerate(ids)])
    for t in range(cfg.iterations):
        new = w.clone()
        for i, ident in enumerate(ids):
            for a in range(variations):
                f = loop_force(face, w, e_ref, i, a, cfg)
                f = f + cfg.noise * normal("dispersion.noise", ident, a, t)
                new[i, a] = w[i, a] + cfg.dt / cfg.viscosity * f
        w = new
    return w


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- exactness ------------------------------------------------------------------------------------


def test_batched_forces_match_the_per_variation_loop(face64: LatentFace, plain64: LatentFace) -> None:
    cfg = DispersionConfig(batch_size=3, repulsion_radius=5.0)  # A = 5 > batch; radius: some pairs out of range
    w_ref = w_refs(face64, IDS)
    w = initial_variations(w_ref, IDS, SEED, 5, 0.4)  # [2, 5, D]
    e_ref = reference_embeddings(face64, w_ref, batch_size=1)
    f = forces(face64, w, e_ref, cfg)
    total = f.embedding + f.repulsion + f.pull
    dist = torch.cdist(w, w)
    assert ((dist > 5.0).sum() > 0) and ((dist < 5.0).sum() > 2 * 5)  # both cases occur
    for i in range(2):
        for a in range(5):
            expected = loop_force(plain64, w, e_ref, i, a, cfg)
            assert rel_err(total[i, a], expected) < 1e-5
    # each component alone, against the loop with the other coefficients zeroed
    for field, zeroed in (("embedding", {"repulsion": 0.0, "latent_pull": 0.0}),
                          ("repulsion", {"attraction": 0.0, "latent_pull": 0.0}),
                          ("pull", {"attraction": 0.0, "repulsion": 0.0})):
        only = DispersionConfig(batch_size=3, repulsion_radius=5.0, **zeroed)
        expected = torch.stack([torch.stack([loop_force(plain64, w, e_ref, i, a, only) for a in range(5)])
                                for i in range(2)])
        assert rel_err(getattr(f, field), expected) < 1e-5, field
    cos = torch.stack([plain64.embed(w[i]) @ e_ref[i] for i in range(2)])  # [2, 5]
    torch.testing.assert_close(f.cosine, cos, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_trajectory_matches_the_loop(face64: LatentFace, plain64: LatentFace, noise: float) -> None:
    cfg = DispersionConfig(iterations=3, batch_size=3, noise=noise)
    w_ref = w_refs(face64, IDS)
    got = disperse(face64, w_ref, IDS, SEED, 5, cfg).latents
    expected = loop_run(plain64, w_ref, IDS, 5, cfg)
    assert rel_err(got - w_ref[:, None], expected - w_ref[:, None]) < 1e-5
    assert got.dtype == torch.float64 and got.shape == (2, 5, face64.style_dim)


def test_independent_of_batch_size_and_of_the_other_identities(face64: LatentFace) -> None:
    cfg = DispersionConfig(iterations=3)
    ids = [3, 7, 11]
    w_ref = w_refs(face64, ids)
    runs = [disperse(face64, w_ref, ids, SEED, 4, DispersionConfig(iterations=3, batch_size=b)).latents
            for b in (1, 5, 64)]
    alone = disperse(face64, w_ref[1:2], [7], SEED, 4, cfg).latents
    swapped = disperse(face64, w_ref[[2, 1]], [11, 7], SEED, 4, DispersionConfig(iterations=3, batch_size=3)).latents
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alone[0], runs[0][1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(swapped[1], runs[0][1], rtol=1e-10, atol=1e-10)
    # another seed moves them
    assert not torch.allclose(disperse(face64, w_ref, ids, SEED + 1, 4, cfg).latents, runs[0])


# --- behaviour ------------------------------------------------------------------------------------


def test_attraction_pulls_embeddings_toward_the_reference(face: LatentFace) -> None:
    ids = list(range(4))
    w_ref = w_refs(face, ids, torch.float32)
    init = DispersionConfig(iterations=0, init_scale=0.4)
    attract = DispersionConfig(iterations=8, init_scale=0.4, repulsion=0.0,
                               latent_pull=0.0, noise=0.0)
    start = disperse(face, w_ref, ids, SEED, 6, init)
    end = disperse(face, w_ref, ids, SEED, 6, attract)
    e_ref = start.reference_embeddings

    def cosines(w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([face.embed(w[i]) @ e_ref[i] for i in range(len(ids))])  # [n, A]

    before, after = cosines(start.latents), cosines(end.latents)
    assert after.mean() > before.mean() + 0.01
    assert (after > before).float().mean() > 0.9
    means = [s.mean_cosine for s in end.history]
    assert means[-1] > means[0]
    # under the published recipe, attraction keeps them closer than the same run without it
    recipe = disperse(face, w_ref, ids, SEED, 6, DispersionConfig(iterations=6)).latents
    no_pull = disperse(face, w_ref, ids, SEED, 6, DispersionConfig(iterations=6, attraction=0.0)).latents
    assert cosines(recipe).mean() > cosines(no_pull).mean()


def test_repulsion_spreads_variations_in_w(face: LatentFace) -> None:
    w_ref = w_refs(face, [0, 1], torch.float32)
    cfg = DispersionConfig(iterations=5, attraction=0.0, latent_pull=0.0, noise=0.0)
    res = disperse(face, w_ref, [0, 1], SEED, 6, cfg)
    spreads = [s.mean_spread for s in res.history]
    assert all(b > a for a, b in itertools.pairwise(spreads))
    assert torch.pdist(res.latents[0]).min() > torch.pdist(
        initial_variations(w_ref, [0, 1], SEED, 6, cfg.init_scale)[0]).min()


def test_repulsion_closed_form_for_two_variations() -> None:
    w = torch.zeros(1, 2, 8, dtype=torch.float64)
    w[0, 1, 0] = 2.0  # distance 2, radius 12
    f, min_d, mean_d = repulsion_forces(w, coefficient=0.5, radius=12.0)
    expected = torch.zeros_like(w)
    expected[0, 0, 0], expected[0, 1, 0] = -0.5 * 10.0, 0.5 * 10.0  # k (r - d) along the separation
    torch.testing.assert_close(f, expected)
    assert float(min_d[0]) == 2.0 and float(mean_d[0]) == 2.0
    far, _, _ = repulsion_forces(w, coefficient=0.5, radius=1.5)  # out of range: no force
    assert far.abs().max() == 0
    single, min_1, mean_1 = repulsion_forces(w[:, :1], coefficient=1.0, radius=12.0)
    assert single.abs().max() == 0 and math.isinf(float(min_1[0])) and float(mean_1[0]) == 0


def test_adaptive_time_step_is_per_identity(face64: LatentFace) -> None:
    cfg = DispersionConfig(iterations=2, dt=-0.3, batch_size=4)
    w_ref = w_refs(face64, IDS)
    seen = []
    res = disperse(face64, w_ref, IDS, SEED, 3, cfg, on_step=seen.append)
    for i, identity in enumerate(IDS):
        alone = disperse(face64, w_ref[i:i + 1], [identity], SEED, 3, cfg)
        torch.testing.assert_close(alone.latents[0], res.latents[i], rtol=1e-10, atol=1e-10)
        s = alone.history[0]
        assert s.dt == pytest.approx(0.3 * s.min_spread / s.max_force, rel=1e-9)
    assert len(seen) == 2 and seen == res.history


def test_offsets_start_and_early_stop(face: LatentFace) -> None:
    w_ref = w_refs(face, [0, 1], torch.float32)
    offsets = make_generator(1).normal(2, 3, face.style_dim)
    zero = DispersionConfig(iterations=0)
    plain = disperse(face, w_ref, [0, 1], SEED, 3, zero).latents
    shifted = disperse(face, w_ref, [0, 1], SEED, 3, zero, offsets=offsets).latents
    torch.testing.assert_close(shifted - plain, offsets)
    calls = []
    res = disperse(face, w_ref, [0, 1], SEED, 3, DispersionConfig(iterations=10),
                   on_step=calls.append, should_stop=lambda: len(calls) >= 2)
    assert res.steps == 2 and len(res.history) == 2 and [s.step for s in calls] == [1, 2]


@pytest.mark.parametrize("kwargs, name", [
    ({"w_ref": torch.zeros(2, 5)}, "w_ref"),
    ({"identities": [0]}, "identities"),
    ({"identities": [0, 0]}, "identities"),
    ({"variations": 0}, "variations"),
    ({"seed": 1.5}, "seed"),
    ({"offsets": torch.zeros(2, 4, 64)}, "offsets"),
    ({"config": DispersionConfig(dt=-0.3), "variations": 1}, "config.dt"),
])
def test_bad_inputs_raise_naming_the_argument(face: LatentFace, kwargs: dict, name: str) -> None:
    args = {"w_ref": w_refs(face, [0, 1], torch.float32), "identities": [0, 1], "seed": 0, "variations": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        disperse(face, **args)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("iterations", -1), ("dt", 0.0),
                                          ("repulsion_radius", 0.0), ("noise", -1.0), ("viscosity", 0.0)])
def test_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DispersionConfig(**{field: value})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(face: LatentFace) -> None:
    cuda = LatentFace(copy.deepcopy(face.generator).cuda(), copy.deepcopy(face.embedder).cuda(), "center")
    w_ref = w_refs(face, [0, 1], torch.float32)
    cfg = DispersionConfig(iterations=3, batch_size=4)
    cpu = disperse(face, w_ref, [0, 1], SEED, 5, cfg).latents
    gpu = disperse(cuda, w_ref.cuda(), [0, 1], SEED, 5, cfg).latents
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)
