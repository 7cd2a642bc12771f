"""`embedding_noise` variations: each image of an identity is rendered from a perturbed reference.

Sample (i, s) = normalize(ref_i + scale * xi) with xi ~ N(0, I) drawn from
`derive_seed(job_seed, "variation", i, s)`: reproducible per (identity, sample), whatever shard
or batch it is computed in. `scale` is a per-coordinate sigma, so the realised cosine to the
reference is about 1 / sqrt(1 + scale**2 * D): 0.66 for scale 0.05 and D = 512.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.sampling.sphere import normalize
from models.seeding import derive_seed, make_generator


@dataclass(frozen=True)
class EmbeddingNoiseConfig:
    # sigma (per coordinate) of the Gaussian added to the unit reference before re-normalising;
    # 0 = no variation, every sample is the reference
    scale: float = 0.05


def embedding_noise(
    references: torch.Tensor,
    identity_ids: Sequence[int],
    samples: int,
    job_seed: int,
    config: EmbeddingNoiseConfig = EmbeddingNoiseConfig(),
) -> torch.Tensor:
    """Perturbed embeddings for `samples` images of each identity: [N, samples, D] unit rows.

    references: [N, D] reference embeddings (unit rows); identity_ids: the N global identity
    indices, which address the noise streams.
    """
    if references.ndim != 2:
        raise ValueError(f"references: expected [N, D], got shape {tuple(references.shape)}")
    n, d = references.shape
    if len(identity_ids) != n:
        raise ValueError(f"identity_ids: expected {n} ids (one per reference), got {len(identity_ids)}")
    if samples < 0:
        raise ValueError(f"samples: must be >= 0, got {samples}")
    if not config.scale >= 0:
        raise ValueError(f"config.scale: must be >= 0, got {config.scale}")
    refs = normalize(references.float())  # [N, D]
    if config.scale == 0:
        return refs[:, None, :].expand(n, samples, d).clone()  # [N, samples, D]
    noise = torch.empty(n, samples, d, dtype=torch.float32)  # [N, samples, D]
    for row, i in enumerate(identity_ids):
        for s in range(samples):
            g = make_generator(derive_seed(job_seed, "variation", int(i), s))
            noise[row, s] = torch.randn(d, generator=g, dtype=torch.float32)
    noise = noise.to(refs.device)
    return normalize(refs[:, None, :] + config.scale * noise)  # [N, samples, D]


def mean_cosine(references: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Mean realised cosine between each reference and its samples: [N]."""
    if references.ndim != 2 or samples.ndim != 3 or samples.shape[::2] != references.shape:
        raise ValueError(
            f"samples: expected [N, A, D] matching references [N, D], got {tuple(samples.shape)} "
            f"and {tuple(references.shape)}"
        )
    cos = (normalize(samples) * normalize(references)[:, None, :]).sum(-1)  # [N, A]
    return cos.mean(dim=1)  # [N]
