"""Reference sets: embeddings of real people (or any identities) an operator installs for the
workers, `{model_dir}/reference_sets/{name}.safetensors`, read by the leakage check
(`workers.finalize`) and by `sampler.exclude` (`workers.exclusion`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as st_load_file

from models.registry import hash_file
from workers.errors import ReferenceUnavailable

REFERENCE_SETS_DIR = "reference_sets"  # in the worker's model directory: {name}.safetensors


@dataclass(frozen=True)
class ReferenceSet:
    name: str
    embeddings: torch.Tensor  # [M, E] unit rows
    sha256: str


def load_reference_set(model_dir: Path, name: str, embedding_dim: int, embedder: str) -> ReferenceSet:
    """`{model_dir}/reference_sets/{name}.safetensors`: tensor `embeddings` [M, E] in the job
    embedder's space; its metadata may name that embedder (`embedder`), which must then match."""
    path = Path(model_dir) / REFERENCE_SETS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise ReferenceUnavailable(f"reference set {name!r}: no file {path} on the workers (a safetensors "
                                      f"file with tensor 'embeddings' [M, {embedding_dim}])")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    named = meta.get("embedder")
    if named and named != embedder:
        raise ReferenceUnavailable(f"reference set {name!r} holds {named!r} embeddings; the job's "
                                      f"embedder is {embedder!r}")
    tensors = st_load_file(str(path))
    emb = tensors.get("embeddings")
    if emb is None or emb.ndim != 2 or emb.shape[1] != embedding_dim or emb.shape[0] < 1:
        shape = None if emb is None else tuple(emb.shape)
        raise ReferenceUnavailable(f"reference set {name!r}: expected tensor 'embeddings' "
                                      f"[M, {embedding_dim}], got {shape}")
    emb = torch.nn.functional.normalize(emb.float(), dim=1)  # [M, E]
    return ReferenceSet(name, emb, hash_file(path))
