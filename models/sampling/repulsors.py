"""Fixed repulsors: points a packing must keep a stated angle from (`sampler.exclude`).

The excluded identities do not move and are not packed: each is the centre of a cap of half-angle
`min_angle` that no moving point may end inside. The optimiser keeps its points out by projection
after every step: a point inside a cap moves along the great circle from the cap's centre through
the point to `min_angle + margin` from the centre, which is the nearest point outside that cap.
For a point inside several caps, `sweeps` rounds each leave the cap the point is deepest in.

The excluded set may hold 10^6 embeddings, so the [N, M] cosine matrix is never held: each point's
`neighbours` nearest fixed points come from a tiled top-k (`nearest_fixed`), refreshed every
`refresh` steps and kept in between (a step moves a point far less than the gaps between caps it
is not near), and at the end `clear` checks every point against every fixed one, tiled, and
projects again until none is inside a cap. A point that cannot be cleared (caps that cover its
whole neighbourhood) is left for the caller's check (`workers.exclusion.enforce`), which fails the
job saying how close it got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.sampling.sphere import EPS

TILE = 8192  # rows and columns of one tile of the [N, M] cosines
ROW_CHUNK = 4096  # points projected at once ([chunk, k, D] gathered fixed points)
CLEAR_ROUNDS = 8  # full checks (and projections) at the end before giving up on a point


@dataclass(frozen=True)
class Repulsors:
    points: torch.Tensor  # [M, D] unit rows that do not move
    min_angle: float  # radians: no moving point may end closer to one of them
    neighbours: int = 8  # fixed points each moving point is checked against between refreshes
    refresh: int = 10  # steps between recomputing each point's nearest fixed points
    margin: float = 1e-4  # radians past min_angle a projected point is put (float32 rounding)
    sweeps: int = 4  # projections per step for a point inside several caps

    def __post_init__(self) -> None:
        if self.points.ndim != 2 or self.points.shape[0] < 1:
            raise ValueError(f"points: expected [M, D] with M >= 1, got {tuple(self.points.shape)}")
        if not 0 < self.min_angle < math.pi:
            raise ValueError(f"min_angle: expected (0, pi) radians, got {self.min_angle}")
        for name in ("neighbours", "refresh", "sweeps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.margin < 0.1:
            raise ValueError(f"margin: expected [0, 0.1) radians, got {self.margin}")

    @property
    def cos_bound(self) -> float:
        return math.cos(self.min_angle)

    def on(self, device: torch.device) -> Repulsors:
        """The same repulsors with their points as float32 on `device`."""
        pts = self.points.to(device, torch.float32)
        return self if pts is self.points else Repulsors(pts, self.min_angle, self.neighbours, self.refresh,
                                                         self.margin, self.sweeps)


def nearest_fixed(x: torch.Tensor, fixed: torch.Tensor, k: int, tile: int = TILE) -> torch.Tensor:
    """Each row of x's k nearest rows of `fixed` by cosine (fewer when M < k), tiled: [N, min(k, M)]
    int64, nearest first. x [N, D] and fixed [M, D] unit rows; memory O(tile² + N k)."""
    if x.ndim != 2 or fixed.ndim != 2 or x.shape[1] != fixed.shape[1]:
        raise ValueError(f"x and fixed: expected [N, D] and [M, D], got {tuple(x.shape)} and {tuple(fixed.shape)}")
    k = min(k, fixed.shape[0])
    out = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    for n0 in range(0, x.shape[0], tile):
        rows = x[n0:n0 + tile]
        best_v = torch.full((rows.shape[0], k), -math.inf, device=x.device)
        best_i = torch.zeros(rows.shape[0], k, dtype=torch.long, device=x.device)
        for m0 in range(0, fixed.shape[0], tile):
            c = rows @ fixed[m0:m0 + tile].T  # [tn, tm]
            v, i = c.topk(min(k, c.shape[1]), dim=1)
            best_v, where = torch.cat([best_v, v], dim=1).topk(k, dim=1)
            best_i = torch.cat([best_i, i + m0], dim=1).gather(1, where)
        out[n0:n0 + tile] = best_i
    return out


def push_out(x: torch.Tensor, rep: Repulsors, nearest: torch.Tensor) -> torch.Tensor:
    """x [N, D] unit rows with every point that lies inside the cap of one of its `nearest` fixed
    points ([N, k] indices into rep.points) moved out of it (up to rep.sweeps times), in place."""
    bound = rep.cos_bound
    rim = rep.min_angle + rep.margin
    for n0 in range(0, x.shape[0], ROW_CHUNK):
        xs = x[n0:n0 + ROW_CHUNK]  # a view: updated in place
        near = rep.points[nearest[n0:n0 + ROW_CHUNK]]  # [c, k, D]
        for _ in range(rep.sweeps):
            cos = torch.bmm(near, xs[:, :, None]).squeeze(2)  # [c, k]
            worst, j = cos.max(dim=1)
            inside = torch.nonzero(worst > bound).flatten()
            if inside.numel() == 0:
                break
            centre = near[inside, j[inside]]  # [b, D]
            xs[inside] = _rim_point(xs[inside], centre, worst[inside], rim)
    return x


def _rim_point(x: torch.Tensor, centre: torch.Tensor, cos: torch.Tensor, angle: float) -> torch.Tensor:
    """The points at `angle` from `centre` on the great circles from `centre` through x ([b, D] each,
    cos = <x, centre>); a point at the centre itself leaves along the first axis it is not parallel to."""
    u = x - cos[:, None] * centre  # [b, D] the direction away from the centre, tangent at it
    norm = u.norm(dim=1)
    flat = norm <= 1e-6
    if bool(flat.any()):  # x == centre: any tangent direction; the first basis vector not along it
        axis = torch.zeros_like(centre[flat])
        axis[torch.arange(axis.shape[0]), (centre[flat].abs() < 0.9).float().argmax(dim=1)] = 1.0
        u[flat] = axis - (axis * centre[flat]).sum(dim=1, keepdim=True) * centre[flat]
        norm = u.norm(dim=1)
    u = u / norm[:, None].clamp_min(EPS)
    out = math.cos(angle) * centre + math.sin(angle) * u
    return out / out.norm(dim=1, keepdim=True).clamp_min(EPS)


def clear(x: torch.Tensor, rep: Repulsors, rounds: int = CLEAR_ROUNDS, tile: int = TILE) -> torch.Tensor:
    """x with every point checked against every fixed point (tiled) and projected out of the caps it
    is in, repeated until none is or `rounds` have run; in place."""
    for _ in range(rounds):
        nearest = nearest_fixed(x, rep.points, rep.neighbours, tile)  # [N, k]
        near = rep.points[nearest[:, 0]]  # [N, D]
        if float((near * x).sum(dim=1).max()) <= rep.cos_bound:
            break
        push_out(x, rep, nearest)
    return x
