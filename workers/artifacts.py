"""A job's intermediate objects in storage: the shard plan, the identities (and what their sampler
reports), the sampler's checkpoint, the HyperFace gallery's chunks and each shard's marker.

Every key comes from `app.layout.JobKeys`; the pipelines (`workers.pipelines`) and the tasks
(`workers.jobs`, `workers.local`) read and write these objects through the functions here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.errors import StorageKeyMissing
from app.layout import JobKeys
from app.storage import Storage

if TYPE_CHECKING:
    from workers.pipelines.common import Hooks


# ---- identities ------------------------------------------------------------------------------

def save_identities(storage: Storage, keys: JobKeys, embeddings: torch.Tensor,
                    stats: dict[str, Any] | None = None, latents: torch.Tensor | None = None) -> None:
    """The reference embeddings [N, E] (and latents [N, D] of a latent generator), and what the
    sampler reports about them (JSON)."""
    tensors = {"embeddings": embeddings.contiguous().float().cpu()}
    if latents is not None:
        tensors["latents"] = latents.contiguous().float().cpu()
    blob = st_save(tensors, metadata={"format": "idforge.identities/1"})
    storage.put_bytes(keys.identity_stats,
                      json.dumps(stats or {}, sort_keys=True).encode(), "application/json")
    storage.put_bytes(keys.identities, blob, "application/octet-stream")


def identities_stats(storage: Storage, keys: JobKeys) -> dict[str, Any]:
    try:
        stats: dict[str, Any] = json.loads(storage.get_bytes(keys.identity_stats))
    except StorageKeyMissing:
        return {}
    return stats


def identities_checkpoint(storage: Storage, keys: JobKeys) -> dict[str, torch.Tensor] | None:
    """The sampler's latest saved state (tensors), or None when it has not saved one."""
    try:
        return st_load(storage.get_bytes(keys.identity_checkpoint))
    except StorageKeyMissing:
        return None


def checkpoint_every(storage: Storage, keys: JobKeys, hooks: Hooks, *, every: int, total: int,
                     unit: str) -> Callable[[Any, Any], None]:
    """An optimiser's `on_step(stats, state)`: report progress, save `state.to_tensors()` every
    `every` steps (not at the last), then check for cancellation."""
    def on_step(stats: Any, state: Any) -> None:
        hooks.progress(stats.step, total, unit)
        if stats.step % every == 0 and stats.step < total:
            storage.put_bytes(keys.identity_checkpoint, st_save(state.to_tensors()))
            hooks.event("checkpoint", step=stats.step)
        hooks.check()
    return on_step


def load_identities(storage: Storage, keys: JobKeys, rows: range | None = None) -> torch.Tensor:
    """The identities' reference embeddings [N, D], or only `rows` of them (`identity_rows`)."""
    if rows is not None:
        return identity_rows(storage, keys, "embeddings", rows)
    return st_load(storage.get_bytes(keys.identities))["embeddings"]  # [N, D]


def load_identity_latents(storage: Storage, keys: JobKeys, rows: range | None = None) -> torch.Tensor:
    """The identities' W latents [N, D] (latent generators only), or only `rows` of them."""
    if rows is not None:
        return identity_rows(storage, keys, "latents", rows)
    return st_load(storage.get_bytes(keys.identities))["latents"]  # [N, D]


SAFETENSORS_DTYPES = {"F32": torch.float32}  # what `save_identities` writes


def identity_rows(storage: Storage, keys: JobKeys, name: str, rows: range) -> torch.Tensor:
    """Rows [rows.start, rows.stop) of tensor `name` of the identities file, read by byte ranges: the
    safetensors header (an 8-byte little-endian length, then JSON with each tensor's dtype, shape and
    data offsets), then the rows alone. A render shard reads its own identities: its memory does not
    grow with the job's (at 10,000 identities the whole file is ~40 MB, read once per shard before)."""
    (n,) = struct.unpack("<Q", storage.get_range(keys.identities, 0, 8))
    header = json.loads(storage.get_range(keys.identities, 8, n))
    entry = header.get(name)
    if entry is None or entry.get("dtype") not in SAFETENSORS_DTYPES or len(entry.get("shape", ())) != 2:
        raise ValueError(f"{keys.identities}: no 2-d float32 tensor {name!r} (has {sorted(header)})")
    total, dim = entry["shape"]
    if not 0 <= rows.start <= rows.stop <= total or rows.step != 1:
        raise ValueError(f"rows {rows} of {name!r}: it has {total}")
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    width = dim * torch.finfo(dtype).bits // 8  # bytes a row
    if not rows:
        return torch.empty(0, dim, dtype=dtype)
    begin = 8 + n + entry["data_offsets"][0] + rows.start * width
    data = storage.get_range(keys.identities, begin, len(rows) * width)
    if len(data) != len(rows) * width:
        raise ValueError(f"{keys.identities}: {len(data)} bytes for rows {rows} of {name!r}, {len(rows) * width} expected")
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(len(rows), dim)


# ---- the HyperFace gallery -------------------------------------------------------------------

def load_gallery_chunk(storage: Storage, keys: JobKeys, k: int) -> torch.Tensor | None:
    """Gallery chunk k's embeddings [m, E], or None when it has not been saved."""
    try:
        return st_load(storage.get_bytes(keys.gallery_chunk(k)))["embeddings"]
    except StorageKeyMissing:
        return None


def save_gallery_chunk(storage: Storage, keys: JobKeys, k: int, embeddings: torch.Tensor) -> None:
    storage.put_bytes(keys.gallery_chunk(k), st_save({"embeddings": embeddings.contiguous()}))


# ---- shards ----------------------------------------------------------------------------------

def load_shard(storage: Storage, keys: JobKeys, shard: int) -> dict[str, Any]:
    marker: dict[str, Any] = json.loads(storage.get_bytes(keys.shard_done(shard)))
    return marker


class ShardRecords(Sequence[dict[str, Any]]):
    """The shards' done.json records, in shard order, read from storage when used: a pass over
    them holds one shard's file list at a time (the last two read are kept), so finalize's memory
    does not grow with the job's images."""

    def __init__(self, storage: Storage, keys: JobKeys, n_shards: int) -> None:
        self.storage, self.keys, self.n = storage, keys, n_shards
        self._recent: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, k: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, k: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, k: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(self.n))]
        if k < 0:
            k += self.n
        if not 0 <= k < self.n:
            raise IndexError(k)
        got = self._recent.get(k)
        if got is None:
            got = load_shard(self.storage, self.keys, k)
            if len(self._recent) >= 2:
                self._recent.pop(next(iter(self._recent)))
            self._recent[k] = got
        return got

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for k in range(self.n):
            yield self[k]

    def missing(self) -> list[int]:
        """Shards with no done.json yet."""
        return [k for k in range(self.n) if not self.storage.exists(self.keys.shard_done(k))]
