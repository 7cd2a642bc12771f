"""Dispersion (Geissbühler, Otroshi Shahreza & Marcel, ICML 2025): variations of latent identities.

Each identity i has a reference W latent w_i and its embedding e_i = F(G(w_i)). Its A variations
start at w_ia = w_i + s xi_ia (+ a DisCo offset, see `models.sampling.covariates`) and move for
a few over-damped steps under
  - embedding attraction: U = (k_e / 4) theta(F(G(w_ia)), e_i)^2, theta = arccos(0.999999 <., .>)
    (the reference's angle; the factor keeps the gradient finite at theta = 0);
  - latent soft-sphere repulsion among the identity's own variations, Euclidean in W:
    F_ia = k_w sum_{b != a, d_ab < r} (r - d_ab) (w_ia - w_ib) / d_ab
    (the reference's potential (k_w / 4) sum over ordered pairs of (r - d_ab)^2);
  - a pull toward the mean latent: k_g (w_avg - w_ia);
  - a random force eta xi;
  w_ia += (dt / mu) (F_embedding + F_repulsion + F_pull + eta xi).
Constants, update and defaults follow idiap/face_synthetics (`augment_identities_dispersion`).
There the noise is a force (scaled by dt, not sqrt(dt)), dt is fixed (0.05) unless `dt` < 0 (the
reference's `timestep`), which makes it adaptive: dt = |dt| mu min_{a != b} d_ab / max_a |F_ia|. The
reference takes that min and max over every identity in the run; here they are taken per identity, so
that a shard of identities moves exactly as it would inside the whole job.

Batching: the attraction of a variation depends on its own latent only, so the n x A variations
are flattened and rendered batch_size at a time, whatever identity they belong to (one forward and
one backward per step, the embedder through `LatentFace`'s fused view); the repulsion is a cheap
closed form over each identity's A x A distances. Every random draw is addressed by
(seed, purpose, identity, variation[, step]) through `derive_seed`; draws are made on the CPU in
float32 and moved to the latents' device, so results depend neither on batch_size nor on which
identities share a call (nor on the device, up to floating-point rounding):
  initial noise:  derive_seed(seed, "dispersion.init", identity, a)         -> randn(D)
  step noise:     derive_seed(seed, "dispersion.noise", identity, a, step)  -> randn(D), step 0-based
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.seeding import DISPERSION_INIT, DISPERSION_NOISE, derive_seed, make_generator

ARCCOS_SHRINK = 0.999999  # theta = arccos(ARCCOS_SHRINK * cos), as the reference computes angles
PAIR_BUDGET = 1 << 24  # identities per repulsion chunk: chunk x A x A <= this many distances


@dataclass(frozen=True)
class DispersionConfig:
    iterations: int = 20  # update steps; 0 = return the initial latents
    init_scale: float = 0.2  # s in the paper: std of the Gaussian added to w_ref to start each variation,
    # W units
    attraction: float = 20.0  # k_e in the paper: attraction U = (k_e / 4) theta^2 to the reference
    # embedding, theta in radians
    repulsion: float = 1.0  # k_w in the paper: stiffness of the latent soft-sphere repulsion
    repulsion_radius: float = 12.0  # r in the paper: variations of one identity closer than this in W
    # (Euclidean) repel
    latent_pull: float = 1.0  # k_g in the paper: pull k_g (w_avg - w) toward the generator's mean latent
    noise: float = 0.05  # eta in the paper: std of the random force (a force: it moves w by dt/mu x eta x xi)
    viscosity: float = 1.0  # mu: w += (dt / mu) x total force
    dt: float = 0.05  # dt in the paper: > 0 fixed; < 0 adaptive, dt = |dt| x mu x (smallest distance
    # between the identity's variations) / (largest total-force norm among them), per identity
    batch_size: int = 64  # variations rendered per forward/backward pass (any identities mixed); memory
    # only: results do not depend on it

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations: must be >= 0, got {self.iterations}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        for name in ("init_scale", "attraction", "repulsion", "latent_pull", "noise"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        if not self.repulsion_radius > 0:
            raise ValueError(f"repulsion_radius: must be > 0, got {self.repulsion_radius}")
        if not self.viscosity > 0:
            raise ValueError(f"viscosity: must be > 0, got {self.viscosity}")
        if self.dt == 0 or self.dt != self.dt:
            raise ValueError(f"dt: must be non-zero (> 0 fixed, < 0 adaptive), got {self.dt}")


@dataclass(frozen=True)
class DispersionForces:
    embedding: torch.Tensor  # [n, A, D] attraction toward the reference embedding
    repulsion: torch.Tensor  # [n, A, D] soft-sphere repulsion from the identity's other variations
    pull: torch.Tensor  # [n, A, D] k_g (w_avg - w)
    cosine: torch.Tensor  # [n, A] cosine of each variation's embedding to its reference embedding
    min_distance: torch.Tensor  # [n] smallest latent distance between two variations (inf if A = 1)
    mean_distance: torch.Tensor  # [n] mean latent distance between two variations (0 if A = 1)


@dataclass(frozen=True)
class StepStats:
    step: int  # steps completed, 1-based
    mean_cosine: float  # mean cosine of variations' embeddings to their reference (before the update)
    min_cosine: float  # smallest such cosine
    mean_spread: float  # mean latent distance between two variations of one identity, W units (0 if A = 1)
    min_spread: float  # smallest such distance (inf if A = 1)
    embedding_force: float  # mean norm of the attraction force
    repulsion_force: float  # mean norm of the latent repulsion force
    pull_force: float  # mean norm of the pull toward w_avg
    noise_force: float  # mean norm of the random force
    total_force: float  # mean norm of the total force
    max_force: float  # largest total-force norm
    dt: float  # time step (mean over identities when adaptive)


@dataclass(frozen=True)
class DispersionResult:
    latents: torch.Tensor  # [n, A, D] the variations' W latents, on w_ref's device and dtype
    reference_embeddings: torch.Tensor  # [n, E] unit embeddings e_i = F(G(w_ref_i))
    history: list[StepStats]  # one entry per step taken
    steps: int  # steps taken (< config.iterations when should_stop ended the run early)
    config: DispersionConfig  # the configuration that produced them


# --- seeded draws -------------------------------------------------------------------------------


def _normals(purpose: str, seed: int, identities: Sequence[int], variations: int, dim: int,
             *step: int, first: int = 0) -> torch.Tensor:
    """Standard normals [n, A, dim] on the CPU (float32), one stream per (identity, variation[, step]);
    column a is variation `first + a`."""
    out = torch.empty(len(identities), variations, dim)  # [n, A, D]
    for i, identity in enumerate(identities):
        for a in range(variations):
            g = make_generator(derive_seed(seed, purpose, int(identity), first + a, *step))
            out[i, a] = g.normal(dim)
    return out


def initial_variations(w_ref: torch.Tensor, identities: Sequence[int], seed: int, variations: int,
                       init_scale: float, offsets: torch.Tensor | None = None,
                       first: int = 0) -> torch.Tensor:
    """w_ia = w_ref_i + init_scale xi_ia (+ offsets_ia): [n, A, D] on w_ref's device and dtype;
    column a is variation `first + a`."""
    d = w_ref.shape[1]
    xi = _normals(DISPERSION_INIT, seed, identities, variations, d, first=first).to(w_ref.device, w_ref.dtype)
    w = w_ref[:, None, :] + init_scale * xi  # [n, A, D]
    if offsets is not None:
        w = w + offsets.to(w_ref.device, w_ref.dtype)
    return w


def step_noise(identities: Sequence[int], seed: int, variations: int, step: int, dim: int,
               first: int = 0) -> torch.Tensor:
    """The unit-variance random force of step `step` (0-based): [n, A, dim] float32 on the CPU."""
    return _normals(DISPERSION_NOISE, seed, identities, variations, dim, step, first=first)


# --- forces -------------------------------------------------------------------------------------


def reference_embeddings(face: Any, w_ref: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """e_i = F(G(w_ref_i)): unit embeddings [n, E] on w_ref's device and dtype, no gradient."""
    if hasattr(face, "embeddings"):  # a LatentFace: batched, in inference mode
        return face.embeddings(w_ref, batch_size).to(w_ref.device, w_ref.dtype)  # [n, E]
    with torch.no_grad():
        parts = [face.embed(w_ref[s:s + batch_size]) for s in range(0, w_ref.shape[0], batch_size)]
    return torch.cat(parts).to(w_ref.device, w_ref.dtype)  # [n, E]


def embedding_forces(face: Any, w: torch.Tensor, e_ref: torch.Tensor, coefficient: float,
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-grad of (k_e / 4) theta(F(G(w_ia)), e_i)^2 and the cosines: ([n, A, D], [n, A]).

    The n x A variations are flattened and rendered `batch_size` at a time; each one's energy
    depends on its own latent only, so a batch's gradient is every member's own gradient.
    """
    n, a, d = w.shape
    flat = w.detach().reshape(n * a, d)  # [n A, D]
    owner = torch.arange(n * a, device=w.device) // a  # [n A] identity row of each variation
    force = torch.empty_like(flat)  # [n A, D]
    cosine = torch.empty(n * a, device=w.device, dtype=w.dtype)  # [n A]
    for s in range(0, n * a, batch_size):
        wb = flat[s:s + batch_size].clone().requires_grad_(True)  # [b, D]
        with torch.enable_grad():
            e = face.embed(wb).to(w.device, w.dtype)  # [b, E]
            cos = (e * e_ref[owner[s:s + batch_size]]).sum(-1)  # [b]
            theta = torch.arccos(ARCCOS_SHRINK * cos)  # [b]
            energy = (coefficient / 4) * theta.square().sum()
            (grad,) = torch.autograd.grad(energy, wb)  # [b, D]
        force[s:s + batch_size] = -grad
        cosine[s:s + batch_size] = cos.detach()
    return force.reshape(n, a, d), cosine.reshape(n, a)


def repulsion_forces(w: torch.Tensor, coefficient: float, radius: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-sphere repulsion among each identity's variations, and their min and mean distances.

    F_ia = k_w sum_{b != a, 0 < d_ab < r} (r - d_ab) (w_ia - w_ib) / d_ab: ([n, A, D], [n], [n]).
    Coincident variations (d = 0) exert no force on each other (no direction), as in the reference.
    """
    n, a = w.shape[:2]
    force = torch.zeros_like(w)  # [n, A, D]
    min_dist = torch.full((n,), float("inf"), device=w.device, dtype=w.dtype)  # [n]
    mean_dist = torch.zeros(n, device=w.device, dtype=w.dtype)  # [n]
    if a < 2:
        return force, min_dist, mean_dist
    off = ~torch.eye(a, dtype=torch.bool, device=w.device)  # [A, A] pairs b != a
    chunk = max(1, PAIR_BUDGET // (a * a))
    for s in range(0, n, chunk):
        x = w[s:s + chunk].detach()  # [c, A, D]
        x = x - x.mean(dim=1, keepdim=True)  # centred: differences unchanged, better conditioned
        dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # [c, A, A]
        near = off & (dist < radius) & (dist > 0)  # [c, A, A]
        coupling = torch.where(near, (radius - dist) / dist.clamp_min(torch.finfo(w.dtype).tiny), 0.0)
        # sum_b c_ab (x_a - x_b) = (sum_b c_ab) x_a - (c x)_a
        force[s:s + chunk] = coefficient * (coupling.sum(-1, keepdim=True) * x - coupling @ x)
        pairs = dist.masked_select(off.expand_as(dist)).reshape(dist.shape[0], -1)  # [c, A (A - 1)]
        min_dist[s:s + chunk] = pairs.amin(dim=1)
        mean_dist[s:s + chunk] = pairs.mean(dim=1)
    return force, min_dist, mean_dist


def forces(face: Any, w: torch.Tensor, e_ref: torch.Tensor, config: DispersionConfig) -> DispersionForces:
    """Every deterministic force on the variations w [n, A, D] of references e_ref [n, E]."""
    embedding, cosine = embedding_forces(face, w, e_ref, config.attraction, config.batch_size)
    repulsion, min_dist, mean_dist = repulsion_forces(w, config.repulsion, config.repulsion_radius)
    w_avg = face.w_avg.to(w.device, w.dtype)  # [D]
    pull = config.latent_pull * (w_avg - w.detach())  # [n, A, D]
    return DispersionForces(embedding, repulsion, pull, cosine, min_dist, mean_dist)


def time_steps(total: torch.Tensor, min_distance: torch.Tensor, config: DispersionConfig) -> torch.Tensor:
    """dt per identity [n]: config.dt, or the adaptive step when it is negative."""
    n = total.shape[0]
    if config.dt > 0:
        return torch.full((n,), config.dt, device=total.device, dtype=total.dtype)
    largest = total.norm(dim=-1).amax(dim=1)  # [n]
    return -config.dt * config.viscosity * min_distance / largest.clamp_min(torch.finfo(total.dtype).tiny)


# --- the run ------------------------------------------------------------------------------------


def _check_inputs(face: Any, w_ref: torch.Tensor, identities: Sequence[int], seed: int, variations: int,
                  config: DispersionConfig, offsets: torch.Tensor | None) -> list[int]:
    if not isinstance(w_ref, torch.Tensor) or w_ref.ndim != 2 or not w_ref.is_floating_point():
        raise ValueError(f"w_ref: expected a float tensor [n, D], got {getattr(w_ref, 'shape', type(w_ref))}")
    if w_ref.shape[1] != face.style_dim:
        raise ValueError(f"w_ref: width {w_ref.shape[1]} does not match the generator's W width {face.style_dim}")
    if not torch.isfinite(w_ref).all():
        raise ValueError("w_ref: contains non-finite values")
    ids = list(identities)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"identities: expected ints, got {ids[:8]}")
    if len(ids) != w_ref.shape[0] or not ids:
        raise ValueError(f"identities: expected {w_ref.shape[0]} (one per w_ref row, at least one), got {len(ids)}")
    if len(set(ids)) != len(ids):
        raise ValueError("identities: contains duplicates (each identity owns its random streams)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")  # noqa: TRY004
    if isinstance(variations, bool) or not isinstance(variations, int) or variations < 1:
        raise ValueError(f"variations: expected an int >= 1, got {variations!r}")
    if not isinstance(config, DispersionConfig):
        raise ValueError(f"config: expected a DispersionConfig, got {type(config).__name__}")  # noqa: TRY004
    if config.dt < 0 and variations < 2 and config.iterations > 0:
        raise ValueError("config.dt: the adaptive time step needs variations >= 2 (it uses their distances)")
    if offsets is not None:
        expected = (w_ref.shape[0], variations, w_ref.shape[1])
        if not isinstance(offsets, torch.Tensor) or tuple(offsets.shape) != expected:
            raise ValueError(f"offsets: expected shape {expected}, got {getattr(offsets, 'shape', type(offsets))}")
        if not torch.isfinite(offsets).all():
            raise ValueError("offsets: contains non-finite values")
    return ids


def disperse(
    face: Any,
    w_ref: torch.Tensor,
    identities: Sequence[int],
    seed: int,
    variations: int,
    config: DispersionConfig = DispersionConfig(),
    offsets: torch.Tensor | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    first_variation: int = 0,
) -> DispersionResult:
    """A = `variations` latents per identity around its reference latent w_ref [n, D].

    face: a `LatentFace` (or anything with `embed`, `w_avg`, `style_dim`). identities: the global
    index of each w_ref row (it addresses the random streams). offsets [n, A, D]: DisCo's initial
    offsets (`covariates.disco_offsets`), added to the initial noise. on_step(stats) runs after
    every step; should_stop() is asked before every step, and True ends the run early.
    first_variation: the index of the first of the A variations (their random streams); quality
    top-ups disperse a further block of A variations that starts past the first block.
    """
    if isinstance(first_variation, bool) or not isinstance(first_variation, int) or first_variation < 0:
        raise ValueError(f"first_variation: expected an int >= 0, got {first_variation!r}")
    ids = _check_inputs(face, w_ref, identities, seed, variations, config, offsets)
    d = w_ref.shape[1]
    e_ref = reference_embeddings(face, w_ref.detach(), config.batch_size)  # [n, E]
    w = initial_variations(w_ref.detach(), ids, seed, variations, config.init_scale, offsets,
                           first_variation)  # [n, A, D]
    history: list[StepStats] = []
    for t in range(config.iterations):
        if should_stop is not None and should_stop():
            break
        f = forces(face, w, e_ref, config)
        noise = config.noise * step_noise(ids, seed, variations, t, d, first_variation).to(w.device, w.dtype)  # [n, A, D]
        total = f.embedding + f.repulsion + f.pull + noise  # [n, A, D]
        dt = time_steps(total, f.min_distance, config)  # [n]
        w = w + (dt / config.viscosity)[:, None, None] * total  # [n, A, D]
        stats = StepStats(
            step=t + 1,
            mean_cosine=float(f.cosine.mean()),
            min_cosine=float(f.cosine.min()),
            mean_spread=float(f.mean_distance.mean()),
            min_spread=float(f.min_distance.min()),
            embedding_force=float(f.embedding.norm(dim=-1).mean()),
            repulsion_force=float(f.repulsion.norm(dim=-1).mean()),
            pull_force=float(f.pull.norm(dim=-1).mean()),
            noise_force=float(noise.norm(dim=-1).mean()),
            total_force=float(total.norm(dim=-1).mean()),
            max_force=float(total.norm(dim=-1).max()),
            dt=float(dt.mean()),
        )
        history.append(stats)
        if on_step is not None:
            on_step(stats)
    return DispersionResult(latents=w, reference_embeddings=e_ref, history=history, steps=len(history),
                            config=config)
