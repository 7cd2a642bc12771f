"""`sampler.exclude`: identities a job's new ones keep away from, by at least
`exclude_min_angle_deg` in the identities' embedding space.

The excluded set is the identities of the team's earlier jobs (their `identities/embeddings.safetensors`,
same generator and embedder: the API checks) and reference sets the workers hold
(`{model_dir}/reference_sets/{name}.safetensors`, as for the leakage check), stacked into one
[M, D] tensor. Each sampler honours it its own way: `random` redraws an identity that lands too
close (identity i's k-th redraw from `derive_seed(seed, EXCLUDE_REDRAW, i, k)`, recorded in the
stats), Langevin repels from the set, and every sampler's result is checked here (`enforce`): a job
whose identities end closer than the bound fails with `exclusion_unreachable`, saying how close.

The nearest excluded identity of each new one is found by tiles of the [N, M] cosine matrix, so the
set may hold millions of embeddings: memory O(tile² + N + M·D), never N x M.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.layout import JobKeys
from app.spec import JOB_ID_PATTERN, JobSpec
from app.storage import Storage
from workers.errors import ExclusionUnavailable, ExclusionUnreachable, ReferenceUnavailable
from workers.reference_sets import load_reference_set

MAX_REDRAWS = 64  # redraws of one identity (random sampler) before the job fails
TILE = 8192  # rows and columns of one tile of the cosine matrix


@dataclass
class Excluded:
    """The identities to keep away from: unit rows [M, D], where they came from, and the bound."""

    embeddings: torch.Tensor  # [M, D] unit rows
    sources: list[dict[str, Any]]  # {"job": id, "identities": n} or {"reference_set": name, "embeddings": m, "sha256"}
    min_angle_deg: float
    redraws: dict[int, int] = field(default_factory=dict)  # identity -> redraws it took (random sampler)

    @property
    def min_cosine(self) -> float:
        return math.cos(math.radians(self.min_angle_deg))


def load_excluded(spec: JobSpec, storage: Storage, prefix: str, model_dir: Path) -> Excluded | None:
    """The job's excluded set, the jobs' identities read from `storage` (the service's, under
    `prefix`), or None when it excludes nothing; ExclusionUnavailable naming the entry when one cannot
    be read or its rows do not have one dimension."""
    from workers import artifacts

    return build_excluded(spec, lambda job_id: artifacts.load_identities(storage, JobKeys.for_job(prefix, job_id)),
                          model_dir)


def build_excluded(spec: JobSpec, job_identities: Callable[[str], torch.Tensor], model_dir: Path) -> Excluded | None:
    """The job's excluded set: each excluded job's identities from `job_identities(job_id)` ([n, D]),
    each reference set from `model_dir` (`idforge reproduce` fetches the jobs' through the API)."""
    import re

    names = spec.sampler.exclude
    if not names:
        return None
    parts: list[torch.Tensor] = []
    sources: list[dict[str, Any]] = []
    for k, name in enumerate(names):
        where = f"sampler.exclude[{k}] ({name})"
        if re.fullmatch(JOB_ID_PATTERN, name):
            try:
                emb = job_identities(name).float()
            except Exception as e:
                raise ExclusionUnavailable(f"{where}: its identities cannot be read: {e}") from e
            sources.append({"job": name, "identities": int(emb.shape[0])})
        else:
            dim = parts[0].shape[1] if parts else _identity_dim(spec)
            try:
                ref = load_reference_set(model_dir, name, dim, spec.models.embedder)
            except ReferenceUnavailable as e:
                raise ExclusionUnavailable(f"{where}: {e}") from e
            emb = ref.embeddings
            sources.append({"reference_set": name, "embeddings": int(emb.shape[0]), "sha256": ref.sha256})
        if emb.ndim != 2 or (parts and emb.shape[1] != parts[0].shape[1]):
            raise ExclusionUnavailable(f"{where}: rows of {tuple(emb.shape)[1:]} dimensions, the others' "
                                       f"{parts[0].shape[1] if parts else '?'}")
        parts.append(torch.nn.functional.normalize(emb, dim=1))
    return Excluded(torch.cat(parts), sources, spec.sampler.exclude_min_angle_deg)


def _identity_dim(spec: JobSpec) -> int:
    """The dimension of the job's identities: the generator's conditioning embeddings, or (latent
    generators) the embedder's."""
    from app import catalog

    gen = catalog.CATALOG[spec.models.generator]
    if gen.conditioning == "embedding" and gen.embedding_dim:
        return int(gen.embedding_dim)
    return int(catalog.CATALOG[spec.models.embedder].embedding_dim or 512)


def nearest_cosine(x: torch.Tensor, excluded: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x's largest cosine to a row of `excluded`, and which row: ([N], [N] int64).
    x [N, D] and excluded [M, D] unit rows; tiled, so [N, M] is never held."""
    if x.ndim != 2 or excluded.ndim != 2 or x.shape[1] != excluded.shape[1]:
        raise ValueError(f"x and excluded: expected [N, D] and [M, D], got {tuple(x.shape)} and {tuple(excluded.shape)}")
    best = torch.full((x.shape[0],), -2.0, dtype=torch.float64)
    which = torch.zeros(x.shape[0], dtype=torch.int64)
    xs = x.double()
    for m0 in range(0, excluded.shape[0], tile):
        e = excluded[m0:m0 + tile].to(xs.device).double()  # [t, D]
        for n0 in range(0, xs.shape[0], tile):
            c = xs[n0:n0 + tile] @ e.T  # [tn, t]
            top, arg = c.max(dim=1)
            better = top.cpu() > best[n0:n0 + tile]
            best[n0:n0 + tile] = torch.where(better, top.cpu(), best[n0:n0 + tile])
            which[n0:n0 + tile] = torch.where(better, arg.cpu() + m0, which[n0:n0 + tile])
    return best, which


def redraw_until_clear(x: torch.Tensor, excluded: Excluded,
                       redraw: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Replace each identity closer than the bound by its next redraw (`redraw(i, k)` -> [D] unit
    row, k = 1, 2, ...) until it is clear; records the redraws; ExclusionUnreachable after
    MAX_REDRAWS of one identity."""
    _check_dims(x, excluded)
    cos, _ = nearest_cosine(x, excluded.embeddings)
    x = x.clone()
    for i in torch.nonzero(cos >= excluded.min_cosine).flatten().tolist():
        for k in range(1, MAX_REDRAWS + 1):
            row = redraw(i, k)
            c, _ = nearest_cosine(row[None, :], excluded.embeddings)
            if float(c[0]) < excluded.min_cosine:
                x[i] = row
                excluded.redraws[i] = k
                break
        else:
            raise ExclusionUnreachable(
                f"identity {i}: {MAX_REDRAWS} redraws all landed within {excluded.min_angle_deg} degrees "
                f"of an excluded identity ({excluded.embeddings.shape[0]} excluded): lower "
                "sampler.exclude_min_angle_deg or exclude fewer")
    return x


def _check_dims(x: torch.Tensor, excluded: Excluded) -> None:
    if x.shape[1] != excluded.embeddings.shape[1]:
        raise ExclusionUnavailable(f"sampler.exclude: the excluded identities have {excluded.embeddings.shape[1]} "
                                   f"dimensions, this job's {x.shape[1]}")


def enforce(x: torch.Tensor, excluded: Excluded) -> dict[str, Any]:
    """Check every identity is at least the bound from every excluded one; the stats the manifest and
    the report state (`min_angle_deg` reached, the bound, the sources, the redraws), or
    ExclusionUnreachable naming the closest identity."""
    _check_dims(x, excluded)
    cos, which = nearest_cosine(x, excluded.embeddings)
    i = int(torch.argmax(cos))
    reached = math.degrees(math.acos(max(-1.0, min(1.0, float(cos[i])))))
    if float(cos[i]) >= excluded.min_cosine:
        raise ExclusionUnreachable(
            f"identity {i} ended {reached:.2f} degrees from excluded identity {int(which[i])}, under the "
            f"{excluded.min_angle_deg} degrees asked (sampler.exclude_min_angle_deg); "
            f"{int((cos >= excluded.min_cosine).sum())} of {x.shape[0]} identities are that close")
    return {"sources": excluded.sources, "excluded": int(excluded.embeddings.shape[0]),
            "bound_deg": excluded.min_angle_deg, "min_angle_deg": round(reached, 4),
            "redraws": {str(k): v for k, v in sorted(excluded.redraws.items())}}
