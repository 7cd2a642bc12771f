"""Langevin identity sampling: the batched step against the per-identity reference loop, and its properties.

The models are the registry's tiny presets (real StyleGAN2 and iResNet architectures, real checkpoint
files and loaders), built into a module-private directory; the exactness checks run them in float64,
the reference loop through the plain modules, the batched step through the fused embedder view.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.registry import Registry
from models.sampling import langevin as lv
from models.sampling.latent_face import LatentFace
from models.seeding import derive_seed, make_generator

N = 7  # identities in the exactness checks
BATCH = 3  # does not divide N
SEED = 11  # seeds the initial latents and the noise


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("langevin-models"))
    reg.ensure("stylegan2-tiny")
    reg.ensure("iresnet-tiny")
    return reg


@pytest.fixture(scope="module", autouse=True)
def one_thread(registry: Registry) -> Iterator[None]:
    """These models are tiny: one intra-op thread is as fast, and immune to the spin-wait stalls that
    two OpenMP threads suffer on a busy two-core machine (seconds became minutes there). Set once
    the presets are built, so that building them is left as every other test does it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def face(registry: Registry) -> LatentFace:
    return LatentFace(registry.load("stylegan2-tiny"), registry.load("iresnet-tiny"), "center")


@pytest.fixture(scope="module")
def face64(registry: Registry) -> LatentFace:
    return LatentFace(registry.load("stylegan2-tiny").double(), registry.load("iresnet-tiny").double(), "center")


@pytest.fixture(scope="module")
def plain64(face64: LatentFace) -> LatentFace:
    """The same models without the fused embedder view: what the reference loop runs."""
    return LatentFace(face64.generator, face64.embedder, "center", fused=False)


def other_embeddings(face: LatentFace, count: int) -> torch.Tensor:
    """Embeddings of faces that are not identities of the run (stand-ins for real faces): [count, E]."""
    seeds = [derive_seed(SEED + 1, "other", i) for i in range(count)]
    w = face.initial_latents(seeds, 0.7).to(next(face.generator.parameters()).dtype)  # [count, D]
    with torch.no_grad():
        return face.embed(w)


def reference_forces(
    face: LatentFace, w: torch.Tensor, config: lv.LangevinConfig, references: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward loop: each identity re-rendered alone with gradients, the others' embeddings fixed
    (`face` runs the plain modules).

    Returns (repulsion [N, D], latent pull [N, D]).
    """
    s = config.cos_scale
    with torch.no_grad():
        fixed = torch.cat([face.embed(w[i : i + 1]) for i in range(w.shape[0])])  # [N, E]
    repulsion = torch.zeros_like(w)
    for i in range(w.shape[0]):
        wi = w[i : i + 1].clone().requires_grad_(True)
        ei = face.embed(wi)[0]  # [E]
        others = torch.cat([fixed[:i], fixed[i + 1 :]])  # [N - 1, E]
        theta = torch.acos(s * (others @ ei))
        r0, k = config.repulsion_radius, config.stiffness
        u = torch.where(theta < r0, k / 2 * (r0 - theta) ** 2, 0.0).sum()
        if references is not None:
            refs = references / references.norm(dim=1, keepdim=True)
            theta_r = torch.acos(s * (refs @ ei))
            r0_ref, k_ref = config.reference_repulsion_radius, config.reference_stiffness
            u = u + torch.where(theta_r < r0_ref, k_ref / 2 * (r0_ref - theta_r) ** 2, 0.0).sum()
        u.backward()
        repulsion[i] = -wi.grad[0]
    latent = config.latent_pull * (face.w_avg.to(w.dtype) - w)
    return repulsion, latent


def reference_step(
    face: LatentFace, w: torch.Tensor, config: lv.LangevinConfig, references: torch.Tensor | None
) -> tuple[torch.Tensor, float]:
    """One noiseless step of the reference loop: (new latents, dt)."""
    rep, lat = reference_forces(face, w, config, references)
    force = rep + lat
    d = torch.cdist(w, w) + torch.diag(torch.full((w.shape[0],), math.inf, dtype=w.dtype))
    dt = abs(config.tau) * config.mu * float(d.min()) / float(force.norm(dim=1).max())
    return w + dt / config.mu * force, dt


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-row relative error |a_i - b_i| / |b_i|."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


# --- exactness against the per-identity loop ----------------------------------------------------


def test_batched_forces_match_the_per_identity_loop(face64: LatentFace, plain64: LatentFace) -> None:
    # tiles that do not divide N; one batch's graph kept, the others rendered twice
    config = lv.LangevinConfig(batch_size=BATCH, reference_repulsion_radius=1.5, tile=3, keep_graphs=0)
    refs = other_embeddings(face64, 3)
    w = lv.init_state(face64, N, SEED, config).latents
    assert w.dtype == torch.float64
    ours = lv.compute_forces(face64, w, config, refs)
    rep, lat = reference_forces(plain64, w, config, refs)
    assert float(rep.norm(dim=1).min()) > 1e-3  # every identity is pushed: the check has teeth
    assert rel_err(ours.repulsion, rep) < 1e-5
    assert rel_err(ours.latent, lat) < 1e-12
    no_refs = lv.compute_forces(face64, w, config)  # the references contribute
    assert rel_err(no_refs.repulsion, rep) > 1e-3
    # one batch holding all identities, or every graph kept from the embedding pass: the same forces
    for changed in (replace(config, batch_size=N), replace(config, keep_graphs=N), replace(config, keep_graphs=4)):
        other = lv.compute_forces(face64, w, changed, refs)
        assert rel_err(other.repulsion, ours.repulsion) < 1e-12
        assert torch.allclose(other.embeddings, ours.embeddings, rtol=0, atol=1e-14)


def test_noiseless_steps_match_the_per_identity_loop(face64: LatentFace, plain64: LatentFace) -> None:
    config = lv.LangevinConfig(batch_size=BATCH, noise=0.0, iterations=3, tile=4)
    state = lv.init_state(face64, N, SEED, config)
    w_ref = state.latents.clone()
    for t in range(3):
        stats = lv.step(face64, state, config, SEED)
        w_ref, dt = reference_step(plain64, w_ref, config, None)
        assert stats.step == t + 1 and state.step == t + 1
        assert stats.dt == pytest.approx(dt, rel=1e-9)
        assert rel_err(state.latents, w_ref) < 1e-9
    assert rel_err(state.latents, lv.init_state(face64, N, SEED, config).latents) > 1e-3  # they moved


def test_noisy_run_does_not_depend_on_batch_size(face64: LatentFace) -> None:
    config = lv.LangevinConfig(iterations=3, noise=0.05)
    out = []
    for bs in (2, BATCH, N):
        state = lv.init_state(face64, N, SEED, config)
        lv.run(face64, state, replace(config, batch_size=bs), SEED)
        out.append(state.latents)
    assert (out[0] - out[1]).abs().max() < 1e-10 and (out[0] - out[2]).abs().max() < 1e-10
    quiet = lv.init_state(face64, N, SEED, config)
    lv.run(face64, quiet, replace(config, noise=0.0), SEED)
    assert (quiet.latents - out[0]).abs().max() > 1e-3  # the noise is there


def test_noise_comes_from_seed_identity_and_step(face: LatentFace) -> None:
    # No forces: each increment is sqrt(dt) eta xi, xi from (seed, identity, step) alone.
    config = lv.LangevinConfig(stiffness=0.0, latent_pull=0.0, noise=0.5, tau=0.04, iterations=2, batch_size=2)
    whole = lv.init_state(face, 6, SEED, config)
    part = lv.init_state(face, 3, SEED, config, first_identity=3)
    assert torch.allclose(part.latents, whole.latents[3:], rtol=0, atol=1e-5)  # the same identities
    w0 = whole.latents.clone()
    incs = []
    for state in (whole, part):
        before = state.latents.clone()
        lv.step(face, state, config, SEED)
        incs.append(state.latents - before)
    assert torch.allclose(incs[1], incs[0][3:], rtol=0, atol=1e-5)
    first = incs[0]
    lv.step(face, whole, config, SEED)
    second = whole.latents - w0 - first
    assert (second - first).abs().max() > 0.1  # another step, other noise
    scale = math.sqrt(config.tau) * config.noise
    assert float(first.std()) == pytest.approx(scale, rel=0.15)
    other = lv.init_state(face, 6, SEED, config)
    lv.step(face, other, config, SEED + 1)
    assert (other.latents - w0 - first).abs().max() > 0.1  # another seed, other noise


# --- resumption ---------------------------------------------------------------------------------


def test_interrupted_and_resumed_equals_uninterrupted(face: LatentFace, tmp_path: Path) -> None:
    config = lv.LangevinConfig(iterations=4, batch_size=2, noise=0.05)
    full = lv.init_state(face, 5, SEED, config)
    seen: list[int] = []
    last = lv.run(face, full, config, SEED, on_step=lambda s, st: seen.append(s.step))
    assert seen == [1, 2, 3, 4] and last is not None and last.step == 4 and full.step == 4

    part = lv.init_state(face, 5, SEED, config)
    lv.run(face, part, config, SEED, should_stop=lambda: part.step >= 2)
    assert part.step == 2
    tensors, meta = part.state_dict()
    path = tmp_path / "checkpoint.safetensors"
    save_file(tensors, path, metadata={"langevin": json.dumps(meta)})
    with safe_open(path, "pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        loaded_meta = json.loads(f.metadata()["langevin"])
    resumed = lv.LangevinState.from_state_dict(loaded, loaded_meta)
    assert resumed.dt == part.dt and resumed.step == 2
    lv.run(face, resumed, config, SEED)
    assert torch.equal(resumed.latents, full.latents)

    flat = lv.LangevinState.from_tensors(part.to_tensors())  # the all-tensor form
    assert flat.step == 2 and flat.dt == part.dt and torch.equal(flat.latents, part.latents)
    assert lv.run(face, full, config, SEED) is None  # nothing left to do


# --- properties ---------------------------------------------------------------------------------


def test_repulsion_raises_the_minimum_angle(face: LatentFace) -> None:
    config = lv.LangevinConfig(iterations=6, latent_pull=0.0, noise=0.0, batch_size=8)
    state = lv.init_state(face, 8, SEED, config)
    history: list[lv.LangevinStats] = []
    lv.run(face, state, config, SEED, on_step=lambda s, st: history.append(s))
    final = lv.compute_forces(face, state.latents, config).pairs
    assert final.angle_min > history[0].angle_min + 0.1
    assert final.energy < 0.5 * history[0].energy


def test_reference_repulsion_moves_identities_away(face: LatentFace) -> None:
    refs = other_embeddings(face, 4)
    config = lv.LangevinConfig(iterations=5, stiffness=0.0, latent_pull=0.0, noise=0.0,
                               reference_repulsion_radius=1.5, batch_size=8)
    state = lv.init_state(face, 6, SEED, config)
    before = lv.pair_terms(lv.compute_forces(face, state.latents, config).embeddings, config, refs)
    lv.run(face, state, config, SEED, refs)
    after = lv.pair_terms(lv.compute_forces(face, state.latents, config).embeddings, config, refs)
    assert before.reference_angle_min is not None and after.reference_angle_min is not None
    assert after.reference_angle_min > before.reference_angle_min + 0.1
    assert after.energy < 0.5 * before.energy
    idle = lv.init_state(face, 6, SEED, config)  # without references nothing acts
    stats = lv.step(face, idle, config, SEED)
    assert stats.dt == 0 and stats.force_max == 0 and stats.reference_angle_min is None


def test_time_step_follows_the_formula(face: LatentFace) -> None:
    config = lv.LangevinConfig(noise=0.0, mu=2.0, tau=-0.2, batch_size=4)
    state = lv.init_state(face, 5, SEED, config)
    w = state.latents.clone()
    forces = lv.compute_forces(face, w, config)
    total = forces.repulsion + forces.latent
    d = torch.cdist(w.double(), w.double()) + torch.diag(torch.full((5,), math.inf, dtype=torch.float64))
    expected = 0.2 * 2.0 * float(d.min()) / float(total.norm(dim=1).max())
    stats = lv.step(face, state, config, SEED)
    assert stats.dt == pytest.approx(expected, rel=1e-5)
    assert stats.latent_distance_min == pytest.approx(float(d.min()), rel=1e-5)
    # the fastest identity moves |tau| x the closest pair's distance, whatever mu
    assert float((state.latents - w).norm(dim=1).max()) == pytest.approx(0.2 * float(d.min()), rel=1e-4)
    fixed = lv.init_state(face, 5, SEED, config)
    assert lv.step(face, fixed, replace(config, tau=0.125), SEED).dt == 0.125


def test_min_latent_distance_is_tiled_exactly() -> None:
    w = make_generator(3).normal(23, 16, dtype=torch.float64)
    w[17] = w[4] + 1e-7  # a very close pair: recomputed from the difference, not the Gram expansion
    expected = float((w[17] - w[4]).norm())
    for tile in (1, 4, 7, 100):
        assert lv.min_latent_distance(w, tile) == pytest.approx(expected, rel=1e-6)


# --- statistics ---------------------------------------------------------------------------------


def test_pair_terms_on_a_hand_built_case() -> None:
    a = 0.5
    e = torch.tensor([[1.0, 0, 0], [math.cos(a), math.sin(a), 0], [0, 0, 1], [-1, 0, 0]], dtype=torch.float64)
    # pair angles: (0,1) a, (0,2) pi/2, (0,3) pi, (1,2) pi/2, (1,3) pi - a, (2,3) pi/2
    config = lv.LangevinConfig(stiffness=2.0, repulsion_radius=1.4, threshold=1.0, cos_scale=1.0)
    for tile in (1, 3, 4):
        p = lv.pair_terms(e, replace(config, tile=tile))
        assert p.angle_min == pytest.approx(a) and p.angle_max == pytest.approx(math.pi)
        assert p.angle_mean == pytest.approx((a + 3 * math.pi / 2 + math.pi + math.pi - a) / 6)
        assert torch.allclose(p.nn_angles, torch.tensor([a, a, math.pi / 2, math.pi / 2], dtype=torch.float64))
        assert p.pairs_beyond == pytest.approx(5 / 6)
        assert p.energy == pytest.approx(2.0 / 2 * (1.4 - a) ** 2)  # only the pair (0,1) is in range
        coef = 2.0 * (1.4 - a) / math.sin(a)  # du/dcos = k (r0 - theta) / sqrt(1 - cos^2)
        expected = torch.zeros_like(e)
        expected[0], expected[1] = coef * e[1], coef * e[0]
        assert torch.allclose(p.grad, expected)
        assert p.reference_angle_min is None
    refs = torch.tensor([[0.0, 0, 2.0]], dtype=torch.float64)  # normalised inside: e2 itself
    p = lv.pair_terms(e, replace(config, reference_stiffness=3.0, reference_repulsion_radius=1.6), refs)
    assert p.reference_angle_min == pytest.approx(0.0, abs=1e-6)
    assert p.energy == pytest.approx((1.4 - a) ** 2 + 1.5 * 1.6**2 + 3 * 1.5 * (1.6 - math.pi / 2) ** 2)


def test_step_statistics_on_a_run(face: LatentFace) -> None:
    config = lv.LangevinConfig(batch_size=3, threshold=1.0)
    state = lv.init_state(face, 6, SEED, config)
    w = state.latents.clone()
    forces = lv.compute_forces(face, w, config)
    e = forces.embeddings.double()
    theta = torch.acos(config.cos_scale * (e @ e.T).clamp(-1, 1))
    iu = torch.triu_indices(6, 6, 1)
    pairs = theta[iu[0], iu[1]]
    nn = (theta + torch.diag(torch.full((6,), math.inf, dtype=torch.float64))).min(dim=1).values
    stats = lv.step(face, state, config, SEED)
    assert stats.angle_min == pytest.approx(float(pairs.min()), rel=1e-5)
    assert stats.angle_mean == pytest.approx(float(pairs.mean()), rel=1e-5)
    assert stats.angle_max == pytest.approx(float(pairs.max()), rel=1e-5)
    assert stats.nn_angle_mean == pytest.approx(float(nn.mean()), rel=1e-5)
    assert stats.nn_beyond == float((nn > 1.0).float().mean())
    assert stats.pairs_beyond == float((pairs > 1.0).double().mean())
    assert stats.repulsion_max == pytest.approx(float(forces.repulsion.norm(dim=1).max()), rel=1e-5)
    assert stats.latent_mean == pytest.approx(float(forces.latent.norm(dim=1).mean()), rel=1e-5)
    assert json.loads(json.dumps(stats.to_json()))["step"] == 1


# --- inputs -------------------------------------------------------------------------------------


def test_initial_latents_are_the_random_samplers(face: LatentFace) -> None:
    state = lv.init_state(face, 4, SEED, lv.LangevinConfig(truncation=0.5), first_identity=10)
    expected = face.initial_latents([derive_seed(SEED, "identity", i) for i in range(10, 14)], 0.5)
    assert torch.equal(state.latents, expected) and state.step == 0 and state.first_identity == 10


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("repulsion_radius", 0.0), ("tau", 0.0), ("mu", -1.0),
                                          ("cos_scale", 1.5), ("noise", math.nan), ("tile", 0), ("keep_graphs", -1)])
def test_invalid_config_is_refused(face: LatentFace, field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"config.{field}"):
        lv.init_state(face, 3, SEED, replace(lv.LangevinConfig(), **{field: value}))


def test_invalid_inputs_are_refused(face: LatentFace) -> None:
    config = lv.LangevinConfig()
    with pytest.raises(ValueError, match="n:"):
        lv.init_state(face, 1, SEED, config)
    state = lv.init_state(face, 3, SEED, config)
    with pytest.raises(ValueError, match="references"):
        lv.step(face, state, config, SEED, torch.ones(2, 7))
    with pytest.raises(ValueError, match="latents"):
        lv.step(face, lv.LangevinState(latents=torch.zeros(3, 5)), config, SEED)
    with pytest.raises(ValueError, match="seed"):
        lv.step(face, state, config, -1)
    with pytest.raises(ValueError, match="state.step"):
        lv.run(face, lv.LangevinState(latents=state.latents, step=5), replace(config, iterations=3), SEED)
    with pytest.raises(ValueError, match="meta"):
        lv.LangevinState.from_state_dict(*state.state_dict()[:1], {"format": "other"})
