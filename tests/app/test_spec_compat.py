"""Specs keep their normalised form and hash as the spec grows: a field added later is left out of
the normalised spec while unused, so a manifest written before it still checks (`idforge reproduce`
refuses a spec that does not hash to its manifest's spec_hash). The hashes below were those of
these specs before `cone_degrees` and `sampler.exclude` existed."""

from __future__ import annotations

from typing import Any

import pytest

from app.spec import JobSpec

LATENT = {"generator": "stylegan2-tiny", "embedder": "iresnet-tiny"}


@pytest.mark.parametrize(("spec", "pinned"), [
    ({"identities": 3, "images_per_identity": 2, "seed": 1},
     "94ae2caa0521adc7efe75d29272333f84668fc0ec72b362a14cff8df08751404"),
    ({"identities": 3, "images_per_identity": 2, "sampler": {"method": "langevin"}, "models": LATENT},
     "f5a3768421869060f177637e3f97317f005cf7b7dc5d051368729b07300030db"),
])
def test_an_earlier_spec_hashes_as_it_did(spec: dict[str, Any], pinned: str) -> None:
    got = JobSpec.model_validate(spec)
    assert got.spec_hash() == pinned
    normalized = got.normalized()
    assert "exclude" not in normalized["sampler"] and "exclude_min_angle_deg" not in normalized["sampler"]
    assert "cone_degrees" not in normalized["variations"]
    assert JobSpec.model_validate(normalized).spec_hash() == got.spec_hash()  # a round trip keeps it


def test_the_new_fields_count_when_used() -> None:
    base = {"identities": 3, "images_per_identity": 2, "seed": 1}
    cone = JobSpec.model_validate({**base, "variations": {"method": "embedding_noise", "cone_degrees": 30}})
    assert cone.normalized()["variations"]["cone_degrees"] == 30
    ex = JobSpec.model_validate({**base, "sampler": {"method": "random", "exclude": ["lfw"]}})
    assert ex.normalized()["sampler"] == {"method": "random", "exclude": ["lfw"], "exclude_min_angle_deg": 60.0}
    hashes = {JobSpec.model_validate(base).spec_hash(), cone.spec_hash(), ex.spec_hash()}
    assert len(hashes) == 3
