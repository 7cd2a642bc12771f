"""Named seeds: every random draw is addressed by (job seed, purpose, indices).

`derive_seed(job_seed, "identity", i)` and `derive_seed(job_seed, "sample", i, s)` give each
identity and each image its own stream, so any shard of a job reproduces exactly the rows that
the whole job would have produced. Nothing here touches the global RNG.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SEED_BITS = 63  # derived seeds lie in [0, 2**63): they fit a signed int64 everywhere
# How derive_seed works, in words, for manifests that must let others reproduce a dataset.
DERIVE_SEED_SCHEME = (
    "derive_seed(*parts) = int.from_bytes(sha256(json.dumps(list(parts), separators=(',', ':'))"
    ".encode()).digest()[:8], 'big') >> 1"
)


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


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh `torch.Generator` on `device`, seeded with `seed` (an int in [0, 2**64))."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: must be an int in [0, 2**64), got {seed!r}")
    generator = torch.Generator(device=torch.device(device))
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
