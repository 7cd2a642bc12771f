"""Packing quality of identities on the unit sphere: minimum angle, nearest-neighbour statistics,
and the reference values they are judged against (uniform random points, the bounds).

Every pairwise statistic is computed in tiles of `tile` x `tile` with per-row reductions, using
the symmetry of the Gram matrix (each tile above the diagonal serves its rows and its columns), so
memory stays O(N·D + tile²): an N x N matrix is never formed. Angles are in radians. The angle of
each nearest pair is recomputed as 2·atan2(|xi - xj|, |xi + xj|), which stays accurate for nearly
identical points where acos of a float32 cosine would not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from models.sampling.sphere import normalize
from models.seeding import Stream

DEFAULT_TILE = 2048  # rows (and columns) per Gram tile: 2048² float32 = 16 MiB per tile


def _check(x: torch.Tensor, tile: int, min_rows: int = 2) -> None:
    if x.ndim != 2:
        raise ValueError(f"x: expected [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"x: needs at least {min_rows} rows, got {x.shape[0]}")
    if tile < 1:
        raise ValueError(f"tile: must be >= 1, got {tile}")


def gram_tiles(n: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks (i0, i1, j0, j1) on and above the diagonal that cover the upper triangle of an n x n Gram."""
    for i0 in range(0, n, tile):
        for j0 in range(i0, n, tile):
            yield i0, min(i0 + tile, n), j0, min(j0 + tile, n)


def nearest_neighbours(x: torch.Tensor, tile: int = DEFAULT_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest cosine to another row and that row's index: ([N] float32, [N] int64)."""
    _check(x, tile)
    x = normalize(x.float())  # [N, D]
    n = x.shape[0]
    best = torch.full((n,), -math.inf, device=x.device)  # [N]
    index = torch.zeros(n, dtype=torch.long, device=x.device)  # [N]
    for i0, i1, j0, j1 in gram_tiles(n, tile):
        s = x[i0:i1] @ x[j0:j1].T  # [ti, tj]
        if i0 == j0:
            s.fill_diagonal_(-math.inf)
        for dim, lo, hi, off in ((1, i0, i1, j0), (0, j0, j1, i0)):
            if dim == 0 and i0 == j0:
                continue  # a diagonal tile is symmetric: its rows already covered its columns
            v, k = s.max(dim=dim)  # [t]
            better = v > best[lo:hi]
            best[lo:hi] = torch.where(better, v, best[lo:hi])
            index[lo:hi] = torch.where(better, k + off, index[lo:hi])
    return best, index


def pair_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angles between matching rows of unit-norm x and y, accurate near 0 and pi: [N]."""
    return 2 * torch.atan2((x - y).norm(dim=-1), (x + y).norm(dim=-1))


def nearest_neighbour_angles(x: torch.Tensor, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Angle from each row to its nearest other row: [N] radians."""
    _, index = nearest_neighbours(x, tile)
    x = normalize(x.float())
    return pair_angles(x, x[index])  # [N]


def min_angle(x: torch.Tensor, tile: int = DEFAULT_TILE) -> float:
    """The hard minimum pairwise angle of the rows of x, radians."""
    return float(nearest_neighbour_angles(x, tile).min())


def angle_percentiles(
    angles: torch.Tensor, q: Sequence[float] = (0, 1, 5, 50, 95, 100)
) -> dict[float, float]:
    """Percentiles (0..100) of a vector of angles, e.g. `nearest_neighbour_angles(x)`: {q: radians}."""
    if angles.ndim != 1 or angles.numel() == 0:
        raise ValueError(f"angles: expected a non-empty [N] vector, got shape {tuple(angles.shape)}")
    if any(not 0 <= p <= 100 for p in q):
        raise ValueError(f"q: percentiles must lie in [0, 100], got {list(q)}")
    values = torch.quantile(angles.double().cpu(), torch.tensor([p / 100 for p in q], dtype=torch.float64))
    return {p: float(v) for p, v in zip(q, values)}


def fraction_closer_than(x: torch.Tensor, angle: float, tile: int = DEFAULT_TILE) -> float:
    """Fraction of the N(N-1)/2 unordered pairs whose angle is below `angle` (radians)."""
    _check(x, tile)
    if not 0 <= angle <= math.pi:
        raise ValueError(f"angle: must lie in [0, pi], got {angle}")
    x = normalize(x.float())
    n = x.shape[0]
    threshold = math.cos(angle)
    count = 0
    for i0, i1, j0, j1 in gram_tiles(n, tile):
        s = x[i0:i1] @ x[j0:j1].T  # [ti, tj]
        if i0 == j0:
            count += int((s > threshold).triu(diagonal=1).sum())
        else:
            count += int((s > threshold).sum())
    return count / (n * (n - 1) / 2)


# --- reference values -------------------------------------------------------------------------


def _angle_grid(d: int, steps: int = 20001) -> tuple[torch.Tensor, torch.Tensor]:
    """theta in [0, pi] and the cap fraction F(theta) = P(angle(u, v) < theta) for u, v uniform in R^d."""
    if d < 2:
        raise ValueError(f"d: must be >= 2, got {d}")
    theta = torch.linspace(0, math.pi, steps, dtype=torch.float64)  # [steps]
    log_density = (d - 2) * torch.log(torch.sin(theta).clamp_min(1e-300))  # density ∝ sin^(d-2)
    density = torch.exp(log_density - log_density.max())
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((density[1:] + density[:-1]) / 2, 0)])
    return theta, mass / mass[-1]


def uniform_cap_fraction(angle: float, d: int) -> float:
    """P(angle between two independent uniform points of S^(d-1) < angle)."""
    theta, cdf = _angle_grid(d)
    return float(np.interp(angle, theta.numpy(), cdf.numpy()))


def uniform_expected_nn_angle(n: int, d: int) -> float:
    """E[angle from one of n uniform points on S^(d-1) to its nearest other point], radians.

    Exact up to quadrature: given x_i, the other n - 1 points are independent, so
    P(nn angle > t) = (1 - F(t))^(n-1) with F the cap fraction, and E = integral of that over [0, pi].
    """
    if n < 2:
        raise ValueError(f"n: must be >= 2, got {n}")
    theta, cdf = _angle_grid(d)
    survival = torch.exp((n - 1) * torch.log1p(-cdf.clamp(max=1 - 1e-300)))
    return float(torch.trapezoid(survival, theta))


def uniform_expected_min_angle(n: int, d: int) -> float:
    """E[minimum pairwise angle of n uniform points on S^(d-1)], radians (Poisson approximation).

    Treats the n(n-1)/2 pair angles as independent: P(min > t) = (1 - F(t))^(n(n-1)/2). Accurate
    when the minimum is a rare event (large d or n); `simulate_uniform` gives the seeded ground truth.
    """
    if n < 2:
        raise ValueError(f"n: must be >= 2, got {n}")
    theta, cdf = _angle_grid(d)
    pairs = n * (n - 1) / 2
    survival = torch.exp(pairs * torch.log1p(-cdf.clamp(max=1 - 1e-300)))
    return float(torch.trapezoid(survival, theta))


def simulate_uniform(
    n: int, d: int, generator: Stream, trials: int = 1, tile: int = DEFAULT_TILE
) -> tuple[float, float]:
    """Seeded simulation: (mean min angle, mean nearest-neighbour angle) over `trials` uniform draws."""
    if trials < 1:
        raise ValueError(f"trials: must be >= 1, got {trials}")
    mins, means = [], []
    for _ in range(trials):
        x = normalize(generator.normal(n, d))  # [n, d]
        nn = nearest_neighbour_angles(x, tile)
        mins.append(float(nn.min()))
        means.append(float(nn.mean()))
    return sum(mins) / trials, sum(means) / trials


def simplex_bound(n: int) -> float:
    """The largest possible minimum angle of n >= 2 points in any dimension: acos(-1/(n-1)).

    Equivalently max_{i != j} <xi, xj> >= -1/(n-1), attained by the regular simplex when n <= d + 1.
    """
    if n < 2:
        raise ValueError(f"n: must be >= 2, got {n}")
    return math.acos(-1 / (n - 1))


def welch_bound(n: int, d: int) -> float:
    """Welch's lower bound on the coherence max_{i != j} |<xi, xj>| of n > d unit vectors in R^d."""
    if not n > d >= 1:
        raise ValueError(f"n: Welch's bound needs n > d >= 1, got n={n}, d={d}")
    return math.sqrt((n - d) / (d * (n - 1)))


def rankin_bound(n: int, d: int) -> float:
    """An upper bound on the minimum angle of n points on S^(d-1), radians.

    Rankin: acos(-1/(n-1)) for n <= d + 1 (the simplex), pi/2 for n >= d + 2 (attained by the
    cross-polytope up to n = 2d). Past 2d it is tightened by the cap-packing bound: caps of angular
    radius theta/2 around the points are disjoint, so n·F(theta/2) <= 1, F(t) being the share of
    the sphere in a cap of angular radius t (the pair-angle CDF of `uniform_cap_fraction`).
    """
    if n < 2 or d < 2:
        raise ValueError(f"n, d: need n >= 2 and d >= 2, got n={n}, d={d}")
    if n <= d + 1:
        return simplex_bound(n)
    bound = math.pi / 2
    if n > 2 * d:
        theta, cdf = _angle_grid(d)  # cdf(t) = share of the sphere in a cap of angular radius t
        radius = float(np.interp(1 / n, cdf.numpy(), theta.numpy()))
        bound = min(bound, 2 * radius)
    return bound
