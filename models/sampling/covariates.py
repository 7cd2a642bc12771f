"""DisCo covariates: latent directions of pose, illumination, expression, and their scales.

DisCo (Geissbühler, Otroshi Shahreza & Marcel, ICML 2025) starts each Dispersion variation at
  w_ia = w_i + 0.2 xi_ia + sum_k u_iak scale_k dir_k,   u_iak ~ U(-0.5, 0.5),
where dir_k is the unit normal of a linear SVM separating W latents of faces labelled with two
classes of covariate k (left/right pose, left/right lighting, neutral/smiling, ...), fitted as in
idiap/face_synthetics `latent_analysis.py`: LinearSVC(fit_intercept=False, C=1, max_iter=10000),
so the hyperplane passes through the origin of W. With d_m = <w_m, dir_k> the signed distances of
the covariate's training latents, scale_k = max(-mean(d_m < 0), mean(d_m > 0)): the reference
groups the distances by their sign (on a separable set, by class). A side with no latents counts 0.

File format (safetensors, written by `Covariates.save`; docs/covariates.md):
  "directions"  float32 [K, D]  unit rows
  "scales"      float32 [K]     W units
  metadata: one key, "idforge.covariates", whose value is canonical JSON (sorted keys)
    {"format": "idforge.covariates/1", "names": [K names], "info": {...}}.
One key only: safetensors writes a multi-key metadata map in a per-process random order, and the
file's bytes must be reproducible.

u_iak is drawn from derive_seed(seed, "disco", identity, a) -> rand(K), so offsets do not depend
on which identities share a call.
"""

from __future__ import annotations

import copy
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from models.seeding import COVARIATES_TINY, DISCO, build_generator, derive_seed, make_generator, portable

FORMAT = "idforge.covariates/1"  # metadata "format" of files written here
METADATA_KEY = "idforge.covariates"  # the single safetensors metadata key
UNIT_TOLERANCE = 1e-4  # |‖dir_k‖ - 1| allowed when loading or building Covariates
SVM_MAX_ITER = 10000  # LinearSVC iterations, as the reference
EXCLUDED = -1  # label value: the latent takes no part in this covariate's fit


@dataclass(frozen=True, eq=False)
class Covariates:
    names: tuple[str, ...]  # K covariate names, e.g. ("pose", "illumination", "expression")
    directions: torch.Tensor  # [K, D] unit normals of the separating hyperplanes in W
    scales: torch.Tensor  # [K] max(-mean negative, mean positive) signed distance, W units
    info: dict[str, Any] = field(default_factory=dict)  # provenance (JSON-serialisable), saved with them

    def __post_init__(self) -> None:
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        if not names or any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"names: expected distinct non-empty strings, got {names!r}")
        d = self.directions
        if not isinstance(d, torch.Tensor) or d.ndim != 2 or d.shape[0] != len(names) or not d.is_floating_point():
            raise ValueError(f"directions: expected a float tensor [{len(names)}, D], got "
                             f"{getattr(d, 'shape', type(d))}")
        if not torch.isfinite(d).all() or ((d.double().norm(dim=1) - 1).abs() > UNIT_TOLERANCE).any():
            raise ValueError("directions: rows must be finite unit vectors")
        s = self.scales
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (len(names),) or not torch.isfinite(s).all():
            raise ValueError(f"scales: expected a finite tensor [{len(names)}], got {getattr(s, 'shape', type(s))}")
        try:
            json.dumps(self.info)
        except TypeError as exc:
            raise ValueError(f"info: must be JSON-serialisable ({exc})") from None

    @property
    def dim(self) -> int:
        return int(self.directions.shape[1])

    def to_bytes(self) -> bytes:
        """The safetensors file as bytes (deterministic for equal contents)."""
        meta = json.dumps({"format": FORMAT, "names": list(self.names), "info": self.info},
                          sort_keys=True, separators=(",", ":"))
        tensors = {"directions": self.directions.detach().float().cpu().contiguous(),
                   "scales": self.scales.detach().float().cpu().contiguous()}
        return st_save(tensors, metadata={METADATA_KEY: meta})

    def save(self, path: str | Path) -> Path:
        """Write the safetensors file to `path` and return it."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Covariates:
        """Read a file written by `save`; ValueError naming `path` for anything else."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: no such file {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = (f.metadata() or {}).get(METADATA_KEY)
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys & {"directions", "scales"}}
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"path: {str(path)!r} is not a safetensors file ({exc})") from None
        if meta is None:
            raise ValueError(f"path: {str(path)!r} has no {METADATA_KEY!r} metadata (not a covariates file)")
        try:
            header = json.loads(meta)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("names"), list):
            raise ValueError(f"path: {str(path)!r} metadata is not {FORMAT!r} with a list of names")
        missing = {"directions", "scales"} - keys
        if missing:
            raise ValueError(f"path: {str(path)!r} lacks tensors {sorted(missing)}")
        return cls(names=tuple(header["names"]), directions=tensors["directions"], scales=tensors["scales"],
                   info=dict(header.get("info", {})))


# --- DisCo offsets ------------------------------------------------------------------------------


def disco_offsets(covariates: Covariates, identities: Sequence[int], variations: int, seed: int,
                  scaling: Mapping[str, float] | None = None, first_variation: int = 0) -> torch.Tensor:
    """sum_k u_iak scaling_k scale_k dir_k, u ~ U(-0.5, 0.5): [n, A, D] on the directions' device;
    column a is variation `first_variation + a`.

    scaling: optional per-name multipliers (the reference's pose / illumination / expression
    scalings, all 1 by default); names not given keep 1.
    """
    if not isinstance(covariates, Covariates):
        raise ValueError(f"covariates: expected Covariates, got {type(covariates).__name__}")  # noqa: TRY004
    ids = list(identities)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"identities: expected ints, got {ids[:8]}")
    if isinstance(variations, bool) or not isinstance(variations, int) or variations < 1:
        raise ValueError(f"variations: expected an int >= 1, got {variations!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")  # noqa: TRY004
    factors = torch.ones(len(covariates.names))  # [K]
    for name, value in (scaling or {}).items():
        if name not in covariates.names:
            raise ValueError(f"scaling: unknown covariate {name!r}; known: {list(covariates.names)}")
        factors[covariates.names.index(name)] = float(value)
    k = len(covariates.names)
    u = torch.empty(len(ids), variations, k)  # [n, A, K]
    for i, identity in enumerate(ids):
        for a in range(variations):
            u[i, a] = make_generator(derive_seed(seed, DISCO, identity, first_variation + a)).uniform(k)
    u -= 0.5
    directions = covariates.directions.float()  # [K, D]
    scaled = (factors * covariates.scales.float().cpu()).to(directions.device)[:, None] * directions  # [K, D]
    return torch.einsum("iak,kd->iad", u.to(directions.device), scaled)  # [n, A, D]


# --- fitting ------------------------------------------------------------------------------------


def signed_distance_scale(distances: np.ndarray) -> float:
    """max(-mean of the negative distances, mean of the positive ones); an empty side counts 0."""
    neg = distances[distances < 0]
    pos = distances[distances > 0]
    return float(max(-neg.mean() if neg.size else 0.0, pos.mean() if pos.size else 0.0))


def _fit_one(latents: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, float, dict[str, Any]]:
    from sklearn.svm import LinearSVC

    keep = labels != EXCLUDED
    x, y = latents[keep], labels[keep]
    svm = LinearSVC(fit_intercept=False, C=1.0, max_iter=SVM_MAX_ITER, dual="auto", random_state=seed)
    svm.fit(x, y)
    coef = svm.coef_.reshape(-1).astype(np.float64)  # [D], points toward class 1
    normal = coef / np.linalg.norm(coef)
    distances = x.astype(np.float64) @ normal  # [m]
    accuracy = float(((distances > 0).astype(np.int64) == y).mean())
    stats = {"samples": int(y.size), "positives": int(y.sum()), "train_accuracy": round(accuracy, 6)}
    return normal, signed_distance_scale(distances), stats


def fit_covariates(latents: torch.Tensor, labels: Mapping[str, torch.Tensor], seed: int = 0) -> Covariates:
    """One linear SVM per covariate on W latents [M, D]; labels[name]: [M] ints in {0, 1, -1}.

    Class 1 lies on the positive side of dir_k. -1 leaves a latent out of that covariate's fit (the
    reference fits e.g. pose on left vs right views only, frontal ones excluded). seed: LinearSVC's
    random_state (its coordinate-descent order), so the fit is reproducible.
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim != 2 or not latents.is_floating_point():
        raise ValueError(f"latents: expected a float tensor [M, D], got {getattr(latents, 'shape', type(latents))}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents: contains non-finite values")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError("labels: expected a non-empty mapping name -> [M] class ids")
    x = latents.detach().double().cpu().numpy()  # [M, D]
    names, normals, scales, info = [], [], [], {}
    for name, y in labels.items():
        where = f"labels[{name!r}]"
        if not isinstance(name, str) or not name:
            raise ValueError(f"labels: names must be non-empty strings, got {name!r}")
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.is_floating_point() or y.is_complex():
            raise ValueError(f"{where}: expected an integer tensor [M], got {getattr(y, 'dtype', type(y))}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{where}: length {y.shape[0]} does not match latents' {x.shape[0]} rows")
        yn = y.detach().cpu().long().numpy()
        if not np.isin(yn, (EXCLUDED, 0, 1)).all():
            raise ValueError(f"{where}: values must be 0, 1 or {EXCLUDED} (excluded), got {sorted(set(yn.tolist()))[:8]}")
        if not ((yn == 0).any() and (yn == 1).any()):
            raise ValueError(f"{where}: needs at least one latent of each class 0 and 1")
        normal, scale, stats = _fit_one(x, yn, seed)
        names.append(name)
        normals.append(normal)
        scales.append(scale)
        info[name] = stats
    directions = torch.from_numpy(np.stack(normals)).float()  # [K, D]
    directions = directions / directions.norm(dim=1, keepdim=True)
    method = f"LinearSVC(fit_intercept=False, C=1, max_iter={SVM_MAX_ITER}, random_state={seed})"
    return Covariates(names=tuple(names), directions=directions, scales=torch.tensor(scales, dtype=torch.float32),
                      info={"method": method, "covariates": info})


LABEL_PREFIX = "label."  # input-file key of covariate NAME's labels: "label.NAME"


def read_labelled_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The `latents` [M, D] and `label.NAME` [M] arrays of a .safetensors or .npz file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no such file {str(path)!r}")
    if path.suffix not in (".npz", ".safetensors"):
        raise ValueError(f"path: expected a .safetensors or .npz file, got {str(path)!r}")
    arrays: dict[str, np.ndarray] = {}
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:  # object arrays (pickles) are refused
                arrays = {k: z[k] for k in z.files}
        else:
            with safe_open(str(path), framework="np") as f:
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    except (SafetensorError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"path: cannot read {str(path)!r} ({exc})") from None
    if "latents" not in arrays:
        raise ValueError(f"path: {str(path)!r} has no 'latents' array (keys: {sorted(arrays)[:8]})")
    latents = torch.from_numpy(np.asarray(arrays["latents"]).copy())
    if not latents.is_floating_point():
        raise ValueError(f"path: 'latents' must be floating point, got {latents.dtype}")
    labels = {k[len(LABEL_PREFIX):]: torch.from_numpy(np.asarray(v).copy())
              for k, v in sorted(arrays.items()) if k.startswith(LABEL_PREFIX)}
    if not labels:
        raise ValueError(f"path: {str(path)!r} has no '{LABEL_PREFIX}NAME' label arrays")
    return latents, labels


def fit_from_file(path: str | Path, seed: int = 0) -> Covariates:
    """`fit_covariates` on a labelled-latents file (format: docs/covariates.md)."""
    latents, labels = read_labelled_latents(path)
    covariates = fit_covariates(latents, labels, seed=seed)
    info = {**covariates.info, "source": Path(path).name}
    return Covariates(covariates.names, covariates.directions, covariates.scales, info)


# --- the tiny preset's covariates ---------------------------------------------------------------

TINY_PSI = 0.7  # truncation of the tiny preset's labelled latents (as identities are sampled)
TINY_DECIMALS = 6  # directions and scales are rounded to this many decimals, so that last-bit float
# differences between platforms rarely change the file's bytes (same platform: always identical)


def image_properties(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Measurable stand-ins for covariates of images [B, 3, S, S] in [-1, 1]: name -> [B] float64.

    pose: left-half minus right-half mean luma (a turned head shifts mass sideways);
    illumination: mean luma; expression: luma contrast (std) of the lower third (the mouth).
    """
    luma = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).double()  # [B, S, S]
    s = luma.shape[-1]
    return {
        "pose": luma[..., : s // 2].mean(dim=(1, 2)) - luma[..., s - s // 2:].mean(dim=(1, 2)),
        "illumination": luma.mean(dim=(1, 2)),
        "expression": luma[:, s - s // 3:, :].std(dim=(1, 2)),
    }


def extreme_thirds(values: torch.Tensor) -> torch.Tensor:
    """Labels [M]: 1 for the top third, 0 for the bottom third, -1 (excluded) between (stable order)."""
    m = values.shape[0]
    order = torch.sort(values, stable=True).indices  # [M]
    labels = torch.full((m,), EXCLUDED, dtype=torch.long)
    labels[order[: m // 3]] = 0
    labels[order[m - m // 3:]] = 1
    return labels


def tiny_covariates(generator: Any, seed: int, n: int = 512, batch_size: int = 64) -> Covariates:
    """Covariates of a (tiny) StyleGAN2 fitted from its own images: deterministic given `seed`.

    n latents w = truncate(mapping(z), 0.7), z from derive_seed(seed, "covariates.tiny", m), are
    rendered (constant noise) and labelled by `image_properties` (top third 1, bottom third 0,
    middle excluded, as the reference keeps only the extreme classes), then `fit_covariates`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 6:
        raise ValueError(f"n: expected an int >= 6 (two per class at least), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")  # noqa: TRY004
    d = int(generator.style_dim)
    z = torch.stack([torch.randn(d, generator=build_generator(derive_seed(seed, COVARIATES_TINY, m)))
                     for m in range(n)])  # [n, D]
    # float64 on the CPU, latents rounded (`portable`): the labels and the fit, hence the file's
    # bytes, must not depend on the thread count or the CPU
    g = copy.deepcopy(generator).cpu().double()
    latents, props = [], []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            w = g.truncate(g.mapping(z[s:s + batch_size].double()), TINY_PSI)  # [b, D] float64
            latents.append(portable(w))  # [b, D] float32
            props.append(image_properties(g.synthesis(latents[-1].double(), noise_mode="const")))
    w_all = torch.cat(latents)  # [n, D]
    labels = {name: extreme_thirds(torch.cat([p[name] for p in props])) for name in props[0]}
    covariates = fit_covariates(w_all, labels, seed=seed)
    info = {**covariates.info, "source": f"tiny_covariates(seed={seed}, n={n}, psi={TINY_PSI})"}
    return Covariates(covariates.names, covariates.directions.double().round(decimals=TINY_DECIMALS).float(),
                      covariates.scales.double().round(decimals=TINY_DECIMALS).float(), info)
