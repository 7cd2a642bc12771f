"""The `random` identity sampler: uniform points on the sphere, the baseline for every figure.

Identity i is drawn from its own stream, `derive_seed(job_seed, "identity", i)`, so a shard that
samples identities [start, start + count) gets exactly the rows the whole job would have.
"""

from __future__ import annotations

import torch

from models.sampling.sphere import uniform_sphere
from models.seeding import IDENTITY, derive_seed, make_generator


def sample_identities(job_seed: int, start: int, count: int, dim: int = 512) -> torch.Tensor:
    """Reference embeddings of identities start .. start + count - 1: [count, dim] float32 unit rows."""
    if start < 0:
        raise ValueError(f"start: must be >= 0, got {start}")
    if count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    if dim < 1:
        raise ValueError(f"dim: must be >= 1, got {dim}")
    rows = [
        uniform_sphere(1, dim, make_generator(derive_seed(job_seed, IDENTITY, i)))  # [1, dim]
        for i in range(start, start + count)
    ]
    if not rows:
        return torch.empty(0, dim, dtype=torch.float32)
    return torch.cat(rows)  # [count, dim]
