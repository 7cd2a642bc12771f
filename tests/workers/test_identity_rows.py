"""A render shard reads only its own rows of the identities file (`artifacts.identity_rows`, byte
ranges of the safetensors file): the same values as slicing the whole file, for any range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.layout import JobKeys
from app.storage import LocalStorage
from workers import artifacts


@pytest.mark.parametrize("rows", [range(7), range(3, 4), range(5, 5), range(0), range(64, 73)])
def test_a_shard_s_rows_read_by_range_are_the_sliced_rows(tmp_path: Path, rows: range) -> None:
    storage, keys = LocalStorage(tmp_path), JobKeys.for_job("", "j" + "1" * 22)
    g = torch.Generator().manual_seed(0)
    emb, lat = torch.randn(73, 12, generator=g), torch.randn(73, 5, generator=g)
    artifacts.save_identities(storage, keys, emb, {"method": "random"}, latents=lat)
    got = artifacts.load_identities(storage, keys, rows)
    assert got.shape == (len(rows), 12) and torch.equal(got, emb[rows.start:rows.stop])
    assert torch.equal(artifacts.load_identity_latents(storage, keys, rows), lat[rows.start:rows.stop])
    assert torch.equal(artifacts.load_identities(storage, keys), emb)  # the whole file, as before


def test_rows_past_the_end_or_an_absent_tensor_are_refused(tmp_path: Path) -> None:
    storage, keys = LocalStorage(tmp_path), JobKeys.for_job("", "j" + "2" * 22)
    artifacts.save_identities(storage, keys, torch.zeros(4, 3), {})
    with pytest.raises(ValueError, match="it has 4"):
        artifacts.load_identities(storage, keys, range(2, 5))
    with pytest.raises(ValueError, match="latents"):
        artifacts.load_identity_latents(storage, keys, range(1))
