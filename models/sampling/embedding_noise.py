"""`embedding_noise` variations: each image of an identity is rendered from a perturbed reference.

Sample (i, s) = normalize(ref_i + scale * xi) with xi ~ N(0, I) drawn from
`derive_seed(job_seed, "variation", i, s)`: reproducible per (identity, sample), whatever shard
or batch it is computed in. `scale` is a per-coordinate sigma, so the realised cosine to the
reference is about 1 / sqrt(1 + scale**2 * D): 0.66 for scale 0.05 and D = 512.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.sampling.sphere import normalize
from models.seeding import VARIATION, derive_seed, make_generator, normalize_exact


@dataclass(frozen=True)
class EmbeddingNoiseConfig:
    # sigma (per coordinate) of the Gaussian added to the unit reference before re-normalising;
    # 0 = no variation, every sample is the reference
    scale: float = 0.05


def check_variation_args(references: torch.Tensor, identity_ids: Sequence[int], samples: int,
                         first_sample: int) -> tuple[int, int]:
    """(N, D) of references [N, D] with one identity id each and non-negative sample counts; else a
    ValueError naming the argument. Shared by the variation samplers of embedding generators."""
    if references.ndim != 2:
        raise ValueError(f"references: expected [N, D], got shape {tuple(references.shape)}")
    n, d = references.shape
    if len(identity_ids) != n:
        raise ValueError(f"identity_ids: expected {n} ids (one per reference), got {len(identity_ids)}")
    if samples < 0 or first_sample < 0:
        raise ValueError(f"samples and first_sample: must be >= 0, got {samples} and {first_sample}")
    return n, d


def embedding_noise(
    references: torch.Tensor,
    identity_ids: Sequence[int],
    samples: int,
    job_seed: int,
    config: EmbeddingNoiseConfig = EmbeddingNoiseConfig(),
    first_sample: int = 0,
) -> torch.Tensor:
    """Perturbed embeddings for `samples` images of each identity: [N, samples, D] unit rows.

    references: [N, D] reference embeddings (unit rows); identity_ids: the N global identity
    indices, which address the noise streams. Column j is sample `first_sample + j` (quality
    top-ups render samples past the first A).
    """
    n, d = check_variation_args(references, identity_ids, samples, first_sample)
    if not config.scale >= 0:
        raise ValueError(f"config.scale: must be >= 0, got {config.scale}")
    refs = normalize_exact(references.float())  # [N, D]
    if config.scale == 0:
        return refs[:, None, :].expand(n, samples, d).clone()  # [N, samples, D]
    noise = torch.empty(n, samples, d, dtype=torch.float32)  # [N, samples, D]
    for row, i in enumerate(identity_ids):
        for j in range(samples):
            g = make_generator(derive_seed(job_seed, VARIATION, int(i), first_sample + j))
            noise[row, j] = g.normal(d)
    noise = noise.to(refs.device)
    # the reference plus seeded noise, normalised exactly: the same conditioning on every machine
    return normalize_exact(refs[:, None, :] + config.scale * noise)  # [N, samples, D]


def mean_cosine(references: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Mean realised cosine between each reference and its samples: [N]."""
    if references.ndim != 2 or samples.ndim != 3 or samples.shape[::2] != references.shape:
        raise ValueError(
            f"samples: expected [N, A, D] matching references [N, D], got {tuple(samples.shape)} "
            f"and {tuple(references.shape)}"
        )
    cos = (normalize(samples) * normalize(references)[:, None, :]).sum(-1)  # [N, A]
    return cos.mean(dim=1)  # [N]


def _expected_cosine(scale: float, dim: int) -> float:
    """E[cos(normalize(x + scale * xi), x)] for a unit x in R^dim, xi ~ N(0, I), by 2-d quadrature.

    With a = <xi, x> ~ N(0, 1) and r = |xi - a x| ~ chi(dim - 1), the cosine is
    (1 + scale a) / sqrt((1 + scale a)^2 + scale^2 r^2); the expectation is integrated on a grid.
    """
    if dim == 1:  # the cosine is the sign of 1 + scale * a
        return math.erf(1 / (scale * math.sqrt(2))) if scale > 0 else 1.0
    a = torch.linspace(-10, 10, 801, dtype=torch.float64)  # [A]
    wa = torch.exp(-a**2 / 2)
    k = dim - 1
    mu = math.sqrt(max(k - 0.5, 0.0))
    r = torch.linspace(max(mu - 12, 0.0), mu + 12, 801, dtype=torch.float64)  # [R]
    log_wr = (k - 1) * torch.log(r.clamp_min(1e-300)) - r**2 / 2
    wr = torch.exp(log_wr - log_wr.max())
    u = 1 + scale * a[:, None]  # [A, 1]
    cos = u / torch.sqrt(u**2 + (scale * r[None, :]) ** 2).clamp_min(1e-300)  # [A, R]
    w = wa[:, None] * wr[None, :]
    return float((cos * w).sum() / w.sum())


def scale_for_mean_cosine(target: float, dim: int) -> float:
    """The per-coordinate sigma for which `embedding_noise` realises a mean cosine `target` in `dim` dims.

    Solves E[cos(normalize(x + sigma xi), x)] = target for unit x by bisection on log sigma (the
    expectation falls monotonically from 1 at sigma = 0 towards 0). For large dim it is close to
    sqrt(1 / target**2 - 1) / sqrt(dim). target = 1 gives 0.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: must be an int >= 1, got {dim!r}")
    if not 0 < target <= 1:
        raise ValueError(f"target: must lie in (0, 1], got {target}")
    if target == 1:
        return 0.0
    lo, hi = -20.0, 20.0  # log sigma bracket: cos(e^-20) ~ 1, cos(e^20) ~ 0
    for _ in range(80):
        mid = (lo + hi) / 2
        if _expected_cosine(math.exp(mid), dim) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)
