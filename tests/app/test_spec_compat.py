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


@pytest.mark.parametrize("spec", [
    {"variations": {"method": "embedding_noise", "cone_degrees": 30}},
    {"variations": {"method": "embedding_noise", "target_cosine": 0.7}},
    {"variations": {"method": "embedding_noise", "scale": 0.2}},
    {"sampler": {"method": "hyperface", "alpha": 0, "restarts": 3}},
    {"sampler": {"method": "random", "exclude": ["lfw"], "exclude_min_angle_deg": 20}},
    {"output": {"label_offset": 40}, "extends": "j0000000000000100000000"},
    {"sampler": {"method": "langevin"}, "models": LATENT, "variations": {"method": "disco"}},
])
def test_a_normalised_spec_is_a_spec_with_the_same_hash(spec: dict[str, Any]) -> None:
    """What the workers and `idforge reproduce` do: validate the stored (normalised) spec again. A
    cone or target-cosine spec failed here once (the default `scale` read as a second spread), so
    every such job was accepted and then failed in the worker."""
    got = JobSpec.model_validate({"identities": 3, "images_per_identity": 2, **spec})
    again = JobSpec.model_validate(got.normalized(), strict=True)
    assert again.normalized() == got.normalized() and again.spec_hash() == got.spec_hash()
