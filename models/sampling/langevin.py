"""The `langevin` identity sampler (Geissbühler, Otroshi Shahreza & Marcel, ICML 2025).

Identities are StyleGAN2 W latents w_i, started at w_avg + psi (mapping(z_i) - w_avg) with z_i drawn
from derive_seed(seed, "identity", i) (the `random` latent sampler's identities). Each step embeds
every identity, e_i = F(crop(G(w_i))) (unit rows; `LatentFace`), and moves the latents by
over-damped Langevin dynamics:
  U_i   = sum_{j != i} (k/2) (r0 - theta_ij)^2 [theta_ij < r0]      (+ the same against references)
  F_i   = -grad_{w_i} U_i  (the others' embeddings held fixed)  +  k_l (w_avg - w_i)
  w_i  += (dt / mu) F_i + (sqrt(dt) / mu) eta xi_i,   xi_i ~ N(0, I) from (seed, identity, step)
  dt    = |tau| mu min_{i != j} |w_i - w_j| / max_i |F_i|   (tau < 0, recomputed every step; else tau)
theta_ij = acos(c · <e_i, e_j>) with c = `cos_scale` slightly below 1, as the reference code has it
(idiap/face_synthetics, `DatabaseGenerator.create_references_langevin` and `Embedding.distance`):
it keeps dtheta/dcos finite for coincident embeddings. Forces and distances are in W units, angles
in radians. The reference repulsion from fixed "constant embeddings" (real faces: leakage
prevention) has its own stiffness and radius. The defaults are the published recipe (the reference
code's README command for its 10k set: 100 iterations, k 1, r0 1.4, k_l 0.1, eta 0.01, tau -0.3,
mu 1, batch 64, ict 1.4), not the reference code's own dataclass defaults (r0 1.7, k_l 0, 10 steps).

The reference code re-renders one identity at a time with gradients. Because the others'
embeddings are detached, U_i depends on w_i only through e_i, so
  grad_{w_i} U_i = J_i^T g_i,   g_i = dU_i/de_i = sum_j a_ij e_j,
  a_ij = k (r0 - theta_ij) c / sqrt(1 - c^2 <e_i, e_j>^2)  [theta_ij < r0]   (a symmetric in i, j).
A step therefore (1) embeds all N latents (batches of `batch_size`), (2) forms g = A E in tiles of
the pairwise matrix on and above its diagonal (each tile serves its rows and, transposed, its
columns), collecting the angle statistics on the way, and (3) back-propagates g_b to w_b batch by
batch (one vector-Jacobian product per batch; weights frozen, constant StyleGAN noise). The first
`keep_graphs` identities (at least one batch) are embedded with gradients in (1) and their graphs
kept for (3); the others are embedded without gradients in (1) and re-rendered with them in (3),
so memory stays bounded. The embedder runs through `LatentFace`'s fused view (folded BatchNorms,
written-out input gradients). The minimum latent distance of the adaptive dt comes from a tiled
pass too; memory is O(N (D + E) + tile^2) beyond the kept graphs, never N x N.

Randomness is stateless: identity i's noise at step t comes from derive_seed(seed, "noise", i, t),
so a run does not depend on batch_size (up to the float rounding of batched kernels), and a
`LangevinState` saved between steps resumes bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from models.sampling.latent_face import LatentFace
from models.sampling.metrics import gram_tiles
from models.sampling.sphere import normalize
from models.seeding import IDENTITY, LANGEVIN_NOISE, derive_seed, make_generator

STATE_FORMAT = "idforge.langevin.state/1"  # `LangevinState.state_dict` meta["format"]


@dataclass(frozen=True)
class LangevinConfig:
    iterations: int = 100  # Langevin steps in all; a run resumed from a state continues up to this count
    stiffness: float = 1.0  # k in the paper: stiffness of the soft-sphere repulsion between identities
    # (energy per rad^2)
    repulsion_radius: float = 1.4  # r0 in the paper: radians of embedding angle; pairs closer than this repel
    latent_pull: float = 0.1  # k_l in the paper: pull toward the mean latent, F_lat = k_l (w_avg - w);
    # 0 = off
    noise: float = 0.01  # eta, the random force's scale: the update adds (sqrt(dt) / mu) eta xi; 0 = off
    tau: float = -0.3  # time step: < 0 adaptive, dt = |tau| mu (min pairwise W distance) / (max norm of
    # the deterministic force), so the fastest identity moves |tau| x the closest pair's distance; > 0 fixed dt
    mu: float = 1.0  # viscous coefficient (mobility 1/mu): forces are divided by it in the update
    truncation: float = 0.7  # psi of the initial latents, w_avg + psi (mapping(z) - w_avg)
    batch_size: int = 64  # identities per forward/backward pass (the reference code's recipe: 64);
    # results do not depend on it beyond the float rounding of batched kernels
    reference_stiffness: float = 1.0  # stiffness of the repulsion from fixed reference embeddings (the
    # reference code reuses k for it)
    reference_repulsion_radius: float = 1.4  # radius of that repulsion, radians; 0 = off (the reference
    # code's `constant_distance` defaults to 0; here it defaults to r0 so that passing references acts)
    threshold: float = 1.4  # angle (radians) of the statistics nn_beyond and pairs_beyond (the
    # reference code's `ict`; its published 10k recipe uses 1.4)
    cos_scale: float = 0.999999  # angles are acos(cos_scale x cosine) in the potential and the
    # statistics, as in the reference code: finite forces for coincident embeddings; adds at most
    # 1.5e-3 rad near 0 and pi, under 1e-6 rad in between; in (0, 1]
    tile: int = 2048  # rows/columns per tile of the pairwise passes: memory ~ 6 tile^2 floats
    keep_graphs: int = 64  # identities (rounded up to whole batches, at least one batch) rendered once
    # per step: their autograd graphs are kept from the embedding pass to the backward pass; the others
    # are rendered twice (without gradients, then with). Memory ~ that many identities' saved
    # activations (~2 MB each with the tiny presets); results do not depend on it


@dataclass(frozen=True)
class LangevinStats:
    step: int  # steps completed, 1-based
    dt: float  # the time step this step used
    angle_min: float  # smallest angle over the N(N-1)/2 pairs, radians, at the latents before the update
    angle_mean: float  # mean pair angle, radians (same basis)
    angle_max: float  # largest pair angle, radians
    nn_angle_mean: float  # mean over identities of the angle to the nearest other identity, radians
    nn_beyond: float  # fraction of identities whose nearest other identity is farther than config.threshold
    pairs_beyond: float  # fraction of pairs farther apart than config.threshold (the reference code's prop_ict)
    energy: float  # total potential: sum over pairs of (k/2)(r0 - theta)^2 [theta < r0] + reference terms
    repulsion_mean: float  # mean over identities of |-grad_w U_i| (references included), W units
    repulsion_max: float  # its largest value
    latent_mean: float  # mean |k_l (w_avg - w_i)|
    latent_max: float  # its largest value
    force_max: float  # largest |F_i| of the deterministic force, the adaptive dt's denominator
    latent_distance_min: float  # smallest |w_i - w_j| over pairs, W units (the adaptive dt's numerator)
    reference_angle_min: float | None  # smallest angle from an identity to a reference, radians; None without

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (floats and ints; None for absent values)."""
        return asdict(self)


@dataclass
class LangevinState:
    """Everything a run needs to continue exactly where it stopped; `step` updates it in place."""

    latents: torch.Tensor  # [N, D] W latents of identities first_identity .. first_identity + N - 1
    step: int = 0  # steps completed; the next step draws its noise with this index
    first_identity: int = 0  # global identity index of row 0 (the noise of row i is identity first_identity + i's)
    dt: float | None = None  # the time step of the last step taken (None before the first)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta): CPU contiguous copies for safetensors, and a JSON-able dict.

        safetensors metadata must be strings: save with `metadata={"langevin": json.dumps(meta)}`.
        """
        tensors = {"latents": self.latents.detach().to("cpu", copy=True).contiguous()}
        meta = {"format": STATE_FORMAT, "step": self.step, "first_identity": self.first_identity, "dt": self.dt}
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> LangevinState:
        """The inverse of `state_dict` (latents copied on the CPU; `step` moves them to the model's device)."""
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"meta: expected format {STATE_FORMAT!r}, got {meta.get('format')!r}")
        if "latents" not in tensors:
            raise ValueError("tensors: missing 'latents'")
        dt = meta.get("dt")
        return cls._checked(tensors["latents"], int(meta["step"]), int(meta["first_identity"]),
                            None if dt is None else float(dt))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """One flat dict of CPU tensors (meta as [1] tensors; dt NaN = None), for safetensors alone."""
        tensors, meta = self.state_dict()
        tensors["step"] = torch.tensor([meta["step"]], dtype=torch.int64)
        tensors["first_identity"] = torch.tensor([meta["first_identity"]], dtype=torch.int64)
        tensors["dt"] = torch.tensor([math.nan if self.dt is None else self.dt], dtype=torch.float64)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> LangevinState:
        """The inverse of `to_tensors`."""
        missing = {"latents", "step", "first_identity", "dt"} - set(tensors)
        if missing:
            raise ValueError(f"tensors: missing {sorted(missing)}")
        dt = float(tensors["dt"].reshape(-1)[0])
        return cls._checked(tensors["latents"], int(tensors["step"].reshape(-1)[0]),
                            int(tensors["first_identity"].reshape(-1)[0]), None if math.isnan(dt) else dt)

    @classmethod
    def _checked(cls, latents: torch.Tensor, step: int, first_identity: int, dt: float | None) -> LangevinState:
        if latents.ndim != 2 or latents.shape[0] < 2:
            raise ValueError(f"latents: expected [N, D] with N >= 2, got shape {tuple(latents.shape)}")
        if step < 0 or first_identity < 0:
            raise ValueError(f"step, first_identity: must be >= 0, got {step}, {first_identity}")
        # A fresh allocation: tensors read from a file may sit at any address, and BLAS results
        # can depend on the alignment of their inputs; a resumed run must repeat the bits.
        latents = latents.detach().clone(memory_format=torch.contiguous_format)
        return cls(latents=latents, step=step, first_identity=first_identity, dt=dt)


@dataclass(frozen=True)
class PairTerms:
    """What one tiled pass over the embeddings gives: each identity's potential gradient and the statistics."""

    grad: torch.Tensor  # [N, E] dU_i/de_i (others fixed), identities and references together
    nn_angles: torch.Tensor  # [N] angle to the nearest other identity, radians
    angle_min: float  # over the N(N-1)/2 pairs, radians
    angle_mean: float
    angle_max: float
    pairs_beyond: float  # fraction of pairs farther apart than the threshold
    energy: float  # sum over pairs (and identity-reference pairs) of the pair potential
    reference_angle_min: float | None  # None without references


@dataclass(frozen=True)
class LangevinForces:
    embeddings: torch.Tensor  # [N, E] unit embeddings of the latents (no gradient)
    repulsion: torch.Tensor  # [N, D] -grad_w U_i, identities and references together
    latent: torch.Tensor  # [N, D] k_l (w_avg - w_i)
    pairs: PairTerms  # the pairwise pass (gradients w.r.t. embeddings, angle statistics)


# --- checks -------------------------------------------------------------------------------------


def check_config(config: LangevinConfig) -> None:
    """ValueError naming the first invalid field of `config`."""
    checks = [
        ("iterations", config.iterations >= 0),
        ("stiffness", config.stiffness >= 0),
        ("repulsion_radius", 0 < config.repulsion_radius <= math.pi),
        ("latent_pull", config.latent_pull >= 0),
        ("noise", config.noise >= 0),
        ("tau", config.tau != 0),
        ("mu", config.mu > 0),
        ("truncation", config.truncation >= 0),
        ("batch_size", config.batch_size >= 1),
        ("reference_stiffness", config.reference_stiffness >= 0),
        ("reference_repulsion_radius", 0 <= config.reference_repulsion_radius <= math.pi),
        ("threshold", 0 <= config.threshold <= math.pi),
        ("cos_scale", 0 < config.cos_scale <= 1),
        ("tile", config.tile >= 1),
        ("keep_graphs", config.keep_graphs >= 0),
    ]
    for name, ok in checks:
        value = getattr(config, name)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"config.{name}: invalid value {value!r}")


def _check_references(references: torch.Tensor | None, dim: int, like: torch.Tensor) -> torch.Tensor | None:
    """References as unit rows on like's device and dtype; ValueError naming `references` otherwise."""
    if references is None:
        return None
    if references.ndim != 2 or references.shape[1] != dim or references.shape[0] < 1:
        raise ValueError(f"references: expected [M, {dim}] with M >= 1, got shape {tuple(references.shape)}")
    if not torch.isfinite(references).all() or bool((references.norm(dim=1) == 0).any()):
        raise ValueError("references: rows must be finite and non-zero")
    return normalize(references.to(like.device, like.dtype))


# --- the pairwise pass --------------------------------------------------------------------------


def _pair_potential(
    cos: torch.Tensor, k: float, r0: float, cos_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(theta, u, a) of a tile of cosines: the angles, the pair potentials and du/dcos."""
    sc = cos.clamp(-1, 1).mul_(cos_scale)  # [ti, tj]
    theta = torch.acos(sc)
    gap = (r0 - theta).clamp_min_(0)  # [ti, tj] 0 outside the radius
    u = gap.square().mul_(0.5 * k)
    slope = torch.rsqrt((1 - sc.square_()).clamp_min_(torch.finfo(cos.dtype).tiny))  # 1/sqrt(1 - c^2 cos^2)
    a = gap.mul_(k * cos_scale).mul_(slope)  # [ti, tj] du/dcos, 0 outside the radius
    return theta, u, a


def pair_terms(
    embeddings: torch.Tensor, config: LangevinConfig, references: torch.Tensor | None = None
) -> PairTerms:
    """Each identity's dU_i/de_i and the angle statistics, in tiles: embeddings [N, E] unit rows."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings: expected [N, E] with N >= 2, got shape {tuple(embeddings.shape)}")
    check_config(config)
    e = embeddings.detach()
    refs = _check_references(references, e.shape[1], e)
    n, tile, dev = e.shape[0], config.tile, e.device
    grad = torch.zeros_like(e)  # [N, E]
    nn = torch.full((n,), math.inf, dtype=e.dtype, device=dev)  # [N] nearest-neighbour angle
    angle_min, angle_max = math.inf, -math.inf
    angle_sum = torch.zeros((), dtype=torch.float64, device=dev)
    energy = torch.zeros((), dtype=torch.float64, device=dev)
    beyond = torch.zeros((), dtype=torch.int64, device=dev)
    for i0, i1, j0, j1 in gram_tiles(n, tile):
        theta, u, a = _pair_potential(e[i0:i1] @ e[j0:j1].T, config.stiffness, config.repulsion_radius,
                                      config.cos_scale)  # [ti, tj]
        if i0 == j0:  # a diagonal tile: no self pairs; pair sums over its upper triangle only
            a.fill_diagonal_(0)
            theta.fill_diagonal_(math.inf)
            upper = torch.ones_like(theta, dtype=torch.bool).triu_(1)  # [ti, tj]
            pairs = theta[upper]
            energy += u[upper].sum(dtype=torch.float64)
            grad[i0:i1] += a @ e[j0:j1]  # symmetric: the rows take every column of the tile
        else:
            pairs = theta.flatten()
            energy += u.sum(dtype=torch.float64)
            grad[i0:i1] += a @ e[j0:j1]
            grad[j0:j1] += a.T @ e[i0:i1]
            nn[j0:j1] = torch.minimum(nn[j0:j1], theta.amin(dim=0))
        nn[i0:i1] = torch.minimum(nn[i0:i1], theta.amin(dim=1))
        if pairs.numel():
            angle_min = min(angle_min, float(pairs.min()))
            angle_max = max(angle_max, float(pairs.max()))
            angle_sum += pairs.sum(dtype=torch.float64)
            beyond += (pairs > config.threshold).sum()
    reference_min = None
    if refs is not None:
        reference_min = math.inf
        for i0 in range(0, n, tile):
            for m0 in range(0, refs.shape[0], tile):
                theta, u, a = _pair_potential(e[i0:i0 + tile] @ refs[m0:m0 + tile].T, config.reference_stiffness,
                                              config.reference_repulsion_radius, config.cos_scale)  # [ti, tm]
                grad[i0:i0 + tile] += a @ refs[m0:m0 + tile]
                energy += u.sum(dtype=torch.float64)
                reference_min = min(reference_min, float(theta.min()))
    n_pairs = n * (n - 1) // 2
    return PairTerms(
        grad=grad, nn_angles=nn, angle_min=angle_min, angle_mean=float(angle_sum) / n_pairs, angle_max=angle_max,
        pairs_beyond=int(beyond) / n_pairs, energy=float(energy), reference_angle_min=reference_min,
    )


def min_latent_distance(latents: torch.Tensor, tile: int = 2048) -> float:
    """min_{i != j} |w_i - w_j| of latents [N, D], tiled: each row's nearest by the Gram expansion,
    then the distance to it recomputed from the difference (accurate for close pairs)."""
    if latents.ndim != 2 or latents.shape[0] < 2:
        raise ValueError(f"latents: expected [N, D] with N >= 2, got shape {tuple(latents.shape)}")
    if tile < 1:
        raise ValueError(f"tile: must be >= 1, got {tile}")
    w = latents.detach()
    n = w.shape[0]
    sq = (w * w).sum(dim=1)  # [N]
    best = torch.full((n,), math.inf, dtype=w.dtype, device=w.device)  # [N] squared distance by Gram
    nearest = torch.zeros(n, dtype=torch.long, device=w.device)  # [N]
    for i0, i1, j0, j1 in gram_tiles(n, tile):
        d2 = (sq[i0:i1, None] + sq[None, j0:j1]).sub_(w[i0:i1] @ w[j0:j1].T, alpha=2)  # [ti, tj]
        if i0 == j0:
            d2.fill_diagonal_(math.inf)
        for dim, lo, hi, off in ((1, i0, i1, j0), (0, j0, j1, i0)):
            if dim == 0 and i0 == j0:
                continue  # a diagonal tile is symmetric: its rows covered its columns
            v, k = d2.min(dim=dim)  # [t]
            better = v < best[lo:hi]
            best[lo:hi] = torch.where(better, v, best[lo:hi])
            nearest[lo:hi] = torch.where(better, k + off, nearest[lo:hi])
    return float((w - w[nearest]).norm(dim=1).min())


# --- forces and steps ---------------------------------------------------------------------------


def _model_device(face: LatentFace) -> torch.device:
    return next(face.generator.parameters()).device


def _latent_dtype(face: LatentFace) -> torch.dtype:
    """float32, or float64 when the generator runs in float64 (exactness checks)."""
    return torch.promote_types(next(face.generator.parameters()).dtype, torch.float32)


def _check_latents(face: LatentFace, latents: torch.Tensor) -> None:
    d = face.style_dim
    if latents.ndim != 2 or latents.shape[0] < 2 or latents.shape[1] != d:
        raise ValueError(f"latents: expected [N, {d}] with N >= 2, got shape {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents: must be finite")


def _embed_with_graph(face: LatentFace, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a leaf copy of w [B, D] that requires grad, its embeddings [B, E] with their graph)."""
    with torch.enable_grad():
        leaf = w.clone().requires_grad_(True)
        return leaf, face.embed(leaf)


def compute_forces(
    face: LatentFace, latents: torch.Tensor, config: LangevinConfig, references: torch.Tensor | None = None
) -> LangevinForces:
    """The deterministic forces on latents [N, D] (on the model's device): repulsion and latent pull."""
    check_config(config)
    _check_latents(face, latents)
    w = latents.detach()
    n, bs = w.shape[0], config.batch_size
    batches = [(lo, min(lo + bs, n)) for lo in range(0, n, bs)]
    kept = max(1, -(-config.keep_graphs // bs))  # the first batches: rendered once, graphs kept for (3)
    graphs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    parts = []
    for k, (lo, hi) in enumerate(batches):
        if k < kept:
            graphs.append(_embed_with_graph(face, w[lo:hi]))
            parts.append(graphs[-1][1].detach())  # [b, E]
        else:
            parts.append(face.embeddings(w[lo:hi], bs))  # [b, E]
    embeddings = torch.cat(parts)  # [N, E]
    pairs = pair_terms(embeddings, config, references)
    repulsion = torch.empty_like(w)  # [N, D]
    for k, (lo, hi) in enumerate(batches):
        if k < kept:
            w_b, e_b = graphs[k]
            graphs[k] = None  # freed once used
        else:
            w_b, e_b = _embed_with_graph(face, w[lo:hi])
        (g,) = torch.autograd.grad(e_b, w_b, grad_outputs=pairs.grad[lo:hi].to(e_b.dtype))
        repulsion[lo:hi] = -g
    latent = (face.w_avg.to(w.device, w.dtype) - w).mul_(config.latent_pull)  # [N, D]
    return LangevinForces(embeddings=embeddings, repulsion=repulsion, latent=latent, pairs=pairs)


def time_step(config: LangevinConfig, latent_distance_min: float, force_max: float) -> float:
    """dt: |tau| mu d_min / F_max when tau < 0 (0 when no force acts: the system is at rest), else tau."""
    if config.tau > 0:
        return config.tau
    if force_max == 0:
        return 0.0
    return -config.tau * config.mu * latent_distance_min / force_max


def langevin_noise(seed: int, identities: range, step: int, dim: int) -> torch.Tensor:
    """xi [len(identities), dim] float32 on the CPU: row i from derive_seed(seed, "noise", identity, step)."""
    rows = [make_generator(derive_seed(seed, LANGEVIN_NOISE, i, step)).normal(dim) for i in identities]
    return torch.stack(rows)  # [N, D]


def init_state(face: LatentFace, n: int, seed: int, config: LangevinConfig = LangevinConfig(),
               first_identity: int = 0) -> LangevinState:
    """Identities first_identity .. + n - 1 at w_avg + psi (mapping(z_i) - w_avg), z_i from
    derive_seed(seed, "identity", i) (the random latent sampler's identities), on the model's device."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n: must be an int >= 2 (identities interact), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    if first_identity < 0:
        raise ValueError(f"first_identity: must be >= 0, got {first_identity}")
    check_config(config)
    seeds = [derive_seed(seed, IDENTITY, i) for i in range(first_identity, first_identity + n)]
    latents = face.initial_latents(seeds, config.truncation).to(_model_device(face), _latent_dtype(face))  # [N, D]
    return LangevinState(latents=latents, step=0, first_identity=first_identity)


def step(face: LatentFace, state: LangevinState, config: LangevinConfig, seed: int,
         references: torch.Tensor | None = None) -> LangevinStats:
    """One Langevin step: updates `state` in place and returns its statistics.

    The statistics describe the latents before the update (the ones the forces were measured at),
    with the dt and forces the update used. references: [M, E] fixed embeddings to repel from
    (normalised here), or None. The noise of identity first_identity + i comes from (seed, identity,
    state.step).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    check_config(config)
    device = _model_device(face)
    if state.latents.device != device:
        state.latents = state.latents.to(device)
    w = state.latents  # [N, D]
    _check_latents(face, w)
    forces = compute_forces(face, w, config, references)
    total = forces.repulsion + forces.latent  # [N, D]
    rep_norm, lat_norm = forces.repulsion.norm(dim=1), forces.latent.norm(dim=1)  # [N], [N]
    force_max = float(total.norm(dim=1).max())
    d_min = min_latent_distance(w, config.tile)
    dt = time_step(config, d_min, force_max)
    new = w + (dt / config.mu) * total  # [N, D]
    if config.noise > 0 and dt > 0:
        xi = langevin_noise(seed, range(state.first_identity, state.first_identity + w.shape[0]), state.step,
                            w.shape[1])  # [N, D]
        new += (math.sqrt(dt) / config.mu * config.noise) * xi.to(device, w.dtype)
    pairs = forces.pairs
    n = w.shape[0]
    stats = LangevinStats(
        step=state.step + 1, dt=dt, angle_min=pairs.angle_min, angle_mean=pairs.angle_mean,
        angle_max=pairs.angle_max, nn_angle_mean=float(pairs.nn_angles.mean()),
        nn_beyond=int((pairs.nn_angles > config.threshold).sum()) / n, pairs_beyond=pairs.pairs_beyond,
        energy=pairs.energy, repulsion_mean=float(rep_norm.mean()), repulsion_max=float(rep_norm.max()),
        latent_mean=float(lat_norm.mean()), latent_max=float(lat_norm.max()), force_max=force_max,
        latent_distance_min=d_min, reference_angle_min=pairs.reference_angle_min,
    )
    state.latents, state.step, state.dt = new, state.step + 1, dt
    return stats


def run(
    face: LatentFace,
    state: LangevinState,
    config: LangevinConfig,
    seed: int,
    references: torch.Tensor | None = None,
    *,
    on_step: Callable[[LangevinStats, LangevinState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> LangevinStats | None:
    """Steps state.step .. config.iterations - 1, in place; returns the last step's stats (None if none ran).

    on_step(stats, state) runs after every step (the state is live: copy it with `state_dict()` to
    checkpoint); its exceptions propagate. should_stop() is asked before every step; True ends the
    run there, leaving a state that resumes exactly.
    """
    check_config(config)
    if state.step > config.iterations:
        raise ValueError(f"state.step: {state.step} is past config.iterations = {config.iterations}")
    last = None
    while state.step < config.iterations:
        if should_stop is not None and should_stop():
            break
        last = step(face, state, config, seed, references)
        if on_step is not None:
            on_step(last, state)
    return last
