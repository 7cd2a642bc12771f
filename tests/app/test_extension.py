"""`extends` resolved into a whole spec (`app.extension.resolve`): the parent's settings as defaults,
the family excluded, labels continuing, a fresh seed; and the fields that keep earlier specs'
hashes (`output.label_offset`, `sampler.restarts`, `extends` left out while unused)."""

from __future__ import annotations

from typing import Any

import pytest

from app import extension
from app.spec import PACKER_RESTARTS, JobSpec, current_defaults

PARENT_ID = "j0000000000000100000000"
GRANDPARENT_ID = "j0000000000000200000000"


def _parent(**over: Any) -> dict[str, Any]:
    spec = JobSpec.model_validate({
        "identities": 100, "images_per_identity": 5, "seed": 9,
        "sampler": {"method": "random", "exclude": [GRANDPARENT_ID, "lfw"], "exclude_min_angle_deg": 40},
        "variations": {"method": "embedding_noise", "cone_degrees": 30},
        "output": {"formats": ["webdataset"], "label_offset": 50},
        "metadata": {"set": "train"}, **over})
    return {"id": PARENT_ID, "spec": spec.normalized()}


def test_the_parent_gives_the_defaults_and_the_family_is_excluded() -> None:
    data = extension.resolve({"extends": PARENT_ID, "identities": 30}, _parent())
    spec = JobSpec.model_validate(data)
    assert spec.extends == PARENT_ID and spec.identities == 30 and spec.images_per_identity == 5
    assert spec.variations.cone_degrees == 30 and spec.output.formats == ["webdataset"]
    assert spec.sampler.exclude == [GRANDPARENT_ID, "lfw", PARENT_ID]
    assert spec.sampler.exclude_min_angle_deg == 40
    assert spec.output.label_offset == 150  # the parent's 50 + its 100 identities
    assert spec.metadata == {}  # the parent's request's, not inherited
    assert spec.seed == extension.child_seed(PARENT_ID, 9) != 9
    assert 0 <= spec.seed < 2**63
    again = JobSpec.model_validate(extension.resolve({"extends": PARENT_ID, "identities": 30}, _parent()))
    assert again.spec_hash() == spec.spec_hash()  # the same request is the same dataset


def test_the_request_wins_and_sampler_and_variations_come_whole() -> None:
    data = extension.resolve({"extends": PARENT_ID, "seed": 4, "sampler": {"method": "random", "exclude": ["ffhq"]},
                              "variations": {"scale": 0.1}, "output": {"label_offset": 500}}, _parent())
    spec = JobSpec.model_validate(data)
    assert spec.seed == 4 and spec.output.label_offset == 500 and spec.output.formats == ["webdataset"]
    assert spec.sampler.exclude == [GRANDPARENT_ID, "lfw", "ffhq", PARENT_ID]  # nothing of the family dropped
    assert spec.sampler.exclude_min_angle_deg == 60  # the request's sampler, whole: its default
    assert spec.variations.scale == 0.1 and spec.variations.cone_degrees is None  # not the parent's cone
    hyper = extension.resolve({"extends": PARENT_ID, "sampler": {"method": "hyperface", "gallery_size": 8}},
                              _parent())
    assert hyper["sampler"] == {"method": "hyperface", "gallery_size": 8,
                                "exclude": [GRANDPARENT_ID, "lfw", PARENT_ID]}


def test_labels_may_not_overlap_the_parents() -> None:
    with pytest.raises(extension.ExtensionError) as e:
        extension.resolve({"extends": PARENT_ID, "output": {"label_offset": 149}}, _parent())
    assert e.value.field == "output.label_offset" and "149" in e.value.message


def test_later_fields_leave_earlier_hashes_alone() -> None:
    plain = JobSpec.model_validate({"identities": 3, "images_per_identity": 2})
    normalized = plain.normalized()
    assert "extends" not in normalized and "label_offset" not in normalized["output"]
    hyper = JobSpec.model_validate({"identities": 3, "images_per_identity": 2,
                                    "sampler": {"method": "hyperface", "alpha": 0}})
    assert "restarts" not in hyper.normalized()["sampler"]  # as a stored spec from before: one run


def test_a_new_pure_packing_spec_gets_the_restart_packer() -> None:
    def spec(**sampler: Any) -> JobSpec:
        return current_defaults(JobSpec.model_validate(
            {"identities": 3, "images_per_identity": 2, "sampler": {"method": "hyperface", **sampler}}))

    assert spec(alpha=0).sampler.restarts == PACKER_RESTARTS
    assert spec(alpha=0).normalized()["sampler"]["restarts"] == PACKER_RESTARTS
    assert spec(alpha=0.5).sampler.restarts is None  # the paper's gallery term: one run
    assert spec(alpha=0, iterations=500).sampler.restarts is None  # asked for one run's schedule
    assert spec(alpha=0, restarts=2).sampler.restarts == 2
    with pytest.raises(ValueError, match="restarts: the restart packer runs pure packing"):
        spec(alpha=0.5, restarts=2)
    with pytest.raises(ValueError, match="learning_rate cannot be set"):
        spec(alpha=0, restarts=2, learning_rate=0.2)
    # the normalised form of a restart spec validates again (stored specs are re-read)
    again = JobSpec.model_validate(spec(alpha=0).normalized())
    assert again.spec_hash() == spec(alpha=0).spec_hash()


def test_an_extension_of_a_job_made_from_a_preview_does_not_inherit_the_preview() -> None:
    parent = _parent(from_preview={"job": GRANDPARENT_ID, "identities": 10})
    assert parent["spec"]["from_preview"] == {"job": GRANDPARENT_ID, "identities": 10}
    spec = JobSpec.model_validate(extension.resolve({"extends": PARENT_ID, "identities": 30}, parent))
    assert spec.from_preview is None and spec.preview is None and spec.shard_plan(64) == [range(0, 30)]
