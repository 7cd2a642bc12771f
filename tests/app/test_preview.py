"""`preview` and `from_preview` in the spec (`app.spec`, `app.preview`): the shard plan of a job
that continues a preview begins with the preview's own shards, a preview renders only its first
identities, and a continuation is refused naming the first field that would change the data."""

from __future__ import annotations

import pytest

from app import preview
from app.spec import JobSpec, plan_shards

PREVIEW_ID = "j0000000000000300000000"


def _preview(**over: object) -> dict[str, object]:
    spec = JobSpec.model_validate({"identities": 200, "images_per_identity": 4, "seed": 3,
                                   "preview": {"identities": 70}, "metadata": {"look": "yes"}, **over})
    return {"id": PREVIEW_ID, "spec": spec.normalized()}


@pytest.mark.parametrize("n,k,size", [(200, 70, 64), (200, 64, 64), (200, 1, 64), (200, 200, 64), (7, 3, 1),
                                      (130, 20, 64)])
def test_the_full_job_s_plan_starts_with_the_preview_s_shards_and_covers_every_identity_once(
        n: int, k: int, size: int) -> None:
    look = JobSpec.model_validate({"identities": n, "images_per_identity": 2, "preview": {"identities": k}})
    full = JobSpec.model_validate({"identities": n, "images_per_identity": 2,
                                   "from_preview": {"job": PREVIEW_ID, "identities": k}})
    head, plan = look.shard_plan(size), full.shard_plan(size)
    assert plan[:len(head)] == head and head == plan_shards(k, size)
    assert [i for r in plan for i in r] == list(range(n))
    assert all(0 < len(r) <= size for r in plan)
    assert look.rendered_identities == k and look.images_to_render == 2 * k
    assert full.rendered_identities == n and full.images_to_render == 2 * (n - k)


def test_a_plain_job_s_plan_and_hash_are_what_they_were() -> None:
    spec = JobSpec.model_validate({"identities": 130, "images_per_identity": 2})
    assert spec.shard_plan(64) == plan_shards(130, 64) == [range(0, 64), range(64, 128), range(128, 130)]
    assert not {"preview", "from_preview"} & set(spec.normalized())


def test_the_preview_gives_the_defaults_and_its_count() -> None:
    data = preview.resolve({"from_preview": PREVIEW_ID, "metadata": {"set": "full"}}, _preview())
    spec = JobSpec.model_validate(data)
    assert spec.preview is None and spec.from_preview is not None
    assert (spec.from_preview.job, spec.from_preview.identities) == (PREVIEW_ID, 70)
    assert spec.identities == 200 and spec.seed == 3 and spec.metadata == {"set": "full"}
    preview.check_same_data(spec.normalized(), _preview())  # the same data: no error


@pytest.mark.parametrize("change,field", [({"seed": 4}, "seed"), ({"identities": 201}, "identities"),
                                          ({"variations": {"scale": 0.2}}, "variations.scale"),
                                          ({"output": {"jpeg_quality": 90}}, "output.jpeg_quality")])
def test_a_field_that_changes_the_data_is_named(change: dict[str, object], field: str) -> None:
    data = preview.resolve({"from_preview": PREVIEW_ID, **change}, _preview())
    with pytest.raises(preview.PreviewError) as e:
        preview.check_same_data(JobSpec.model_validate(data).normalized(), _preview())
    assert e.value.field == field and PREVIEW_ID in e.value.message


def test_the_spec_refuses_what_cannot_run() -> None:
    bad = [({"preview": {"identities": 9}}, "more than the job's 5"),
           ({"from_preview": PREVIEW_ID}, "resolved by the service"),
           ({"from_preview": {"job": PREVIEW_ID, "identities": 6}}, "more than the job's 5"),
           ({"preview": {"identities": 2}, "from_preview": {"job": PREVIEW_ID, "identities": 2}}, "not both")]
    for extra, words in bad:
        with pytest.raises(ValueError, match=words):
            JobSpec.model_validate({"identities": 5, "images_per_identity": 2, **extra})
