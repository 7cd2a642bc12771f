"""Cone variations: each image of an identity conditioned on an embedding drawn uniformly from the
cap of the sphere within a half-angle theta of its reference ("variations within 35 degrees").

Uniform on the cap means uniform in solid angle: the angle phi to the reference has density
proportional to sin(phi)^(D-2) on [0, theta], i.e. t = cos(phi) has density proportional to
(1 - t^2)^((D-3)/2) on [cos(theta), 1]. In high dimension that mass sits at the rim: in 512-d with
theta = 35 degrees the median sample is 34.95 degrees from its reference and 99% lie beyond 34.6.
Sample (i, s) draws, from its own stream `derive_seed(job_seed, "variation", i, s)`, D normals (the
direction, projected orthogonal to the reference) and then one uniform number u (the angle:
t = F^-1(u) from the tabulated distribution of t).

Every step uses exactly rounded operations only (+, -, *, /, sqrt; the cosine of theta by its Taylor
series; the table's powers by repeated multiplication; dot products accumulated one column at a
time in float64), so the conditioning embeddings are the same bits on every CPU, like the rest of a
job's seeded draws (`models.seeding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from models.sampling.embedding_noise import check_variation_args
from models.seeding import VARIATION, derive_seed, make_generator, normalize_exact

TABLE_POINTS = 16_385  # grid of t = cos(phi) over [cos(theta), 1] for the inverse distribution
_PI = 3.141592653589793


@dataclass(frozen=True)
class ConeConfig:
    # half-angle of the cone around the reference, degrees: every sample is at most this far
    half_angle_deg: float = 35.0


def _cos(x: float) -> float:
    """cos(x) for |x| <= pi/2 by its Taylor series in a fixed order (exactly rounded steps only)."""
    x2 = x * x
    term, total = 1.0, 1.0
    for k in range(1, 30):
        term = -term * x2 / ((2 * k - 1) * (2 * k))
        total += term
    return total


def _power(q: np.ndarray, exponent: int) -> np.ndarray:
    """q ** exponent for a non-negative integer exponent, by squaring in a fixed order."""
    out = np.ones_like(q)
    base = q.copy()
    while exponent:
        if exponent & 1:
            out = out * base
        base = base * base
        exponent >>= 1
    return out


@lru_cache(maxsize=32)
def cone_table(dim: int, half_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(t, cdf): the grid of t = cos(phi) from cos(theta) to 1 and the distribution function of t for
    a uniform point of the cap (trapezoid rule on the density (1 - t^2)^((dim-3)/2), scaled by its
    value at the rim so nothing that matters underflows). float64 [TABLE_POINTS] each."""
    if dim < 3:
        raise ValueError(f"dim: must be >= 3, got {dim}")
    if not 0 < half_angle_deg <= 90:
        raise ValueError(f"half_angle_deg: must lie in (0, 90], got {half_angle_deg}")
    c = _cos(half_angle_deg * (_PI / 180.0))
    t = c + (1.0 - c) * (np.arange(TABLE_POINTS, dtype=np.float64) / (TABLE_POINTS - 1))
    q = (1.0 - t * t) / (1.0 - c * c)  # in [0, 1], 1 at the rim
    q = np.maximum(q, 0.0)
    density = _power(q, (dim - 3) // 2)
    if (dim - 3) % 2:
        density = density * np.sqrt(q)
    steps = (density[1:] + density[:-1]) * (0.5 * (1.0 - c) / (TABLE_POINTS - 1))
    cdf = np.concatenate([[0.0], np.cumsum(steps)])
    return t, cdf / cdf[-1]


def _inverse(t: np.ndarray, cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """t at the quantiles u in [0, 1), by linear interpolation of the table (exact steps only)."""
    k = np.clip(np.searchsorted(cdf, u, side="right") - 1, 0, len(cdf) - 2)
    lo, hi = cdf[k], cdf[k + 1]
    w = np.where(hi > lo, (u - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return t[k] + w * (t[k + 1] - t[k])


def cone_variations(
    references: torch.Tensor,
    identity_ids: Sequence[int],
    samples: int,
    job_seed: int,
    config: ConeConfig = ConeConfig(),
    first_sample: int = 0,
) -> torch.Tensor:
    """Conditioning embeddings uniform in the cone around each reference: [N, samples, D] unit rows.

    references: [N, D] reference embeddings; identity_ids: the N global identity indices, which
    address the streams. Column j is sample `first_sample + j`.
    """
    n, d = check_variation_args(references, identity_ids, samples, first_sample)
    t_grid, cdf = cone_table(d, float(config.half_angle_deg))
    refs = normalize_exact(references.detach().to("cpu", torch.float64)).numpy()  # [N, D]
    noise = np.empty((n, samples, d), dtype=np.float64)  # [N, samples, D]
    u = np.empty((n, samples), dtype=np.float64)  # [N, samples]
    for row, i in enumerate(identity_ids):
        for j in range(samples):
            g = make_generator(derive_seed(job_seed, VARIATION, int(i), first_sample + j))
            noise[row, j] = g.normal(d, dtype=torch.float64).numpy()
            u[row, j] = float(g.uniform(1, dtype=torch.float64)[0])
    r = np.broadcast_to(refs[:, None, :], noise.shape)  # [N, samples, D]
    along = np.zeros((n, samples), dtype=np.float64)
    for k in range(d):  # <noise, ref>, one column at a time: the same sum on every CPU
        along = along + noise[..., k] * r[..., k]
    ortho = noise - along[..., None] * r  # [N, samples, D]
    norm2 = np.zeros((n, samples), dtype=np.float64)
    for k in range(d):
        norm2 = norm2 + ortho[..., k] * ortho[..., k]
    direction = ortho / np.sqrt(np.maximum(norm2, 1e-300))[..., None]
    t = _inverse(t_grid, cdf, u)  # [N, samples] cosine to the reference
    x = t[..., None] * r + np.sqrt(np.maximum(1.0 - t * t, 0.0))[..., None] * direction
    out = normalize_exact(torch.from_numpy(x)).to(torch.float32)  # [N, samples, D]
    return out.to(references.device)


def angles_deg(references: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between each sample and its reference: [N, A] (float64, clamped cosines)."""
    if references.ndim != 2 or samples.ndim != 3 or samples.shape[::2] != references.shape:
        raise ValueError(f"samples: expected [N, A, D] matching references [N, D], got "
                         f"{tuple(samples.shape)} and {tuple(references.shape)}")
    r = references.double()
    r = r / r.norm(dim=1, keepdim=True)
    s = samples.double()
    s = s / s.norm(dim=2, keepdim=True)
    cos = (s * r[:, None, :]).sum(-1).clamp(-1.0, 1.0)  # [N, A]
    return torch.rad2deg(torch.arccos(cos))
