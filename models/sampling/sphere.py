"""The unit hypersphere: projection onto it and uniform draws from it."""

from __future__ import annotations

import torch

from models.seeding import Stream, normalize_exact

EPS = 1e-12  # floor on a norm before dividing by it; a zero vector stays zero


def normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Project `x` onto the unit sphere along `dim` (a zero vector stays zero)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(EPS)


def uniform_sphere(n: int, d: int, generator: Stream) -> torch.Tensor:
    """`n` points drawn uniformly from the unit sphere in R^d: [n, d] float32 unit rows.

    Normalised standard Gaussians are uniform on the sphere. The points are the same bits on every
    machine (portable draws, `normalize_exact`) and land on the stream's device.
    """
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if d < 1:
        raise ValueError(f"d: must be >= 1, got {d}")
    return normalize_exact(generator.normal(n, d))  # [n, d]
