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
`optimize_with_restarts` adds basin hopping (perturb the best packing, re-anneal, keep if better).
The stochastic variant takes a random batch of rows per step against all points (the others
detached): one pass over [B, tile] tiles with an online soft-max that accumulates the gradient as it
goes (flash-attention style), and lazy Adam that touches only the batch's rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from models.sampling.metrics import gram_tiles, nearest_neighbour_angles
from models.sampling.sphere import EPS, normalize
from models.sampling.variations import scale_for_mean_cosine
from models.seeding import Stream

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
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> HyperFaceState:
        """The inverse of `to_tensors`."""
        missing = {"step", "embeddings", "exp_avg", "exp_avg_sq", "row_steps", "nearest"} - set(tensors)
        if missing:
            raise ValueError(f"tensors: missing {sorted(missing)}")
        rng = tensors.get("rng_state")
        return cls(
            step=int(tensors["step"].reshape(-1)[0]),
            embeddings=tensors["embeddings"],
            exp_avg=tensors["exp_avg"],
            exp_avg_sq=tensors["exp_avg_sq"],
            row_steps=tensors["row_steps"].long(),
            nearest=tensors["nearest"].long(),
            rng_state=None if rng is None else rng.to(torch.uint8),
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
    s.add_(scratch.exp_().sum(dim=dim))  # tile >= 2: every row has seen a finite logit
    m.copy_(new)


def _row_shift(lse: torch.Tensor, separation: str) -> torch.Tensor:
    """lse_i - log(N w_i), w the rows' weights in L_sep: uniform ("mean") or soft-max of lse ("max")."""
    if separation == "mean":
        return lse
    return lse - torch.log_softmax(lse, dim=0) - math.log(lse.shape[0])


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
        q = torch.sub(a, shift[i0:i1, None], out=buf.get(1, i1 - i0, j1 - j0)).exp_()  # [ti, tj] N w_i p_ij
        q.add_(a.sub_(shift[None, j0:j1]).exp_())  # + N w_j p_ji
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
        p = a.sub_(new[:, None]).exp_()  # [B, tj]
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
    )


def optimize(
    init: torch.Tensor,
    gallery: torch.Tensor | None,
    config: HyperFaceConfig = HyperFaceConfig(),
    *,
    generator: Stream | None = None,
    on_step: Callable[[StepStats, HyperFaceState], None] | None = None,
    state: HyperFaceState | None = None,
) -> HyperFaceResult:
    """Place N identities: run Adam steps state.step .. config.iterations - 1 on L = L_sep + alpha R.

    init: [N, D] starting points (projected onto the sphere; usually `init_from_gallery`), which also
    fixes the device; gallery: [M, D] embeddings of generated faces, or None when alpha = 0.
    generator: draws the stochastic variant's batches (required when batch_size is set; a resumed
    state overwrites its state with the saved one). on_step(stats, state) runs after every step;
    its exceptions propagate (that is how a caller cancels). state: resume from a saved state
    (`HyperFaceState.from_tensors`); the run then continues exactly as an uninterrupted one.
    """
    if init.ndim != 2 or init.shape[0] < 2 or init.shape[1] < 2:
        raise ValueError(f"init: expected [N, D] with N >= 2 and D >= 2, got shape {tuple(init.shape)}")
    if not torch.isfinite(init).all() or bool((init.norm(dim=1) == 0).any()):
        raise ValueError("init: rows must be finite and non-zero")
    n, d = init.shape
    _check_config(config, n)
    if gallery is not None:
        if gallery.ndim != 2 or gallery.shape[1] != d or gallery.shape[0] < 1:
            raise ValueError(f"gallery: expected [M, {d}] with M >= 1, got shape {tuple(gallery.shape)}")
        if not torch.isfinite(gallery).all():
            raise ValueError("gallery: must be finite")
        gallery = gallery.to(init.device, torch.float32)
    if config.alpha > 0 and gallery is None:
        raise ValueError(f"gallery: required when config.alpha > 0 (alpha = {config.alpha})")
    stochastic = config.batch_size is not None
    if stochastic and generator is None:
        raise ValueError("generator: required when config.batch_size is set (it draws the batches)")
    state = _initial_state(init, generator if stochastic else None) if state is None else _adopt(state, init)
    if stochastic and state.rng_state is not None:
        generator.set_state(state.rng_state)  # type: ignore[union-attr]
    if state.step > config.iterations:
        raise ValueError(f"state.step: {state.step} is past config.iterations = {config.iterations}")

    x, m1, m2 = state.embeddings, state.exp_avg, state.exp_avg_sq
    row_steps, nearest = state.row_steps, state.nearest
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
            t + 1, x, m1, m2, row_steps, nearest, generator.get_state() if stochastic else None  # type: ignore[union-attr]
        )
        if on_step is not None:
            on_step(stats, state)
    return HyperFaceResult(embeddings=x, history=history, state=state, config=config)


def optimize_with_restarts(
    init: torch.Tensor,
    gallery: torch.Tensor | None,
    config: HyperFaceConfig,
    *,
    restarts: int,
    perturbation: float,
    generator: Stream,
    target: float | None = None,
    tile: int = 2048,
) -> tuple[torch.Tensor, float]:
    """Basin hopping on the full-batch optimiser: (best points [N, D], their minimum angle in radians).

    One run from `init`, then up to `restarts` more, each from the best points so far perturbed by
    `perturbation` x a standard Gaussian (drawn from `generator`) and re-projected, re-annealed with
    the full schedule of `config`; a run is kept when its hard minimum angle is larger. Stops early
    once the best reaches `target` (radians). For hard packings whose random starts stall in local
    optima (e.g. the 24-cell: 58.1-58.9° from random starts, 60° after a few hops at 0.3).
    """
    if config.batch_size is not None:
        raise ValueError("config.batch_size: optimize_with_restarts runs the full-batch variant")
    if restarts < 0 or perturbation < 0:
        raise ValueError(f"restarts, perturbation: must be >= 0, got {restarts}, {perturbation}")
    best = optimize(init, gallery, config).embeddings
    best_angle = float(nearest_neighbour_angles(best, tile).min())
    for _ in range(restarts):
        if target is not None and best_angle >= target:
            break
        noise = generator.normal(best.shape).to(best.device)
        x = optimize(normalize(best + perturbation * noise), gallery, config).embeddings
        angle = float(nearest_neighbour_angles(x, tile).min())
        if angle > best_angle:
            best, best_angle = x, angle
    return best, best_angle


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
