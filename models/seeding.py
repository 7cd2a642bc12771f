"""Named seeds and portable random streams: every draw is addressed by (job seed, purpose, indices).

`derive_seed(job_seed, "identity", i)` and `derive_seed(job_seed, "sample", i, s)` give each
identity and each image its own stream, so any shard of a job reproduces exactly the rows that
the whole job would have produced. Nothing here touches the global RNG.

`make_generator(seed)` returns a `Stream`, whose draws are the same bits on every machine. torch's
CPU samplers (`randn`, `uniform_`, `normal_`) are vectorised per instruction set, so the same
seeded `torch.Generator` gives other bits under AVX2 than under AVX-512 or the scalar path, and
CUDA's generator is another stream again. A `Stream` instead reads 64-bit words from numpy's
Philox4x64-10 (keyed by the seed: integer arithmetic, and numpy keeps bit generators' streams
stable across releases) and turns them into floats with exactly rounded IEEE operations only
(shifts, products by powers of two, +, -, *, /, sqrt; its logarithm is a fixed polynomial, never
libm or a SIMD math library). The result is made on the CPU and then moved to the stream's device.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

SEED_BITS = 63  # derived seeds lie in [0, 2**63): they fit a signed int64 everywhere
# How derive_seed works, in words, for manifests that must let others reproduce a dataset.
DERIVE_SEED_SCHEME = (
    "derive_seed(*parts) = int.from_bytes(sha256(json.dumps(list(parts), separators=(',', ':'))"
    ".encode()).digest()[:8], 'big') >> 1"
)


# ---- seed purposes: each spelled here only ----------------------------------------------------
# The second part of a job's derive_seed(job_seed, PURPOSE, ...): which draw a stream feeds. The
# strings are part of every pinned byte, so they never change; `PURPOSES` says what each seeds.
IDENTITY = "identity"
VARIATION = "variation"
RENDER = "render"
GALLERY = "gallery"
GALLERY_RENDER = "gallery-render"
HYPERFACE_INIT = "hyperface-init"
HYPERFACE = "hyperface"
LANGEVIN = "langevin"
LANGEVIN_NOISE = "noise"
DISPERSION_INIT = "dispersion.init"
DISPERSION_NOISE = "dispersion.noise"
DISCO = "disco"
COVARIATES_TINY = "covariates.tiny"
REPORT_IMPOSTOR = "report.impostor"
REPORT_EVALUATOR = "report.evaluator"
EXCLUDE_REDRAW = "exclude.redraw"

PURPOSES: dict[str, str] = {
    IDENTITY: "identity i's reference: a uniform embedding (random sampler) or its z ~ N(0, I) "
              "(latent generators, Langevin's initial latents)",
    VARIATION: "sample (i, s)'s embedding-noise draw around its reference",
    RENDER: "sample (i, s)'s diffusion noise",
    GALLERY: "HyperFace gallery item k's conditioning embedding (or latent z)",
    GALLERY_RENDER: "HyperFace gallery item k's diffusion noise",
    HYPERFACE_INIT: "HyperFace's initial points, picked from the gallery",
    HYPERFACE: "HyperFace's stochastic batches",
    LANGEVIN: "the Langevin run's seed, under which LANGEVIN_NOISE streams are derived",
    LANGEVIN_NOISE: "Langevin's noise of identity i at step t, derived from the LANGEVIN seed",
    DISPERSION_INIT: "Dispersion's initial offset of sample (i, s)",
    DISPERSION_NOISE: "Dispersion's random force on sample (i, s) at step t",
    DISCO: "DisCo's covariate mix of sample (i, s)",
    COVARIATES_TINY: "the tiny preset's covariate-fitting latents (preset builds only)",
    REPORT_IMPOSTOR: "the quality report's impostor pairs and per-identity sample order",
    REPORT_EVALUATOR: "the identities whose images the quality report's independent evaluator embeds",
    EXCLUDE_REDRAW: "random sampler with an exclusion: identity i's k-th redraw (k >= 1) when its draw "
                    "lay too close to an excluded identity",
}


def derive_seed(*parts: int | str) -> int:
    """sha256 of the parts, joined unambiguously (JSON keeps 1 and "1" apart), as an int in [0, 2**63)."""
    if not parts:
        raise ValueError("parts: at least one part is required")
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise ValueError(f"parts: each part must be an int or a str, got {p!r}")
    payload = json.dumps(list(parts), separators=(",", ":"), ensure_ascii=True).encode()
    digest = hashlib.sha256(payload).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


# How a Stream turns its seed into numbers, in words, for the manifest.
STREAM_SCHEME = (
    "word k of stream(seed) = numpy Philox4x64-10 random_raw with key (seed, 0), counter from 0; "
    "float32 uniform = (word >> 40) * 2**-24; float64 uniform = (word >> 11) * 2**-53; "
    "normal = Marsaglia's polar method on pairs u, v = (word >> 11) * 2**-52 - 1 (rejecting s = u*u + v*v "
    "outside (0, 1); log by a fixed 12-term atanh series), computed in float64 and rounded to the dtype; "
    "integers in [0, n) = word % n; permutation(n) = stable argsort of n words"
)
_LN2 = 0.6931471805599453  # log(2) rounded to float64
_ATANH_TERMS = 12  # |t| <= 0.1716 below, so the series' tail is under 1e-19 of its value
_SQRT_HALF = 0.7071067811865476


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log of positive float64 `x` from exactly rounded operations only (same bits everywhere).

    x = m * 2**e with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(t), t = (m - 1) / (m + 1), summed
    by Horner's rule in a fixed order. Accurate to a few ulp, which is all a sampler needs; what
    matters is that no libm or SIMD math routine (whose last bits differ per CPU) is involved.
    """
    m, e = np.frexp(x)  # exact: m in [0.5, 1)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    p = np.full_like(t, 1.0 / (2 * _ATANH_TERMS + 1))
    for k in range(_ATANH_TERMS - 1, -1, -1):
        p = p * t2 + 1.0 / (2 * k + 1)
    return e * _LN2 + 2.0 * t * p


def _size(size: tuple[int | tuple[int, ...] | torch.Size, ...]) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    out = tuple(int(n) for n in size)  # type: ignore[arg-type]
    if any(n < 0 for n in out):
        raise ValueError(f"size: every dimension must be >= 0, got {out}")
    return out


class Stream:
    """A seeded stream of random numbers that are the same bits on every CPU and device.

    The replacement for a seeded `torch.Generator` wherever a job's seed defines the numbers:
    `normal`, `uniform`, `integers` and `permutation` draw on the CPU from Philox words (see
    `STREAM_SCHEME`) and return tensors on `device`. Draws advance the stream like a generator's;
    `get_state`/`set_state` checkpoint it.
    """

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed: must be an int in [0, 2**64), got {seed!r}")
        self.seed = seed
        self.device = torch.device(device)
        self._bits = np.random.Philox(key=seed)

    def words(self, n: int) -> np.ndarray:
        """The next `n` 64-bit words: [n] uint64."""
        return self._bits.random_raw(n)  # type: ignore[no-any-return]

    def _out(self, x: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x).reshape(shape))
        return t.to(device=self.device, dtype=dtype if dtype is not None else t.dtype)

    def uniform(self, *size: int | tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform numbers in [0, 1): float32 from 24 bits of a word, float64 from 53 (exact)."""
        shape = _size(size)
        n = math.prod(shape)
        if dtype == torch.float64:
            return self._out((self.words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53, shape, dtype)
        u = (self.words(n) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
        return self._out(u, shape, dtype)

    def normal(self, *size: int | tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal numbers: Marsaglia's polar method in float64, rounded once to `dtype`."""
        shape = _size(size)
        n = math.prod(shape)
        pairs = (n + 1) // 2
        got: list[np.ndarray] = []
        have = 0
        while have < pairs:
            m = pairs - have
            m = m + m // 3 + 16  # the polar method accepts pi/4 of its pairs
            w = (self.words(2 * m) >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0
            u, v = w[0::2], w[1::2]
            s = u * u + v * v
            ok = (s > 0.0) & (s < 1.0)
            u, v, s = u[ok], v[ok], s[ok]
            f = np.sqrt(-2.0 * _log(s) / s)
            z = np.stack([u * f, v * f], axis=1)  # [m', 2]
            z = z[: pairs - have]
            got.append(z)
            have += len(z)
        flat = np.concatenate(got).reshape(-1)[:n] if got else np.zeros(0, np.float64)
        return self._out(flat, shape, dtype)

    def integers(self, high: int, *size: int | tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Integers in [0, high): int64 (`word % high`; the bias is below high / 2**64)."""
        if not 1 <= high < 2**62:
            raise ValueError(f"high: must be in [1, 2**62), got {high}")
        shape = _size(size)
        return self._out((self.words(math.prod(shape)) % np.uint64(high)).astype(np.int64), shape, torch.int64)

    def permutation(self, n: int) -> torch.Tensor:
        """A random permutation of range(n): [n] int64 (stable argsort of n words)."""
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        return self._out(np.argsort(self.words(n), kind="stable").astype(np.int64), (n,), torch.int64)

    def get_state(self) -> torch.Tensor:
        """The stream's position as a uint8 tensor (JSON of the Philox state), for checkpoints."""
        st = self._bits.state
        doc = {"seed": self.seed, "counter": [int(c) for c in st["state"]["counter"]],
               "buffer": [int(b) for b in st["buffer"]], "buffer_pos": int(st["buffer_pos"]),
               "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])}
        return torch.tensor(list(json.dumps(doc, sort_keys=True).encode()), dtype=torch.uint8)

    def set_state(self, state: torch.Tensor) -> None:
        """Continue from a position saved by `get_state`: seed and position both come from `state`."""
        doc = json.loads(bytes(state.tolist()).decode())
        self.seed = int(doc["seed"])
        self._bits = np.random.Philox(key=self.seed)
        st = self._bits.state
        st["state"]["counter"] = np.array(doc["counter"], dtype=np.uint64)
        st["buffer"] = np.array(doc["buffer"], dtype=np.uint64)
        st["buffer_pos"] = doc["buffer_pos"]
        st["has_uint32"] = doc["has_uint32"]
        st["uinteger"] = doc["uinteger"]
        self._bits.state = st


def make_generator(seed: int, device: str | torch.device = "cpu") -> Stream:
    """A fresh portable `Stream` seeded with `seed` (an int in [0, 2**64)), returning tensors on `device`."""
    return Stream(seed, device)


def normalize_exact(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` scaled to unit length with the same bits on every machine: [..., D] -> [..., D].

    A float32 norm is a reduction whose order (and so whose last bit) depends on the CPU's vector
    width. Here the squares are summed in float64 one column at a time, in a fixed order, and the
    division is rounded once to `x`'s dtype. Use it where a job's seed alone defines the points
    (uniform points on the sphere); optimised points go through the ordinary `normalize`.
    """
    d = x.shape[-1]
    x64 = x.detach().to("cpu", torch.float64)
    acc = torch.zeros(x64.shape[:-1], dtype=torch.float64)
    for j in range(d):
        col = x64[..., j]
        acc = acc + col * col
    norm = torch.sqrt(acc).clamp_min(1e-300).unsqueeze(-1)
    return (x64 / norm).to(device=x.device, dtype=x.dtype)


def build_generator(seed: int) -> torch.Generator:
    """A seeded CPU `torch.Generator`, for the scripts that build the tiny presets only.

    Its draws depend on the CPU's vector code paths, which is why the presets' bytes are shipped
    in the repository instead of rebuilt (`models/presets/`); job draws use `make_generator`.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@contextmanager
def seeded_construction(seed: int) -> Iterator[None]:
    """Build modules whose constructors draw from the global CPU RNG, reproducibly.

    Library constructors (diffusers, transformers, torch.nn) initialise weights from the global
    RNG. Inside this block that RNG is a forked copy seeded with `seed`; the caller's RNG state is
    restored on exit, so building a preset never disturbs anyone else's random stream.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: must be an int in [0, 2**63), got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def portable(x: torch.Tensor, decimals: int = 6) -> torch.Tensor:
    """`x` computed in float64, rounded to `decimals` and returned as float32.

    For values a tiny preset computes (BatchNorm statistics, a mean latent) whose bytes are pinned:
    float32 sums change with the thread count and the CPU's vector width; float64 differences sit
    far below the rounding grid, so the rounded values are the same on every machine.
    """
    if x.dtype != torch.float64:
        raise ValueError(f"x: compute it in float64 first, got {x.dtype}")
    return (torch.round(x * 10**decimals) / 10**decimals).float()
