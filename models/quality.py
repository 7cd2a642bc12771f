"""Verification and separability metrics of a face dataset's embeddings, for the quality report.

Every function takes unit-norm embeddings (cosine = dot product) and never forms a matrix larger
than `tile` x `tile` beyond its inputs, so the report can stream a dataset shard by shard.

Scores and thresholds. A *genuine* score is the cosine of two images of one identity, an
*impostor* score the cosine of two images of different identities. A verifier at threshold t
accepts a pair when its cosine is >= t:
  FMR(t)  = share of impostor scores >= t   (false match rate)
  FNMR(t) = share of genuine scores  <  t   (false non-match rate)
Scores are counted in a fixed histogram of `bins` equal bins over [-1, 1] (default 2000 bins of
0.001); score s falls in bin k = floor((s + 1) * bins / 2), clamped to [0, bins - 1], computed in
float64. Thresholds are the bin edges t_k = -1 + 2k / bins (k = 0..bins), at which FMR and FNMR are
exact counts, not interpolations; the top edge t_bins = 1 rejects every pair. The resolution of
any threshold is therefore one bin width (0.001 by default).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.sampling.metrics import gram_tiles, nearest_neighbours, pair_angles

DEFAULT_BINS = 2000  # bins over cosine [-1, 1]: width 0.001
DEFAULT_TILE = 2048  # rows (and columns) per similarity tile: 2048² float32 = 16 MiB
UNIT_TOLERANCE = 1e-3  # |norm - 1| above this is refused by `check_unit`


def check_unit(x: torch.Tensor, name: str, dim: int | None = None) -> None:
    """Raise ValueError unless `x` is finite, has `dim` last-axis features (if given) and unit rows."""
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name}: expected {dim} features in the last axis, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    err = float((x.float().norm(dim=-1) - 1).abs().max())
    if err > UNIT_TOLERANCE:
        raise ValueError(f"{name}: rows must be unit-norm embeddings, largest |norm - 1| is {err:.4g}")


# ---- score histograms and error rates ------------------------------------------------------


class ScoreHistogram:
    """Counts of cosine scores in `bins` equal bins over [-1, 1], plus their exact float64 sum."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2:
            raise ValueError(f"bins: must be >= 2, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)  # [bins]
        self.total = 0.0  # sum of the scores added, for the exact mean

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def edges(self) -> np.ndarray:
        """The thresholds t_k = -1 + 2k / bins, k = 0..bins: [bins + 1] float64."""
        return -1.0 + 2.0 * np.arange(self.bins + 1, dtype=np.float64) / self.bins

    def add(self, scores: torch.Tensor) -> None:
        """Count a batch of cosine scores (any shape)."""
        s = scores.detach().reshape(-1).double()
        if s.numel() == 0:
            return
        total = float(s.sum())
        if not math.isfinite(total):  # any NaN or infinity makes the sum non-finite
            raise ValueError("scores: contains NaN or infinite values")
        k = torch.floor((s + 1.0) * (self.bins / 2)).clamp_(0, self.bins - 1).long()
        self.counts += torch.bincount(k, minlength=self.bins).cpu().numpy()
        self.total += total

    def compact(self) -> dict[str, Any]:
        """JSON form: the counts from the first to the last non-empty bin, and where they start."""
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            return {"bins": self.bins, "start": 0, "counts": [], "n": 0}
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        return {"bins": self.bins, "start": lo, "counts": self.counts[lo:hi].tolist(), "n": self.n}


@dataclass(frozen=True)
class ErrorRates:
    thresholds: np.ndarray  # [bins + 1] the bin edges
    fmr: np.ndarray  # [bins + 1] share of impostor scores >= threshold (1 at -1, 0 at the top edge)
    fnmr: np.ndarray  # [bins + 1] share of genuine scores < threshold (0 at -1, 1 at the top edge)
    genuine: int  # genuine scores counted
    impostor: int  # impostor scores counted


def error_rates(genuine: ScoreHistogram, impostor: ScoreHistogram) -> ErrorRates:
    """FMR and FNMR at every bin edge. Both histograms need the same bins and at least one score."""
    if genuine.bins != impostor.bins:
        raise ValueError(f"genuine has {genuine.bins} bins, impostor {impostor.bins}")
    if genuine.n == 0 or impostor.n == 0:
        raise ValueError(f"need genuine and impostor scores, got {genuine.n} and {impostor.n}")
    zero = np.zeros(1, dtype=np.int64)
    at_or_above = np.concatenate([np.cumsum(impostor.counts[::-1])[::-1], zero])  # [bins + 1]
    below = np.concatenate([zero, np.cumsum(genuine.counts)])  # [bins + 1]
    return ErrorRates(genuine.edges, at_or_above / impostor.n, below / genuine.n, genuine.n, impostor.n)


def equal_error_rate(rates: ErrorRates) -> tuple[float, float]:
    """(EER, its threshold): where FNMR - FMR crosses zero, linear between the two edges around it.

    FNMR - FMR rises from -1 at the first edge to +1 at the last; with k the first edge where it is
    >= 0, both rates and the threshold are interpolated between edges k-1 and k at the point where
    the interpolated difference is 0. Off from the empirical EER by at most the share of scores in
    that one bin.
    """
    d = rates.fnmr - rates.fmr  # [bins + 1] non-decreasing
    k = int(np.argmax(d >= 0))
    lam = float(-d[k - 1] / (d[k] - d[k - 1]))
    eer = rates.fmr[k - 1] + lam * (rates.fmr[k] - rates.fmr[k - 1])
    threshold = rates.thresholds[k - 1] + lam * (rates.thresholds[k] - rates.thresholds[k - 1])
    return float(eer), float(threshold)


def fnmr_at_fmr(rates: ErrorRates, fmr: float) -> tuple[float, float] | None:
    """(FNMR, threshold) at the lowest bin edge whose FMR is <= `fmr`.

    None when there are fewer than 1/fmr impostor scores: FMR = fmr cannot be observed then.
    """
    if not 0 < fmr < 1:
        raise ValueError(f"fmr: must lie in (0, 1), got {fmr}")
    if rates.impostor < math.ceil(1 / fmr - 1e-9):
        return None
    k = int(np.argmax(rates.fmr <= fmr))  # the top edge has FMR 0, so one exists
    return float(rates.fnmr[k]), float(rates.thresholds[k])


def roc_points(rates: ErrorRates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, FMR, FNMR) at the edges where either rate changes, plus both ends: ROC/DET points."""
    change = np.ones_like(rates.fmr, dtype=bool)
    change[1:-1] = (np.diff(rates.fmr)[:-1] != 0) | (np.diff(rates.fnmr)[:-1] != 0)
    return rates.thresholds[change], rates.fmr[change], rates.fnmr[change]


# ---- genuine and impostor scores -----------------------------------------------------------


def genuine_scores(x: torch.Tensor) -> torch.Tensor:
    """Cosines of all within-identity pairs (s < t): [..., A, E] unit -> [..., A(A-1)/2]."""
    if x.ndim < 2:
        raise ValueError(f"x: expected [..., A, E], got shape {tuple(x.shape)}")
    a = x.shape[-2]
    i, j = torch.triu_indices(a, a, offset=1, device=x.device)  # [P], [P]
    gram = x @ x.transpose(-1, -2)  # [..., A, A]
    return gram[..., i, j]  # [..., P]


def impostor_scores(x: torch.Tensor, labels: torch.Tensor, tile: int = DEFAULT_TILE) -> Iterator[torch.Tensor]:
    """Cosines of all pairs i < j of rows of x [N, E] whose labels [N] differ, one tile at a time."""
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"x, labels: expected [N, E] and [N], got {tuple(x.shape)} and {tuple(labels.shape)}")
    for i0, i1, j0, j1 in gram_tiles(x.shape[0], tile):
        s = x[i0:i1] @ x[j0:j1].T  # [ti, tj]
        keep = labels[i0:i1, None] != labels[None, j0:j1]  # [ti, tj]
        if i0 == j0:
            keep &= torch.ones_like(keep).triu(diagonal=1)
        yield s[keep]


def impostor_pair_count(labels: torch.Tensor) -> int:
    """Number of pairs i < j with different labels: (N² - sum over labels of n_c²) / 2."""
    sizes = torch.unique(labels, return_counts=True)[1].long()
    n = int(labels.numel())
    return (n * n - int((sizes * sizes).sum())) // 2


# ---- identity centres ----------------------------------------------------------------------


def centres(x: torch.Tensor) -> torch.Tensor:
    """Each identity's centre, the normalised mean of its embeddings: [n, A, E] -> [n, E]."""
    return torch.nn.functional.normalize(x.mean(dim=-2), dim=-1)


def intra_class_cosine(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per identity, the mean cosine of its images [n, A, E] to its centre [n, E]: [n]."""
    return torch.einsum("nae,ne->na", x, c).mean(dim=1)


@dataclass(frozen=True)
class Separability:
    nn_angle: torch.Tensor  # [N] radians from each centre to its nearest other centre
    nn_index: torch.Tensor  # [N] row of that nearest centre
    min_angle: float  # radians, the smallest pairwise centre angle (= min of nn_angle)


def separability(c: torch.Tensor, tile: int = DEFAULT_TILE) -> Separability:
    """Nearest-neighbour and minimum angles between centres [N >= 2, E], tiled."""
    _, index = nearest_neighbours(c, tile)  # [N]
    angles = pair_angles(c.float(), c.float()[index])  # [N]
    return Separability(angles, index, float(angles.min()))


@dataclass(frozen=True)
class ClosePairs:
    pairs: list[tuple[int, int, float]]  # (row i, row j > i, cosine), highest cosine first, at most top_k
    count: int  # pairs with cosine >= threshold
    identities: int  # rows in at least one such pair


def close_pairs(c: torch.Tensor, threshold: float, top_k: int = 50, tile: int = DEFAULT_TILE) -> ClosePairs:
    """Pairs of centres [N, E] whose cosine is >= `threshold`: the top `top_k`, their count, and
    how many identities they involve. Tiled over the upper triangle."""
    n = c.shape[0]
    involved = torch.zeros(n, dtype=torch.bool, device=c.device)  # [N]
    best = torch.empty(0, device=c.device)
    rows = torch.empty(0, dtype=torch.long, device=c.device)
    cols = torch.empty(0, dtype=torch.long, device=c.device)
    count = 0
    for i0, i1, j0, j1 in gram_tiles(n, tile):
        s = c[i0:i1] @ c[j0:j1].T  # [ti, tj]
        hit = s >= threshold
        if i0 == j0:
            hit &= torch.ones_like(hit).triu(diagonal=1)
        ii, jj = hit.nonzero(as_tuple=True)  # [H], [H]
        if ii.numel() == 0:
            continue
        count += ii.numel()
        involved[ii + i0] = True
        involved[jj + j0] = True
        best = torch.cat([best, s[ii, jj]])
        rows, cols = torch.cat([rows, ii + i0]), torch.cat([cols, jj + j0])
        if best.numel() > top_k:
            keep = torch.topk(best, top_k).indices
            best, rows, cols = best[keep], rows[keep], cols[keep]
    order = sorted(zip(best.tolist(), rows.tolist(), cols.tolist()), key=lambda t: (-t[0], t[1], t[2]))
    return ClosePairs([(i, j, v) for v, i, j in order], count, int(involved.sum()))


# ---- label flips and leakage ---------------------------------------------------------------


def nearest_centres(x: torch.Tensor, c: torch.Tensor, exclude: torch.Tensor | None = None,
                    tile: int = DEFAULT_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of x [B, E], the highest cosine to a row of c [N, E] and that row: ([B], [B]).

    Row `exclude[b]` of c is skipped for x[b] (its own identity). Tiled over both B and N.
    """
    b = x.shape[0]
    best = torch.full((b,), -math.inf, device=x.device)  # [B]
    index = torch.full((b,), -1, dtype=torch.long, device=x.device)  # [B]
    for r0 in range(0, b, tile):
        for c0 in range(0, c.shape[0], tile):
            s = x[r0:r0 + tile] @ c[c0:c0 + tile].T  # [tr, tc]
            if exclude is not None:
                own = exclude[r0:r0 + tile] - c0  # [tr]
                inside = (own >= 0) & (own < s.shape[1])
                s[inside.nonzero(as_tuple=True)[0], own[inside]] = -math.inf
            v, k = s.max(dim=1)  # [tr]
            better = v > best[r0:r0 + tile]
            best[r0:r0 + tile] = torch.where(better, v, best[r0:r0 + tile])
            index[r0:r0 + tile] = torch.where(better, k + c0, index[r0:r0 + tile])
    return best, index


@dataclass(frozen=True)
class LabelFlips:
    own: torch.Tensor  # [B] cosine of each image to its own identity's centre
    other: torch.Tensor  # [B] highest cosine to another identity's centre
    other_index: torch.Tensor  # [B] row of that centre
    flipped: torch.Tensor  # [B] bool: other > own, the image sits closer to another identity

    @property
    def count(self) -> int:
        return int(self.flipped.sum())

    def first(self, k: int) -> list[int]:
        """Positions of the first k flipped images."""
        return self.flipped.nonzero(as_tuple=True)[0][:k].tolist()

    def worst(self, k: int) -> list[int]:
        """Positions of up to k flipped images with the largest margin other - own, worst first."""
        pos = self.flipped.nonzero(as_tuple=True)[0]
        margin = (self.other - self.own)[pos]
        return pos[torch.argsort(margin, descending=True, stable=True)[:k]].tolist()


def label_flips(x: torch.Tensor, own_rows: torch.Tensor, c: torch.Tensor,
                tile: int = DEFAULT_TILE) -> LabelFlips:
    """Images x [B, E] of identities `own_rows` [B] (rows of the centres c [N, E]) whose cosine to
    another identity's centre exceeds the cosine to their own."""
    if own_rows.shape != (x.shape[0],):
        raise ValueError(f"own_rows: expected [{x.shape[0]}], got {tuple(own_rows.shape)}")
    own = (x * c[own_rows]).sum(dim=1)  # [B]
    if c.shape[0] < 2:
        none = torch.full_like(own, -math.inf)
        return LabelFlips(own, none, torch.full_like(own_rows, -1), torch.zeros_like(own, dtype=torch.bool))
    other, index = nearest_centres(x, c, exclude=own_rows, tile=tile)
    return LabelFlips(own, other, index, other > own)


@dataclass(frozen=True)
class Leakage:
    max_cosine: torch.Tensor  # [N] each identity centre's highest cosine to the reference set
    nearest: torch.Tensor  # [N] the reference row it is closest to
    leaked: list[int]  # identity rows with max_cosine >= threshold, ascending
    top_pairs: list[tuple[int, int, float]]  # (identity row, reference row, cosine), highest first


def leakage(c: torch.Tensor, reference: torch.Tensor, threshold: float, top_k: int = 20,
            tile: int = DEFAULT_TILE) -> Leakage:
    """Identity centres c [N, E] against a reference set [M, E] of real people, tiled: each centre's
    closest reference row, the identities at or above `threshold`, and the `top_k` closest
    (identity, reference) pairs, one per identity."""
    if reference.ndim != 2 or reference.shape[0] == 0 or reference.shape[1] != c.shape[1]:
        raise ValueError(f"reference: expected [M >= 1, {c.shape[1]}], got {tuple(reference.shape)}")
    best, index = nearest_centres(c, reference, tile=tile)
    leaked = (best >= threshold).nonzero(as_tuple=True)[0].tolist()
    order = torch.argsort(best, descending=True, stable=True)[:top_k].tolist()
    return Leakage(best, index, leaked, [(i, int(index[i]), float(best[i])) for i in order])
