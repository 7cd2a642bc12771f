"""`idforge reproduce`: re-run a job from its manifest, here, and compare the result byte for byte.

The manifest holds the normalised spec, the seed derivations, the shard plan and each model's
weight sha256. A reproduction refuses to start when a local model's weights differ from the ones
the job used (their images would differ); otherwise it renders the spec with the same shard plan
into a local directory and compares every image and every dataset object (tars, RecordIO, the
Parquet index, the identities) with the manifest's digests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import __version__
from app.settings import Settings
from app.spec import JobSpec
from workers import pipeline
from workers.local import generate
from workers.runtime import ModelCache, model_registry, pick_device


class WeightsDiffer(Exception):
    """A local model's weights are not the ones the job used."""


@dataclass
class Comparison:
    images: int = 0  # images in the original manifest
    images_identical: int = 0
    objects: int = 0  # dataset objects in the original manifest
    objects_identical: int = 0
    differences: list[str] = field(default_factory=list)  # one line per differing or missing item
    code_version: tuple[str, str] = ("", "")  # the job's and ours

    @property
    def identical(self) -> bool:
        return not self.differences and self.images == self.images_identical and \
            self.objects == self.objects_identical


def check_weights(manifest: dict[str, Any], models: ModelCache) -> None:
    """Every model the job used is here with the same weight digests."""
    spec = JobSpec.model_validate(manifest["spec"])
    ours = pipeline.models_used(spec, models)
    for role, used in manifest["models"].items():
        local = ours.get(role)
        if local is None or local["name"] != used["name"]:
            raise WeightsDiffer(f"{role}: the job used {used['name']!r}; this spec names "
                                f"{local and local['name']!r}")
        if local["sha256"] != used["sha256"]:
            files = sorted(k for k in set(used["sha256"]) | set(local["sha256"] or {})
                           if (local["sha256"] or {}).get(k) != used["sha256"].get(k))
            raise WeightsDiffer(f"model {used['name']!r} ({role}): local weights differ from the job's in "
                                f"{files}; its images would not be the same")


def compare(original: dict[str, Any], reproduced: dict[str, Any]) -> Comparison:
    """Image by image (path -> sha256) and object by object (the manifest's `outputs`)."""
    c = Comparison(code_version=(str(original.get("code_version")), str(reproduced.get("code_version"))))
    ours = {f["path"]: f["sha256"] for f in reproduced["files"]}
    c.images = len(original["files"])
    for f in original["files"]:
        got = ours.pop(f["path"], None)
        if got == f["sha256"]:
            c.images_identical += 1
        else:
            c.differences.append(f"{f['path']}: {'missing' if got is None else 'differs'}")
    c.differences += [f"{path}: not in the original" for path in sorted(ours)]
    theirs_objects, our_objects = original.get("outputs", {}), reproduced.get("outputs", {})
    c.objects = len(theirs_objects)
    for path, meta in sorted(theirs_objects.items()):
        got = our_objects.get(path)
        if got is not None and got["sha256"] == meta["sha256"]:
            c.objects_identical += 1
        else:
            c.differences.append(f"{path}: {'missing' if got is None else 'differs'}")
    return c


def reproduce(manifest: dict[str, Any], out_dir: Path, *, settings: Settings | None = None,
              check: bool = True,
              on_progress: Callable[[int, int], None] = lambda done, total: None) -> Comparison:
    """Re-run the job of `manifest` into `out_dir` with its shard plan; compare with the original."""
    s = settings or Settings()
    s = s.model_copy(update={"shard_identities": int(manifest["plan"]["shard_identities"])})
    spec = JobSpec.model_validate(manifest["spec"])
    if JobSpec.model_validate(manifest["spec"]).spec_hash() != manifest["spec_hash"]:
        raise ValueError("the manifest's spec does not hash to its spec_hash: it was edited")
    if check:
        check_weights(manifest, ModelCache(model_registry(s), pick_device(s.device)))
    reproduced = generate(spec, out_dir, settings=s, on_progress=on_progress)
    result = compare(manifest, reproduced)
    result.code_version = (str(manifest.get("code_version")), __version__)
    return result
