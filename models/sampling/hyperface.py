"""The `hyperface` identity sampler (Otroshi Shahreza & Marcel, ICLR 2025): identities as a packing.

N reference embeddings x_i on the unit sphere minimise L = L_sep + alpha R, with
  L_sep = (1/N) sum_i max_{j != i} <x_i, x_j>   (each identity's nearest other identity)
  R     = (1/N) sum_i min_k |x_i - y_k|^2        (each identity's nearest gallery embedding)
starting from gallery embeddings, by Adam with the points re-projected onto the sphere each step.

The max is replaced by a per-row soft-max, T log sum_{j != i} exp(<x_i, x_j> / T), whose temperature
T is annealed geometrically toward the hard max; the learning rate follows a cosine decay. Both
schedules are functions of the step index, so a resumed run reproduces an uninterrupted one.

The N x N Gram is never formed. A full-batch step makes two passes over tiles on and above its
diagonal (each tile serves its rows and, transposed, its columns): pass 1 accumulates each row's
log-sum-exp online (running max and rescaled sum; the running max is the exact hard max), pass 2
recomputes the tile and collects the analytic gradient of N·L_sep,
  g_i = sum_j (p_ij + p_ji) x_j,   p_ij = exp(<x_i, x_j> / T - lse_i),
both the row and the column terms. Memory is O(N·D + tile²); time O(N²·D) with ~2 N²D
multiply-adds, against ~3 N²D and N² floats for autograd through a full Gram.
With `config.neighbours` = k (the default from N >= `sparse_from`), one pass does it: the same
symmetric tiles give the exact log-sum-exp and each row's k largest logits (per-tile top-k merged
into a running [N, k] buffer), and the gradient keeps only those pairs, with p from the exact
normaliser: ~N²D/2 + O(N k D). Tile buffers are allocated once per pass and reused, and Adam runs
in place, so a step's memory beyond the state is a few tile² floats and O(N·D).
`optimize_with_restarts` finds hard codes (the 24-cell, E8) from random starts: rounds of candidates
annealed in parallel (dense batched Grams for small N) from a hot soft-max (T = 1) to a hard-min
polish, each round from perturbations of the best so far (basin hopping), stopping at Rankin's bound
or when a round gains nothing. A quarter of each round's candidates start cold (T = 0.03): the hot
start funnels into the energy minimiser, which for some N (13 and 14 points in 3-d) is not the
max-min code. In pure packing a candidate that meets the bound ends its run and the search there.
Called with its defaults it is the packer's default configuration, the same for every N and D
(docs/packing.md: its quality on known optimal codes and its cost).
The stochastic variant takes a random batch of rows per step against all points (the others
detached): one pass over [B, tile] tiles with an online soft-max that accumulates the gradient as it
goes (flash-attention style), and lazy Adam that touches only the batch's rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch

from models.sampling.embedding_noise import scale_for_mean_cosine
from models.sampling.metrics import gram_tiles, min_angle, nearest_neighbour_angles, rankin_bound
from models.sampling.repulsors import Repulsors, clear, nearest_fixed, push_out
from models.sampling.sphere import EPS, normalize
from models.seeding import Stream

# Floor on exp's argument in the tile-sized passes: exp of a float32 below ~-87.3 underflows to a
# subnormal or zero, which torch's exp computes 10-30x slower (0.45 ms -> 4-13 ms per 230k entries,
# AVX2 and the scalar build alike), and at low temperature most logits are there. On one thread a
# 2,000 x 64 step at T = 0.002 took 208 ms without the floor and 64 ms with it; a job-default run
# (100 steps, T 0.05 -> 0.002, gallery 1,000) 85 -> 47 ms/step. exp(-80) = 2e-35 instead of ~0,
# next to sums >= 1 and O(1) gradients, left that run's points bit-identical (and 100 steps of the
# max separation, the sparse and the stochastic variants).
EXP_FLOOR = -80.0
PRECISIONS = ("float32", "tf32", "bf16")  # config.precision values
SEPARATIONS = ("mean", "max")  # config.separation values


@dataclass(frozen=True)
class HyperFaceConfig:
    iterations: int = 1000  # Adam steps in all; a run resumed from a state continues up to this count
    learning_rate: float = 0.01  # Adam step size at step 0 (about the move of each coordinate per step)
    lr_final: float = 0.01  # learning rate at the last step, as a fraction of learning_rate (cosine
    # decay in between); 1 = constant
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.999  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon; Adam sees N·grad L (O(1) per identity), so it is scale-free
    alpha: float = 0.5  # weight of the gallery regulariser R; 0 = pure packing (gallery may be None)
    temperature: float = 0.05  # soft-max temperature at step 0, in cosine units: a neighbour 3T
    # farther than the nearest weighs e^-3 as much
    temperature_final: float = 0.002  # temperature at the last step (geometric annealing in
    # between); the surrogate is within T·log(N-1) of the hard max
    separation: str = "mean"  # how L_sep aggregates the rows' (soft) maxima: "mean" = the paper's
    # (1/N) sum_i max_j; "max" = their soft-max, the largest cosine of all pairs: a max-min
    # (Tammes) packing, whose optimum is the hard minimum angle (Gaussian-energy-like, finds E8)
    batch_size: int | None = None  # None = full batch; else the stochastic variant: each step this
    # many distinct random rows (drawn from `generator`) move, against all points, others detached
    gallery_refresh: int = 10  # full batch: steps between recomputing each point's nearest gallery
    # point (1 = every step); the stochastic variant recomputes its batch's every step
    precision: str = "float32"  # Gram and gradient matmuls: "float32", "tf32" (CUDA only; CPU runs
    # float32) or "bf16"; the last `polish_iterations` steps always run in float32
    polish_iterations: int = 100  # float32 steps at the end when precision is not "float32"
    tile: int = 2048  # rows/columns per Gram tile: memory ~ 4 tile² floats (64 MiB at 2048)
    neighbours: int | None = 32  # full batch: None = the exact gradient (two tiled passes, ~2 N²D);
    # k = a sparse gradient from one tiled pass (~N²D/2 + O(N k D)): each row keeps its k nearest
    # points and g_i = sum over kept pairs of (p_ij + p_ji) x_j, p from the EXACT normaliser (all
    # pairs). Exact when k >= N - 1; at the annealed low temperatures the dropped weights are
    # negligible (cosine to the exact gradient > 0.99), at high temperature it is an approximation.
    sparse_from: int = 4096  # the sparse gradient runs only when N >= this (and neighbours is set):
    # below it the exact pass is cheap and the sparse one's per-tile top-k and sparse product cost
    # more than they save (N = 2k: about break-even on 2 CPU cores); 0 = always sparse
    # Default None (exact) here; `auto_neighbours(n)` is the recommended choice for large N.
    stats_every: int | None = 10  # exact stats (a full pass over the new points) every this many steps
    # and at the last step; other steps report the values their own pass saw; None = never exact


@dataclass(frozen=True)
class StepStats:
    step: int  # steps completed, 1-based
    loss: float  # L = L_sep (soft-max surrogate at this step's temperature) + alpha R, at the points
    # before this step's update; the stochastic variant averages over its batch
    min_angle: float  # hard minimum pairwise angle, radians: of the updated points when `exact`,
    # else of the points before the update (stochastic: batch rows only, an upper bound)
    mean_nn_angle: float  # mean angle to the nearest other point, radians, same basis as min_angle
    temperature: float  # soft-max temperature used by this step
    exact: bool  # True when the angles come from a full pass over the updated points


@dataclass
class HyperFaceState:
    """Everything a run needs to continue exactly where it stopped. Tensors are on the run's device.

    The state given to `on_step` is live: later steps update its tensors. `to_tensors()` copies.
    """

    step: int  # steps completed
    embeddings: torch.Tensor  # [N, D] float32 unit rows
    exp_avg: torch.Tensor  # [N, D] Adam first moment
    exp_avg_sq: torch.Tensor  # [N, D] Adam second moment
    row_steps: torch.Tensor  # [N] int64 Adam steps taken by each row (all == step in full batch)
    nearest: torch.Tensor  # [N] int64 nearest gallery index at the last refresh (-1 = not yet)
    rng_state: torch.Tensor | None = None  # uint8 generator state (stochastic variant)
    fixed_nearest: torch.Tensor | None = None  # [N, k] int64 each point's nearest fixed repulsors at
    # the last refresh (a run with `repulsors`)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """CPU, contiguous copies keyed by field, for safetensors (the step is a [1] int64 tensor)."""
        out = {
            "step": torch.tensor([self.step], dtype=torch.int64),
            "embeddings": self.embeddings,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
            "row_steps": self.row_steps,
            "nearest": self.nearest,
        }
        if self.rng_state is not None:
            out["rng_state"] = self.rng_state
        if self.fixed_nearest is not None:
            out["fixed_nearest"] = self.fixed_nearest
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> HyperFaceState:
        """The inverse of `to_tensors`."""
        missing = {"step", "embeddings", "exp_avg", "exp_avg_sq", "row_steps", "nearest"} - set(tensors)
        if missing:
            raise ValueError(f"tensors: missing {sorted(missing)}")
        rng, fixed = tensors.get("rng_state"), tensors.get("fixed_nearest")
        return cls(
            step=int(tensors["step"].reshape(-1)[0]),
            embeddings=tensors["embeddings"],
            exp_avg=tensors["exp_avg"],
            exp_avg_sq=tensors["exp_avg_sq"],
            row_steps=tensors["row_steps"].long(),
            nearest=tensors["nearest"].long(),
            rng_state=None if rng is None else rng.to(torch.uint8),
            fixed_nearest=None if fixed is None else fixed.long(),
        )


@dataclass(frozen=True)
class HyperFaceResult:
    embeddings: torch.Tensor  # [N, D] float32 unit rows: the identities
    history: list[StepStats]  # one entry per step taken by this call
    state: HyperFaceState  # the final state (resumable; step == config.iterations)
    config: HyperFaceConfig  # the configuration that produced them


# --- schedules ----------------------------------------------------------------------------------


def learning_rate_at(config: HyperFaceConfig, t: int) -> float:
    """Learning rate of step t (0-based): cosine decay from learning_rate to lr_final x learning_rate."""
    frac = t / max(config.iterations - 1, 1)
    return config.learning_rate * (config.lr_final + (1 - config.lr_final) * 0.5 * (1 + math.cos(math.pi * frac)))


def temperature_at(config: HyperFaceConfig, t: int) -> float:
    """Soft-max temperature of step t (0-based): geometric from temperature to temperature_final."""
    frac = t / max(config.iterations - 1, 1)
    return config.temperature * (config.temperature_final / config.temperature) ** frac


# --- tiled passes -------------------------------------------------------------------------------


def _online_lse(m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, dim: int, scratch: torch.Tensor) -> None:
    """Fold tile `a` (logits, already / T) into running max m and rescaled sum s along `dim`.

    scratch: a buffer of a's size, overwritten (no tile-sized allocation per call).
    """
    new = torch.maximum(m, a.amax(dim=dim))
    s.mul_(torch.exp(m - new).nan_to_num_(0.0))  # -inf - -inf: a row with nothing seen yet
    torch.sub(a, new.unsqueeze(dim), out=scratch)
    s.add_(scratch.clamp_min_(EXP_FLOOR).exp_().sum(dim=dim))  # tile >= 2: every row has seen a finite logit
    m.copy_(new)


def _row_shift(lse: torch.Tensor, separation: str) -> torch.Tensor:
    """lse_i - log(N w_i), w the rows' weights in L_sep: uniform ("mean") or soft-max of lse ("max").

    lse: [N], or [K, N] for K independent packings (the last dimension is the rows).
    """
    if separation == "mean":
        return lse
    return lse - torch.log_softmax(lse, dim=-1) - math.log(lse.shape[-1])


def separation_loss(soft: torch.Tensor, temperature: float, separation: str) -> float:
    """L_sep from the rows' soft-maxes [N]: their mean, or their soft-max (the largest cosine overall)."""
    if separation == "mean":
        return float(soft.mean())
    return float(temperature * torch.logsumexp(soft.double() / temperature, dim=0))


class _TileBuffers:
    """Reused tile-sized buffers: views of flat storage, so edge tiles need no new allocation."""

    def __init__(self, tile: int, device: torch.device, count: int, floor: int = 0) -> None:
        self.flat = [torch.empty(max(tile * tile, floor), device=device) for _ in range(count)]

    def get(self, k: int, rows: int, cols: int) -> torch.Tensor:
        return self.flat[k][: rows * cols].view(rows, cols)


def _logits(xm: torch.Tensor, i0: int, i1: int, j0: int, j1: int, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """Tile of <xi, xj> / T into `out` (float32), the diagonal -inf on a diagonal tile."""
    if xm.dtype == torch.float32:
        torch.matmul(xm[i0:i1], xm[j0:j1].T, out=out)
    else:
        out.copy_(xm[i0:i1] @ xm[j0:j1].T)
    out.mul_(inv_t)
    if i0 == j0:
        out.fill_diagonal_(-math.inf)
    return out


def _full_pass(
    x: torch.Tensor, xm: torch.Tensor, temperature: float, tile: int, separation: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g [N, D] = grad of N·L_sep, per-row soft-max [N], per-row hard max cosine [N]).

    x: [N, D] float32 unit rows; xm: x in the matmul dtype.
    """
    n = x.shape[0]
    inv_t = 1.0 / temperature
    buf = _TileBuffers(min(tile, n), x.device, 2)
    m = torch.full((n,), -math.inf, device=x.device)  # [N] running max of <xi, xj> / T
    s = torch.zeros(n, device=x.device)  # [N] sum of exp(<xi, xj> / T - m)
    for i0, i1, j0, j1 in gram_tiles(n, tile):  # pass 1: row log-sum-exp
        a = _logits(xm, i0, i1, j0, j1, inv_t, buf.get(0, i1 - i0, j1 - j0))  # [ti, tj]
        scratch = buf.get(1, i1 - i0, j1 - j0)
        _online_lse(m[i0:i1], s[i0:i1], a, 1, scratch)
        if i0 != j0:
            _online_lse(m[j0:j1], s[j0:j1], a, 0, scratch)
    lse = m + torch.log(s)  # [N]
    shift = _row_shift(lse, separation)  # [N]
    g = torch.zeros_like(x)  # [N, D]
    for i0, i1, j0, j1 in gram_tiles(n, tile):  # pass 2: g_i = sum_j (p_ij + p_ji) x_j
        a = _logits(xm, i0, i1, j0, j1, inv_t, buf.get(0, i1 - i0, j1 - j0))  # [ti, tj]
        q = torch.sub(a, shift[i0:i1, None], out=buf.get(1, i1 - i0, j1 - j0))  # [ti, tj]
        q.clamp_min_(EXP_FLOOR).exp_()  # N w_i p_ij
        q.add_(a.sub_(shift[None, j0:j1]).clamp_min_(EXP_FLOOR).exp_())  # + N w_j p_ji
        qm = q.to(xm.dtype)
        g[i0:i1] += (qm @ xm[j0:j1]).float()
        if i0 != j0:
            g[j0:j1] += (qm.T @ xm[i0:i1]).float()
    return g, lse * temperature, m * temperature


def _merge_topk(
    vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of a running [R, k] buffer and a tile's candidates [R, c]."""
    v = torch.cat([vals, new_vals], dim=1)
    i = torch.cat([idx, new_idx], dim=1)
    top, where = v.topk(vals.shape[1], dim=1)
    return top, i.gather(1, where)


def _neighbour_pass(
    x: torch.Tensor, xm: torch.Tensor, temperature: float, tile: int, separation: str, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse variant of `_full_pass` (same returns): one tiled pass for the exact row log-sum-exp
    that also keeps each row's k largest logits; the gradient uses only those pairs:
      g = (P + Pᵀ) x,   P_ij = exp(<xi, xj> / T - shift_i) for j among row i's k nearest, else 0.
    """
    n = x.shape[0]
    k = min(k, n - 1)
    inv_t = 1.0 / temperature
    buf = _TileBuffers(min(tile, n), x.device, 2, k * x.shape[1])  # also holds >= one row's [k, D]
    m = torch.full((n,), -math.inf, device=x.device)  # [N]
    s = torch.zeros(n, device=x.device)  # [N]
    top = torch.full((n, k), -math.inf, device=x.device)  # [N, k] largest logits seen per row
    nbr = torch.zeros(n, k, dtype=torch.long, device=x.device)  # [N, k] their columns
    for i0, i1, j0, j1 in gram_tiles(n, tile):
        a = _logits(xm, i0, i1, j0, j1, inv_t, buf.get(0, i1 - i0, j1 - j0))  # [ti, tj]
        scratch = buf.get(1, i1 - i0, j1 - j0)
        _online_lse(m[i0:i1], s[i0:i1], a, 1, scratch)
        v, c = a.topk(min(k, j1 - j0), dim=1)  # [ti, c]
        top[i0:i1], nbr[i0:i1] = _merge_topk(top[i0:i1], nbr[i0:i1], v, c + j0)
        if i0 != j0:
            _online_lse(m[j0:j1], s[j0:j1], a, 0, scratch)
            v, c = a.topk(min(k, i1 - i0), dim=0)  # [c, tj]
            top[j0:j1], nbr[j0:j1] = _merge_topk(top[j0:j1], nbr[j0:j1], v.T, c.T + i0)
    lse = m + torch.log(s)  # [N]
    shift = _row_shift(lse, separation)  # [N]
    p = top.sub_(shift[:, None]).exp_()  # [N, k] N w_i p_ij of the kept pairs
    g = torch.zeros_like(x)  # [N, D]
    d = x.shape[1]
    chunk = max(1, buf.flat[0].numel() // (k * d))  # rows whose [rows, k, D] fits a tile buffer
    for r0 in range(0, n, chunk):  # g = P x + Pᵀ x in row chunks, inside the tile buffers
        r1 = min(r0 + chunk, n)
        idx = nbr[r0:r1].flatten()  # [c k]
        near = torch.index_select(x, 0, idx, out=buf.flat[0][: idx.numel() * d].view(-1, d)).view(r1 - r0, k, d)
        g[r0:r1] += torch.bmm(p[r0:r1, None, :], near).squeeze(1)  # row terms: sum_j P_ij x_j
        terms = torch.mul(p[r0:r1, :, None], x[r0:r1, None, :], out=buf.flat[1][: idx.numel() * d].view(r1 - r0, k, d))
        g.index_add_(0, idx, terms.view(-1, d))  # column terms: P_ij x_i into row j
    return g, lse * temperature, m * temperature


def _batch_pass(
    x: torch.Tensor, xm: torch.Tensor, rows: torch.Tensor, temperature: float, tile: int, separation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stochastic variant: (g [B, D] = grad of the batch rows' soft-max, soft-max [B], hard max [B]).

    One pass with an online soft-max whose gradient accumulator is rescaled with the running max.
    """
    n, b = x.shape[0], rows.shape[0]
    inv_t = 1.0 / temperature
    q = xm[rows]  # [B, D]
    m = torch.full((b,), -math.inf, device=x.device)  # [B]
    s = torch.zeros(b, device=x.device)  # [B]
    acc = torch.zeros(b, x.shape[1], device=x.device)  # [B, D] sum_j exp(a_ij - m_i) x_j
    arange = torch.arange(b, device=x.device)
    for j0 in range(0, n, tile):
        j1 = min(j0 + tile, n)
        a = (q @ xm[j0:j1].T).float().mul_(inv_t)  # [B, tj]
        own = (rows >= j0) & (rows < j1)
        a[arange[own], rows[own] - j0] = -math.inf  # a point is not its own neighbour
        new = torch.maximum(m, a.amax(dim=1))
        scale = torch.exp(m - new).nan_to_num_(0.0)  # [B]
        p = a.sub_(new[:, None]).clamp_min_(EXP_FLOOR).exp_()  # [B, tj]
        s.mul_(scale).add_(p.sum(dim=1))
        acc.mul_(scale[:, None]).add_((p.to(xm.dtype) @ xm[j0:j1]).float())
        m = new
    lse = m + torch.log(s)  # [B]
    weight = torch.exp(lse - _row_shift(lse, separation))[:, None]  # [B, 1] B w_b (1 for "mean")
    return acc * (weight / s[:, None]), lse * temperature, m * temperature


def nearest_gallery(x: torch.Tensor, gallery: torch.Tensor, tile: int) -> torch.Tensor:
    """Index of each row's nearest gallery point in Euclidean distance, tiled: [N] int64."""
    g_sq = (gallery * gallery).sum(dim=1)  # [M]
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i0 in range(0, x.shape[0], tile):
        best = torch.full((min(i0 + tile, x.shape[0]) - i0,), math.inf, device=x.device)
        for k0 in range(0, gallery.shape[0], tile):
            d = g_sq[None, k0 : k0 + tile] - 2 * (x[i0 : i0 + tile] @ gallery[k0 : k0 + tile].T)  # [ti, tk]
            v, k = d.min(dim=1)
            better = v < best
            best = torch.where(better, v, best)
            out[i0 : i0 + tile] = torch.where(better, k + k0, out[i0 : i0 + tile])
    return out


@contextmanager
def _matmul_precision(precision: str, device: torch.device) -> Iterator[torch.dtype]:
    """The matmul dtype for `precision`; enables TF32 on CUDA for the block and restores the flag."""
    if precision == "bf16":
        yield torch.bfloat16
        return
    if precision == "tf32" and device.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield torch.float32
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        return
    yield torch.float32


# --- the optimiser ------------------------------------------------------------------------------


def _check_config(config: HyperFaceConfig, n: int) -> None:
    checks = [
        ("iterations", config.iterations >= 0),
        ("learning_rate", config.learning_rate > 0),
        ("lr_final", 0 <= config.lr_final <= 1),
        ("beta1", 0 <= config.beta1 < 1),
        ("beta2", 0 <= config.beta2 < 1),
        ("eps", config.eps > 0),
        ("alpha", config.alpha >= 0),
        ("temperature", config.temperature > 0),
        ("temperature_final", config.temperature_final > 0),
        ("separation", config.separation in SEPARATIONS),
        ("batch_size", config.batch_size is None or 1 <= config.batch_size <= n),
        ("gallery_refresh", config.gallery_refresh >= 1),
        ("precision", config.precision in PRECISIONS),
        ("polish_iterations", config.polish_iterations >= 0),
        ("tile", config.tile >= 2),
        ("neighbours", config.neighbours is None or config.neighbours >= 1),
        ("sparse_from", config.sparse_from >= 0),
        ("stats_every", config.stats_every is None or config.stats_every >= 1),
    ]
    for name, ok in checks:
        if not ok:
            raise ValueError(f"config.{name}: invalid value {getattr(config, name)!r} (N = {n})")


def _check_gallery(gallery: torch.Tensor | None, init: torch.Tensor, config: HyperFaceConfig) -> torch.Tensor | None:
    """The gallery [M, D] as float32 on init's device, checked against init [N, D] and config.alpha."""
    d = init.shape[1]
    if gallery is not None:
        if gallery.ndim != 2 or gallery.shape[1] != d or gallery.shape[0] < 1:
            raise ValueError(f"gallery: expected [M, {d}] with M >= 1, got shape {tuple(gallery.shape)}")
        if not torch.isfinite(gallery).all():
            raise ValueError("gallery: must be finite")
        gallery = gallery.to(init.device, torch.float32)
    if config.alpha > 0 and gallery is None:
        raise ValueError(f"gallery: required when config.alpha > 0 (alpha = {config.alpha})")
    return gallery


def _initial_state(init: torch.Tensor, generator: Stream | None) -> HyperFaceState:
    x = normalize(init.float())
    n = x.shape[0]
    return HyperFaceState(
        step=0,
        embeddings=x,
        exp_avg=torch.zeros_like(x),
        exp_avg_sq=torch.zeros_like(x),
        row_steps=torch.zeros(n, dtype=torch.long, device=x.device),
        nearest=torch.full((n,), -1, dtype=torch.long, device=x.device),
        rng_state=None if generator is None else generator.get_state(),
    )


def _adopt(state: HyperFaceState, init: torch.Tensor) -> HyperFaceState:
    """The saved state on init's device, checked against init's shape."""
    shape = tuple(init.shape)
    for name in ("embeddings", "exp_avg", "exp_avg_sq"):
        if tuple(getattr(state, name).shape) != shape:
            raise ValueError(f"state.{name}: expected shape {shape}, got {tuple(getattr(state, name).shape)}")
    for name in ("row_steps", "nearest"):
        if tuple(getattr(state, name).shape) != shape[:1]:
            raise ValueError(f"state.{name}: expected shape {shape[:1]}, got {tuple(getattr(state, name).shape)}")
    if state.step < 0:
        raise ValueError(f"state.step: must be >= 0, got {state.step}")
    dev = init.device
    return HyperFaceState(
        step=state.step,
        embeddings=state.embeddings.to(dev, torch.float32, copy=True),
        exp_avg=state.exp_avg.to(dev, torch.float32, copy=True),
        exp_avg_sq=state.exp_avg_sq.to(dev, torch.float32, copy=True),
        row_steps=state.row_steps.to(dev, torch.long, copy=True),
        nearest=state.nearest.to(dev, torch.long, copy=True),
        rng_state=state.rng_state,
        fixed_nearest=None if state.fixed_nearest is None else state.fixed_nearest.to(dev, torch.long, copy=True),
    )


def optimize(
    init: torch.Tensor,
    gallery: torch.Tensor | None,
    config: HyperFaceConfig = HyperFaceConfig(),
    *,
    generator: Stream | None = None,
    on_step: Callable[[StepStats, HyperFaceState], None] | None = None,
    state: HyperFaceState | None = None,
    repulsors: Repulsors | None = None,
) -> HyperFaceResult:
    """Place N identities: run Adam steps state.step .. config.iterations - 1 on L = L_sep + alpha R.

    init: [N, D] starting points (projected onto the sphere; usually `init_from_gallery`), which also
    fixes the device; gallery: [M, D] embeddings of generated faces, or None when alpha = 0.
    generator: draws the stochastic variant's batches (required when batch_size is set; a resumed
    state overwrites its state with the saved one). on_step(stats, state) runs after every step;
    its exceptions propagate (that is how a caller cancels). state: resume from a saved state
    (`HyperFaceState.from_tensors`); the run then continues exactly as an uninterrupted one.
    repulsors: fixed points (excluded identities) every point is kept `min_angle` from: projected out
    of their caps after each step and checked against all of them at the end (`models.sampling.repulsors`).
    """
    if init.ndim != 2 or init.shape[0] < 2 or init.shape[1] < 2:
        raise ValueError(f"init: expected [N, D] with N >= 2 and D >= 2, got shape {tuple(init.shape)}")
    if not torch.isfinite(init).all() or bool((init.norm(dim=1) == 0).any()):
        raise ValueError("init: rows must be finite and non-zero")
    n = init.shape[0]
    _check_config(config, n)
    gallery = _check_gallery(gallery, init, config)
    stochastic = config.batch_size is not None
    if stochastic and generator is None:
        raise ValueError("generator: required when config.batch_size is set (it draws the batches)")
    state = _initial_state(init, generator if stochastic else None) if state is None else _adopt(state, init)
    if stochastic and state.rng_state is not None:
        generator.set_state(state.rng_state)  # type: ignore[union-attr]
    if state.step > config.iterations:
        raise ValueError(f"state.step: {state.step} is past config.iterations = {config.iterations}")

    x, m1, m2 = state.embeddings, state.exp_avg, state.exp_avg_sq
    row_steps, nearest, fixed_nearest = state.row_steps, state.nearest, state.fixed_nearest
    rep = None if repulsors is None else _check_repulsors(repulsors, init)
    history: list[StepStats] = []
    b1, b2 = config.beta1, config.beta2
    for t in range(state.step, config.iterations):
        temperature, lr = temperature_at(config, t), learning_rate_at(config, t)
        polish = t >= config.iterations - config.polish_iterations
        with _matmul_precision("float32" if polish else config.precision, x.device) as mm_dtype:
            xm = x if mm_dtype == torch.float32 else x.to(mm_dtype)
            if stochastic:
                rows = generator.permutation(n)[: config.batch_size]  # type: ignore[union-attr]
                rows = rows.to(x.device)  # [B]
                g, soft, hard = _batch_pass(x, xm, rows, temperature, config.tile, config.separation)  # [B, D], [B], [B]
                xr = x[rows]  # [B, D]
            else:
                rows = None
                if config.neighbours is None or n < config.sparse_from:
                    g, soft, hard = _full_pass(x, xm, temperature, config.tile, config.separation)  # [N, D], [N], [N]
                else:
                    g, soft, hard = _neighbour_pass(x, xm, temperature, config.tile, config.separation, config.neighbours)
                xr = x
        loss = separation_loss(soft, temperature, config.separation)
        if config.alpha > 0:
            assert gallery is not None
            if stochastic:
                nearest[rows] = nearest_gallery(xr, gallery, config.tile)
                target = gallery[nearest[rows]]  # [B, D]
            else:
                if t % config.gallery_refresh == 0 or bool((nearest < 0).any()):
                    nearest = nearest_gallery(x, gallery, config.tile)
                target = gallery[nearest]  # [N, D]
            diff = xr - target  # [B or N, D]
            loss += config.alpha * float((diff * diff).sum(dim=1).mean())
            g.add_(diff, alpha=2 * config.alpha)
            del diff
        g.sub_((g * xr).sum(dim=1, keepdim=True) * xr)  # tangent to the sphere at each point
        if stochastic:  # lazy Adam: only the batch's rows and their own step counts move
            k = row_steps[rows] + 1  # [B]
            mb = b1 * m1[rows] + (1 - b1) * g
            vb = b2 * m2[rows] + (1 - b2) * g * g
            c1 = (1 - b1 ** k.double()).float()[:, None]
            c2 = (1 - b2 ** k.double()).float()[:, None]
            xb = normalize(xr - lr * (mb / c1) / ((vb / c2).sqrt() + config.eps))
            m1[rows], m2[rows], row_steps[rows], x[rows] = mb, vb, k, xb
        else:
            k = t + 1  # in place: the [N, D] temporaries are what bounds memory besides the tiles
            m1.mul_(b1).add_(g, alpha=1 - b1)
            m2.mul_(b2).addcmul_(g, g, value=1 - b2)
            update = torch.div(m2, 1 - b2**k, out=g).sqrt_().add_(config.eps)  # g is spent: reuse it
            update = torch.div(m1, 1 - b1**k).div_(update).mul_(-lr).add_(x)
            del g
            x = update.div_(update.norm(dim=1, keepdim=True).clamp_min(EPS))  # normalize(x - lr·step)
            row_steps = torch.full_like(row_steps, k)
        if rep is not None:
            if fixed_nearest is None or t % rep.refresh == 0:
                fixed_nearest = nearest_fixed(x, rep.points, rep.neighbours, config.tile)
            push_out(x, rep, fixed_nearest)
        exact = config.stats_every is not None and ((t + 1) % config.stats_every == 0 or t + 1 == config.iterations)
        if exact:
            nn = nearest_neighbour_angles(x, config.tile)  # [N]
            angle_min, angle_mean = float(nn.min()), float(nn.mean())
        else:
            angles = torch.acos(hard.clamp(-1, 1))
            angle_min, angle_mean = float(angles.min()), float(angles.mean())
        stats = StepStats(t + 1, loss, angle_min, angle_mean, temperature, exact)
        history.append(stats)
        state = HyperFaceState(
            t + 1, x, m1, m2, row_steps, nearest, generator.get_state() if stochastic else None,  # type: ignore[union-attr]
            fixed_nearest,
        )
        if on_step is not None:
            on_step(stats, state)
    if rep is not None:
        x = clear(x.clone(), rep, tile=config.tile)
    return HyperFaceResult(embeddings=x, history=history, state=state, config=config)


def _check_repulsors(repulsors: Repulsors, init: torch.Tensor) -> Repulsors:
    """The repulsors on init's device, their dimension checked against init [N, D]."""
    if repulsors.points.shape[1] != init.shape[1]:
        raise ValueError(f"repulsors.points: expected [M, {init.shape[1]}], got {tuple(repulsors.points.shape)}")
    if not torch.isfinite(repulsors.points).all():
        raise ValueError("repulsors.points: must be finite")
    return repulsors.on(init.device)


# --- packing: candidates annealed in parallel, basin hopping -------------------------------------

# The schedule each candidate of `optimize_with_restarts` is annealed with (pure packing toward the
# max-min code). It starts hot, T = 1, where the surrogate is a smooth Gaussian energy whose
# minimiser is the symmetric code, and cools slowly (geometrically, ~530 steps per decade) to 1e-3,
# so a run tracks the energy minimum while it sharpens into the max-min problem. Cooling fast or
# starting cold freezes into local optima. Share of random starts that reach the optimum, T 0.1 ->
# 1e-3 in 800 steps (lr 0.03) vs this schedule: 24 points in 4-d, the 24-cell, 2-3% vs 25-40% (of
# 128; the rest stall at 58.84°); 240 points in 8-d, E8, 1 of 16 vs 10-12 of 16.
PACKING = HyperFaceConfig(
    iterations=1600, learning_rate=0.05, lr_final=0.01, alpha=0.0, temperature=1.0, temperature_final=1e-3,
    separation="max", neighbours=None, stats_every=None,
)
# The hard-min polish that follows: T 1e-3 -> 1e-6 (the surrogate within ~T log N² ~ 1e-5 of the
# hard max cosine) in steps that stay near the temperature (1e-4 -> 1e-6); steps much larger than T
# rattle a packing with many contacts (E8 at 3e-4: 59.93° instead of 60°). Only its schedule is
# used (iterations, learning rates, temperatures); the objective is the run's.
PACKING_REFINE = HyperFaceConfig(
    iterations=400, learning_rate=1e-4, lr_final=0.01, alpha=0.0, temperature=1e-3, temperature_final=1e-6,
    separation="max", neighbours=None, stats_every=None,
)
# Cold lanes: the hot start funnels every candidate into the energy minimiser, which is not always
# the max-min code. In 3-d, 13 and 14 points: all 16 hot starts end at 56.58° and 54.74° (the optima
# are 57.14° and 55.67°), while starts cooled from T = 0.03 (same steps and learning rate) reach
# 55.67° in 16 of 16 and 57.14° in 1-5 of 16. On the lattice codes it is the other way round (24-cell:
# 1 of 16 cold, 2-5 hot). So a quarter of each round's lanes start cold, the rest hot.
COLD_SHARE = 0.25  # share of a round's lanes (rounded down; lane 0 of round 0, `init`, is always hot)
COLD_TEMPERATURE = 0.03  # the cold lanes' starting temperature, cooled to config.temperature_final
LANE_ENTRIES = 360_000  # candidates annealed together: lanes x N x max(N, M) Gram entries at most
# (6 lanes of 240 points: E8 comes from 2-4 of every 4 random starts, so 6 a round all miss ~0.2%);
# up to this size a dense step is small ops, run on one thread (`_one_thread`)
DENSE_ENTRIES = 1 << 22  # one candidate's N x max(N, M) up to which it runs dense (~3 such float
# buffers, 48 MiB) rather than through the tiled `optimize`: one Gram and one product a step instead
# of two Grams and a product. 1,024 points in 512-d, one AVX2 core: 45 ms a step instead of 56 ms
WIDE = 64  # dense pass: from this D on, the gradient is (E + Eᵀ) x in one product (513 x 512: 3.4
# ms instead of 7.9 ms; for E8, D = 8, the two-product layout is faster: 0.38 ms against 0.67 ms)
MAX_LANES = 16  # candidates per round by default (fewer when N x max(N, M) is large)
BOUND_SLACK = 1e-5  # radians: a packing this close to Rankin's bound is taken to meet it (no better one)
COS_MARGIN = 1e-5  # in-run stop: the cheap float32 test (largest cosine or its acos) may miss by this
# much before the exact angle (`metrics.min_angle`) decides


@dataclass(frozen=True)
class PackingResult:
    embeddings: torch.Tensor  # [N, D] float32 unit rows: the best packing found
    min_angle: float  # its hard minimum pairwise angle, radians
    rounds: list[list[float]]  # per round, each candidate's hard minimum angle (radians), refined; a
    # round that meets the stopping angle ends there, so it may list fewer than `lanes` candidates
    stopped: str  # "bound" (reached Rankin's bound), "target", "patience" or "rounds"


def _dense_pass(x: torch.Tensor, inv_t: torch.Tensor, separation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`_full_pass` for K independent packings at once, each at its own temperature (inv_t [K, 1, 1]
    = 1 / T): (g [K, N, D] = the gradients of N·L_sep, m [K, N] = each row's largest cosine / T).

    Through each packing's full Gram [N, N], one exp per entry: q_ij = exp(a_ij - m_i) exp(m_i - shift_i).
    """
    a = torch.bmm(x, x.transpose(1, 2)).mul_(inv_t)  # [K, N, N] logits
    a.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    m = a.amax(dim=2)  # [K, N] hard max / T
    e = a.sub_(m[:, :, None]).clamp_min_(EXP_FLOOR).exp_()  # [K, N, N]
    s = e.sum(dim=2)  # [K, N]
    shift = _row_shift(m + torch.log(s), separation)  # [K, N]
    e.mul_(torch.exp(m - shift)[:, :, None])  # N w_i p_ij
    if x.shape[2] >= WIDE:  # row terms E x plus column terms Eᵀ x as one product, (E + Eᵀ) x
        return torch.bmm(e + e.transpose(1, 2), x), m
    # with D small, as xᵀ Eᵀ + xᵀ E: this layout is ~4x faster than E x + Eᵀ x
    xt = x.transpose(1, 2)  # [K, D, N]
    g = torch.bmm(xt, e.transpose(1, 2)).add_(torch.bmm(xt, e)).transpose(1, 2).contiguous()
    return g, m


def _anneal(
    x: torch.Tensor,
    gallery: torch.Tensor | None,
    config: HyperFaceConfig,
    temperatures: list[float] | None = None,
    stop: float | None = None,
    tile: int = 2048,
    repulsors: Repulsors | None = None,
) -> tuple[torch.Tensor, bool]:
    """Full-batch `optimize` (same loss, Adam, schedules and projection, exact gradient, float32) on
    K independent packings at once: [K, N, D] unit rows -> ([K, N, D], stopped). Memory ~3 K N max(N, M)
    floats.

    temperatures: each packing's starting temperature (None: config.temperature for all), cooled
    geometrically to config.temperature_final like `temperature_at`. stop: a minimum angle (radians);
    when one packing's points reach it the run ends before the step that would move them and returns
    them with stopped = True (exact check, `metrics.min_angle`); else the points after the last step.
    repulsors: as `optimize`'s, applied to every packing's points after each step.
    """
    lanes = x.shape[0]
    starts = [config.temperature] * lanes if temperatures is None else temperatures
    if len(starts) != lanes:
        raise ValueError(f"temperatures: expected {lanes}, got {len(starts)}")
    x = x.clone()
    m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
    b1, b2 = config.beta1, config.beta2
    target = x
    frac = torch.arange(config.iterations, dtype=torch.float64)[:, None] / max(config.iterations - 1, 1)
    t0 = torch.tensor(starts, dtype=torch.float64)  # [K]
    temperature = (t0 * (config.temperature_final / t0) ** frac)[:, :, None, None]  # [iterations, K, 1, 1]
    inv_t, temperature = (1 / temperature).float().to(x.device), temperature.float().to(x.device)
    fixed_nearest = None
    for t in range(config.iterations):
        lr = learning_rate_at(config, t)
        g, m = _dense_pass(x, inv_t[t], config.separation)  # [K, N, D], [K, N]
        if stop is not None:
            worst = m.amax(dim=1).mul_(temperature[t, :, 0, 0])  # [K] each packing's largest cosine
            k = int(worst.argmin())
            if float(worst[k]) <= math.cos(stop) + COS_MARGIN and min_angle(x[k], tile) >= stop:
                return x, True
        if config.alpha > 0:
            assert gallery is not None
            if t % config.gallery_refresh == 0:
                d2 = (gallery * gallery).sum(dim=1) - 2 * torch.matmul(x, gallery.T)  # [K, N, M]
                target = gallery[d2.argmin(dim=2)]  # [K, N, D]
            g.add_(x - target, alpha=2 * config.alpha)
        g.sub_((g * x).sum(dim=2, keepdim=True) * x)  # tangent to the sphere
        k = t + 1
        m1.mul_(b1).add_(g, alpha=1 - b1)
        m2.mul_(b2).addcmul_(g, g, value=1 - b2)
        update = torch.div(m2, 1 - b2**k).sqrt_().add_(config.eps)
        update = torch.div(m1, 1 - b1**k).div_(update).mul_(-lr).add_(x)
        x = update.div_(update.norm(dim=2, keepdim=True).clamp_min(EPS))
        if repulsors is not None:
            flat = x.view(-1, x.shape[2])  # [K N, D]: the packings' points are all kept out
            if fixed_nearest is None or t % repulsors.refresh == 0:
                fixed_nearest = nearest_fixed(flat, repulsors.points, repulsors.neighbours, tile)
            push_out(flat, repulsors, fixed_nearest)
    return x, False


class _Reached(Exception):
    """Raised by `_run_tiled`'s step callback: the run's points met the stopping angle."""

    def __init__(self, points: torch.Tensor) -> None:
        super().__init__("stopping angle reached")
        self.points = points


def _run_tiled(
    x: torch.Tensor, gallery: torch.Tensor | None, config: HyperFaceConfig, stop: float | None, tile: int,
    repulsors: Repulsors | None = None,
) -> tuple[torch.Tensor, bool]:
    """One candidate through the tiled `optimize`: (points [N, D], stopped), as `_anneal` for K = 1.

    The step callback sees the hard minimum angle of the points before each step (free, from the
    pass) and, when it may meet `stop`, checks the points after the step exactly.
    """

    def check(stats: StepStats, state: HyperFaceState) -> None:
        if stop is not None and stats.min_angle >= stop - COS_MARGIN and min_angle(state.embeddings, tile) >= stop:
            raise _Reached(state.embeddings)

    try:
        return optimize(x, gallery, config, on_step=check, repulsors=repulsors).embeddings, False
    except _Reached as reached:
        return reached.points, True


def _starting_at(config: HyperFaceConfig, temperature: float) -> HyperFaceConfig:
    """config with its schedule starting from `temperature` (a cold lane's)."""
    return config if temperature == config.temperature else replace(config, temperature=temperature)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread (restored after). A dense step on <= LANE_ENTRIES entries
    is ~15 small ops, which a thread pool only slows down: 6-35x on a busy 2-core machine, where the
    pool's workers spin between ops and compete with the thread that issues them."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _perturb(x: torch.Tensor, count: int, scale: float, generator: Stream) -> torch.Tensor:
    """`count` copies of x [N, D], each point moved along a random tangent Gaussian whose RMS length
    is `scale` radians (to first order), re-projected: [count, N, D]."""
    n, d = x.shape
    noise = generator.normal(count, n, d).to(x.device)  # [count, N, D]
    noise.sub_((noise * x).sum(dim=2, keepdim=True) * x)
    return normalize(x + noise * (scale / math.sqrt(d - 1)))


def optimize_with_restarts(
    init: torch.Tensor,
    gallery: torch.Tensor | None = None,
    config: HyperFaceConfig = PACKING,
    *,
    generator: Stream,
    refine: HyperFaceConfig | None = PACKING_REFINE,
    lanes: int | None = None,
    rounds: int = 8,
    patience: int = 1,
    perturbation: float = 0.7,
    min_gain: float = 1e-5,
    target: float | None = None,
    cold_share: float = COLD_SHARE,
    cold_temperature: float = COLD_TEMPERATURE,
    tile: int = 2048,
    repulsors: Repulsors | None = None,
    on_round: Callable[[int, float], None] | None = None,
) -> PackingResult:
    """The best packing from rounds of candidates annealed in parallel (basin hopping): for hard codes.

    This with its defaults is the packer's default configuration: the same call for every N and D.
    Each round anneals `lanes` candidates with `config`'s schedule, floor(cold_share x lanes) of them
    (the last) from `cold_temperature` instead of config.temperature, then with `refine`'s (the
    hard-min polish; its schedule fields with `config`'s objective), and keeps the one with the
    largest hard minimum angle if it beats the best so far. Round 0 starts from `init` and lanes - 1
    perturbations of it; each later round from `lanes` perturbations of the best, every point moved
    by a tangent Gaussian of RMS length `perturbation` x the best's mean nearest-neighbour angle
    (drawn from `generator`). It stops when the best reaches Rankin's bound (`metrics.rankin_bound`,
    no better code exists) or `target` (radians), after `patience` rounds in a row that gain less than
    `min_gain` radians, or after `rounds` rounds. With alpha = 0, a candidate that meets the bound (or
    target) during its run ends the run there, and the round with it.

    lanes: None = min(MAX_LANES, LANE_ENTRIES // (N max(N, M))), at least 1. Candidates run together
    through dense batched Grams, max(1, LANE_ENTRIES // (N max(N, M))) at a time, while N max(N, M) <=
    DENSE_ENTRIES, one at a time through the tiled `optimize` (config's tile, neighbours, precision)
    above that. With the defaults a round is 2,000 steps: ~0.5 s for 16 candidates of 24 points in
    4-d, ~2.5 s for 6 of 240 in 8-d (one AVX2 core); costs per code: docs/packing.md.

    repulsors: fixed points (excluded identities) every candidate is kept `min_angle` from, as in
    `optimize`; the best is checked against all of them at the end. on_round(r, best angle) runs
    after each round (its exceptions propagate: that is how a caller cancels).
    """
    if init.ndim != 2 or init.shape[0] < 2 or init.shape[1] < 2:
        raise ValueError(f"init: expected [N, D] with N >= 2 and D >= 2, got shape {tuple(init.shape)}")
    if not torch.isfinite(init).all() or bool((init.norm(dim=1) == 0).any()):
        raise ValueError("init: rows must be finite and non-zero")
    n, d = init.shape
    if config.batch_size is not None:
        raise ValueError("config.batch_size: optimize_with_restarts runs the full-batch variant")
    _check_config(config, n)
    polish = None
    if refine is not None:
        polish = replace(config, iterations=refine.iterations, learning_rate=refine.learning_rate,
                         lr_final=refine.lr_final, temperature=refine.temperature,
                         temperature_final=refine.temperature_final)
        _check_config(polish, n)
    gallery = _check_gallery(gallery, init, config)
    rep = None if repulsors is None else _check_repulsors(repulsors, init)
    checks = {"lanes": (lanes, lanes is None or lanes >= 1), "rounds": (rounds, rounds >= 1),
              "patience": (patience, patience >= 1), "perturbation": (perturbation, perturbation >= 0),
              "min_gain": (min_gain, min_gain >= 0), "cold_share": (cold_share, 0 <= cold_share <= 1),
              "cold_temperature": (cold_temperature, cold_temperature > 0)}
    for name, (value, ok) in checks.items():
        if not ok:
            raise ValueError(f"{name}: invalid value {value!r}")
    width = n * max(n, 0 if gallery is None else gallery.shape[0])  # Gram (and gallery) entries per lane
    dense = width <= DENSE_ENTRIES
    if lanes is None:
        lanes = min(MAX_LANES, max(1, LANE_ENTRIES // width))
    chunk = max(1, LANE_ENTRIES // width) if dense else 1
    cold = int(cold_share * lanes)
    temperatures = [config.temperature] * (lanes - cold) + [cold_temperature] * cold
    bound = rankin_bound(n, d)
    stop = bound - BOUND_SLACK if target is None else min(bound - BOUND_SLACK, target)
    stop_in_run = stop if config.alpha == 0 else None  # with a gallery term, runs go to their end

    def run(starts: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for c0 in range(0, starts.shape[0], chunk):
            if dense:
                with _one_thread() if width <= LANE_ENTRIES else nullcontext():
                    lane_temps = temperatures[c0 : c0 + chunk]
                    x, done = _anneal(starts[c0 : c0 + chunk], gallery, config, lane_temps, stop_in_run, tile, rep)
                    if polish is not None and not done:
                        x, done = _anneal(x, gallery, polish, None, stop_in_run, tile, rep)
                out.extend(x)
            else:
                x, done = _run_tiled(starts[c0], gallery, _starting_at(config, temperatures[c0]), stop_in_run, tile, rep)
                if polish is not None and not done:
                    x, done = _run_tiled(x, gallery, polish, stop_in_run, tile, rep)
                out.append(x)
            if done:
                break  # a candidate meets the stopping angle: the search ends with this round
        return out

    def spacing(x: torch.Tensor) -> float:
        return float(nearest_neighbour_angles(x, tile).mean())

    x0 = normalize(init.float())
    best, best_angle = x0, -math.inf
    history: list[list[float]] = []
    stale, stopped = 0, "rounds"
    for r in range(rounds):
        if r == 0:
            starts = torch.cat([x0[None], _perturb(x0, lanes - 1, perturbation * spacing(x0), generator)])
        else:
            starts = _perturb(best, lanes, perturbation * spacing(best), generator)
        candidates = run(starts)
        angles = [float(nearest_neighbour_angles(x, tile).min()) for x in candidates]
        history.append(angles)
        i = max(range(len(angles)), key=angles.__getitem__)
        gain = angles[i] - best_angle
        if gain > 0:
            best, best_angle = candidates[i], angles[i]
        stale = 0 if gain > min_gain else stale + 1
        if on_round is not None:
            on_round(r, best_angle)
        if best_angle >= bound - BOUND_SLACK:
            stopped = "bound"
            break
        if target is not None and best_angle >= target:
            stopped = "target"
            break
        if stale >= patience:
            stopped = "patience"
            break
    if rep is not None:
        best = clear(best.clone(), rep, tile=tile)
        best_angle = float(nearest_neighbour_angles(best, tile).min())
    return PackingResult(embeddings=best, min_angle=best_angle, rounds=history, stopped=stopped)


def init_from_gallery(
    gallery: torch.Tensor, n: int, generator: Stream, copy_cosine: float = 0.9
) -> torch.Tensor:
    """HyperFace's starting points: [n, D] unit rows drawn from the gallery.

    n <= M: n distinct gallery points in random order. n > M: all M points (in random order) followed
    by n - M noisy copies of random gallery points, normalize(y + sigma xi) with sigma chosen so the
    copies' mean cosine to their source is `copy_cosine` (`scale_for_mean_cosine`). Draws come from
    `generator`, on its device; the rows are returned on the gallery's device.
    """
    if gallery.ndim != 2 or gallery.shape[0] < 1:
        raise ValueError(f"gallery: expected [M, D] with M >= 1, got shape {tuple(gallery.shape)}")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if not 0 < copy_cosine <= 1:
        raise ValueError(f"copy_cosine: must lie in (0, 1], got {copy_cosine}")
    m, d = gallery.shape
    y = normalize(gallery.float())  # [M, D]
    order = generator.permutation(m).to(y.device)
    if n <= m:
        return y[order[:n]].clone()  # [n, D]
    extra = n - m
    src = generator.integers(m, extra).to(y.device)
    noise = generator.normal(extra, d).to(y.device)  # [n - M, D]
    copies = normalize(y[src] + scale_for_mean_cosine(copy_cosine, d) * noise)
    return torch.cat([y[order], copies])  # [n, D]
