"""`idforge reproduce`: re-run a job from its manifest, here, and compare the result with the job's.

The manifest holds the normalised spec, the seed derivations, the shard plan, each model's weight
sha256 and the platform the bytes were computed on (`workers.provenance`). A reproduction refuses
to start when a local model's weights differ from the ones the job used (its images would differ);
otherwise it renders the spec with the same shard plan into a local directory and compares every
image and every dataset object (RecordIO, the Parquet index, the identities, and the WebDataset
tars through the digest of the shard-objects table that lists them) with the manifest's digests.

On the same platform the bytes are the same. On another one (another CPU instruction set, GPU,
library version, thread count ...) the networks' floating point differs, and so may the pixels;
whenever the platforms differ or an image is not byte-identical, each image is also measured
against the job's copy of it: the largest pixel difference (0-255, decoded RGB) and the cosine
similarity of the two images' embeddings under the job's own FR model (the spec's embedder, loaded
through the registry like the pipeline loads it). A byte-identical image counts as difference 0,
cosine 1. The job's copies come from the dataset directory beside the manifest (or `--original`),
where every image is also checked against the manifest's digest, or else, only for the images that
differ, through the service's presigned URLs.

One verdict:
  identical   every image and dataset object is byte-identical to the job's;
  equivalent  not identical, but every image of the job is there and its embedding cosine to the
              job's image is >= `min_cosine` (DEFAULT_MIN_COSINE = 0.95);
  differs     an image is below that, missing, extra, or has no job's copy to compare with, or a
              dataset object is missing.

Why 0.95: a reproduction must give the *same picture* up to float drift, not just the same person.
Measured with a real FR model (SFace, the report's evaluator) on an aligned photograph: a few values
moved by up to 6 levels (what float drift does) 0.9996; JPEG re-encoded at quality 95 / 75 0.998 /
0.988; Gaussian noise of sigma 8 / 16 levels on every value 0.967 / 0.870; shifted 1 / 2 / 4 px
0.989 / 0.981 / 0.961; another person 0.19 (SFace's same-person threshold is 0.363). Cross-ISA
reproductions (ATEN_CPU_CAPABILITY default <-> avx2) of the tiny presets moved pixels by at most
4-8 levels at cosine >= 0.99997 under the job's model, while two different images of one identity
score 0.26-0.88 under the tiny iResNet in those jobs (ArcFace on real photos: typically 0.4-0.8). 0.95 thus passes drift up to about sigma-8 noise or a 4 px shift, far beyond what
rounding has done, and refuses another image of the identity. It is not a forgery check: the same
photograph mirrored scores 0.97 under SFace; its max pixel difference (230) shows it. Tighten or
loosen it with `--min-cosine`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app import __version__, dataset_index
from app.layout import INDEX
from app.settings import Settings
from app.spec import JobSpec
from workers import pipelines
from workers.exclusion import Excluded
from workers.local import generate
from workers.provenance import platform_differences
from workers.runtime import ModelCache, model_registry, pick_device

DEFAULT_MIN_COSINE = 0.95  # module docstring: the same picture, far above "the same person"
EMBED_BATCH = 64  # image pairs decoded and embedded at a time

# An image's index row (its path, or its tar member or RecordIO record) -> the job's copy of it,
# None if not at hand.
Originals = Callable[[dict[str, Any]], bytes | None]
Rows = Callable[[], Iterable[dict[str, Any]]]  # a fresh pass over a job's images, (identity, sample) order


class WeightsDiffer(Exception):
    """A local model's weights are not the ones the job used."""


class ListingMissing(Exception):
    """The job's image listing (its Parquet index) cannot be read."""


@dataclass
class ImageResult:
    """One image of the job (or of the reproduction only: `extra`)."""

    path: str
    status: str  # identical | equivalent | differs | missing | extra
    max_pixel_diff: int | None = None  # 0-255 over the decoded RGB pixels
    cosine: float | None = None  # of the two images' embeddings under the job's FR model
    note: str = ""  # why it differs when it cannot be measured; a job's copy that fails its digest

    def add_note(self, note: str) -> None:
        self.note = f"{self.note}; {note}" if self.note else note

    def line(self) -> str:
        figures = [] if self.max_pixel_diff is None else [
            f"max pixel diff {self.max_pixel_diff}", f"cosine {self.cosine:.6f}"]
        detail = ", ".join(figures + ([self.note] if self.note else []))
        word = "not in the original" if self.status == "extra" else self.status
        return f"{self.path}: {word}" + (f" ({detail})" if detail else "")

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "max_pixel_diff": self.max_pixel_diff,
                "cosine": self.cosine, "note": self.note or None}


@dataclass
class Comparison:
    images: int = 0  # images in the original manifest
    images_identical: int = 0
    objects: int = 0  # dataset objects in the original manifest
    objects_identical: int = 0
    differences: list[str] = field(default_factory=list)  # one line per differing or missing item
    code_version: tuple[str, str] = ("", "")  # the job's and ours
    per_image: list[ImageResult] = field(default_factory=list)  # the job's images in order, then extras
    objects_differing: list[str] = field(default_factory=list)  # "path: missing|differs"
    min_cosine: float = DEFAULT_MIN_COSINE
    platform: tuple[dict[str, Any] | None, dict[str, Any] | None] = (None, None)  # the job's and ours
    # The index rows (the job's, ours) of the images that are not byte-identical, by name: where
    # `measure` reads the two copies from.
    rows: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not self.differences and self.images == self.images_identical and \
            self.objects == self.objects_identical

    @property
    def platform_differences(self) -> list[str] | None:
        """Numerics-affecting fields that differ; None when the job's manifest records no platform."""
        return platform_differences(*self.platform)

    @property
    def failing(self) -> list[ImageResult]:
        """The images that make the verdict `differs`."""
        return [r for r in self.per_image if r.status not in ("identical", "equivalent")]

    @property
    def verdict(self) -> str:
        if self.identical:
            return "identical"
        if self.failing or any(line.endswith(": missing") for line in self.objects_differing):
            return "differs"
        return "equivalent"

    @property
    def figures_reported(self) -> bool:
        """Per-image figures matter: the platforms differ (or one is unknown) or an image differs."""
        return not self.identical or self.platform_differences != []

    def worst_pixel_diff(self) -> int | None:
        return max((r.max_pixel_diff for r in self.per_image if r.max_pixel_diff is not None), default=None)

    def lowest_cosine(self) -> float | None:
        return min((r.cosine for r in self.per_image if r.cosine is not None), default=None)

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("identical", "equivalent", "differs", "missing", "extra")}
        for r in self.per_image:
            out[r.status] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        theirs, ours = self.platform
        return {
            "verdict": self.verdict,
            "min_cosine": self.min_cosine,
            "images": {"total": self.images, "byte_identical": self.images_identical, **self.counts()},
            "objects": {"total": self.objects, "byte_identical": self.objects_identical,
                        "differing": self.objects_differing},
            "worst_max_pixel_diff": self.worst_pixel_diff(),
            "lowest_cosine": self.lowest_cosine(),
            "failing": [r.path for r in self.failing],
            "platform": {"job": theirs, "here": ours, "differences": self.platform_differences},
            "code_version": {"job": self.code_version[0], "here": self.code_version[1]},
            "per_image": [r.to_json() for r in self.per_image],
        }


def check_weights(manifest: dict[str, Any], models: ModelCache) -> None:
    """Every model the job used is here with the same weight digests."""
    spec = JobSpec.model_validate(manifest["spec"])
    ours = pipelines.models_used(spec, models)
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


def compare(original: dict[str, Any], reproduced: dict[str, Any], theirs: Iterable[dict[str, Any]],
            ours: Iterable[dict[str, Any]]) -> Comparison:
    """Image by image (by digest, the two listings streamed side by side in (identity, sample)
    order) and object by object (the manifests' `outputs`). Byte-identical images get their
    figures (0, 1.0); `measure` fills in the others'."""
    c = Comparison(code_version=(str(original.get("code_version")), str(reproduced.get("code_version"))),
                   platform=(original.get("platform"), reproduced.get("platform")))
    mine = iter(ours)
    o = next(mine, None)
    extras: list[str] = []
    for t in theirs:
        key = (t["identity"], t["sample"])
        while o is not None and (o["identity"], o["sample"]) < key:
            extras.append(dataset_index.image_name(o))
            o = next(mine, None)
        got = None
        if o is not None and (o["identity"], o["sample"]) == key:
            got, o = o, next(mine, None)
        name = dataset_index.image_name(t)
        c.images += 1
        if got is not None and got["sha256"] == t["sha256"]:
            c.images_identical += 1
            c.per_image.append(ImageResult(name, "identical", 0, 1.0))
        else:
            c.per_image.append(ImageResult(name, "missing" if got is None else "differs"))
            if got is not None:
                c.rows[name] = (t, got)
    while o is not None:
        extras.append(dataset_index.image_name(o))
        o = next(mine, None)
    c.per_image += [ImageResult(name, "extra") for name in sorted(extras)]
    theirs_objects, our_objects = original.get("outputs", {}), reproduced.get("outputs", {})
    c.objects = len(theirs_objects)
    for path, meta in sorted(theirs_objects.items()):
        got_meta = our_objects.get(path)
        if got_meta is not None and got_meta["sha256"] == meta["sha256"]:
            c.objects_identical += 1
        else:
            c.objects_differing.append(f"{path}: {'missing' if got_meta is None else 'differs'}")
    _differences(c)
    return c


def _differences(c: Comparison) -> None:
    c.differences = [r.line() for r in c.per_image if r.status != "identical"] + c.objects_differing


def directory_originals(root: Path) -> Originals:
    """The job's images in a dataset directory (the one its manifest.json is in, or a download):
    loose files, or members of its tars, or records of its train.rec, as the index names them."""
    reader = dataset_index.local_reader(root)

    def read(row: dict[str, Any]) -> bytes | None:
        try:
            return dataset_index.read_image(row, reader)
        except (OSError, ValueError):
            return None
    return read


def directory_rows(root: Path, manifest: dict[str, Any]) -> Rows:
    """The job's images listed by the dataset directory's index (or an old manifest's `files`)."""
    return lambda: dataset_index.local_files(root, manifest)


def _decode(data: bytes) -> np.ndarray | None:
    """uint8 RGB [H, W, 3], or None when the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's ways to refuse bytes
        return None


def measure(c: Comparison, manifest: dict[str, Any], out_dir: Path, embedder: Any, *,
            originals: Originals | None, check_originals: bool = False, theirs: Rows | None = None) -> Comparison:
    """Measure every image of the job that is not byte-identical against the job's copy of it.

    check_originals: `originals` is a local copy of the dataset: every image in it is checked
    against the manifest's digest, and one that fails (modified since the job wrote it) is
    measured against the reproduction like an image that differs. `theirs`: a pass over the job's
    images (their index rows, in the order `compare` read them)."""
    if check_originals and originals is not None and theirs is not None:
        ours = iter(dataset_index.local_files(out_dir))
        for row, r in zip(theirs(), c.per_image[:c.images], strict=False):  # one row at a time
            if r.status not in ("identical", "differs"):
                continue
            data = originals(row)
            if data is not None and hashlib.sha256(data).hexdigest() != row["sha256"]:
                if r.status == "identical":
                    r.status, r.max_pixel_diff, r.cosine = "differs", None, None
                    c.images_identical -= 1
                    mine = next((o for o in ours if (o["identity"], o["sample"]) ==
                                 (row["identity"], row["sample"])), None)  # ours: in the same order
                    c.rows[r.path] = (row, mine)
                r.add_note("the job's copy does not match its manifest digest")

    pending = [r for r in c.per_image if r.status == "differs"]
    reader = dataset_index.local_reader(out_dir)

    def pairs() -> Iterator[tuple[ImageResult, np.ndarray, np.ndarray]]:
        for r in pending:
            their_row, our_row = c.rows.get(r.path, (None, None))
            job_copy = originals(their_row) if originals is not None and their_row is not None else None
            if job_copy is None or our_row is None:
                r.add_note("no copy of the job's image to compare with (--original DIR)")
                continue
            a, b = _decode(job_copy), _decode(dataset_index.read_image(our_row, reader))
            if a is None or b is None or a.shape != b.shape:
                which = "the job's" if a is None else "the reproduced" if b is None else "the two"
                r.add_note(f"{which} image{'s' if which == 'the two' else ''} cannot be compared pixel by "
                           f"pixel ({'undecodable' if a is None or b is None else f'{a.shape} vs {b.shape}'})")
                r.max_pixel_diff = 255
                continue
            yield r, a, b

    batch: list[tuple[ImageResult, np.ndarray, np.ndarray]] = []
    for item in pairs():
        batch.append(item)
        if len(batch) == EMBED_BATCH:
            _embed_batch(batch, embedder, c.min_cosine)
            batch = []
    if batch:
        _embed_batch(batch, embedder, c.min_cosine)
    for r in c.per_image:
        if r.status == "differs" and r.cosine is not None and r.cosine < c.min_cosine:
            r.add_note(f"below {c.min_cosine}")
    _differences(c)
    return c


def _embed_batch(batch: list[tuple[ImageResult, np.ndarray, np.ndarray]], embedder: Any,
                 min_cosine: float) -> None:
    theirs = torch.from_numpy(np.stack([a for _, a, _ in batch]))  # uint8 [B, H, W, 3]
    ours = torch.from_numpy(np.stack([b for _, _, b in batch]))
    e = torch.nn.functional.normalize(embedder.embed_images(theirs).double(), dim=1)  # [B, E]
    f = torch.nn.functional.normalize(embedder.embed_images(ours).double(), dim=1)
    cos = (e * f).sum(dim=1).clamp(-1.0, 1.0)  # [B]
    for k, (r, a, b) in enumerate(batch):
        r.max_pixel_diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
        r.cosine = round(float(cos[k]), 6)
        if r.cosine >= min_cosine:
            r.status = "equivalent"


def reproduce(manifest: dict[str, Any], out_dir: Path, *, settings: Settings | None = None,
              check: bool = True, originals: Originals | None = None, check_originals: bool = False,
              min_cosine: float = DEFAULT_MIN_COSINE, theirs: Rows | None = None,
              on_progress: Callable[[int, int], None] = lambda done, total: None,
              excluded: Excluded | None = None) -> Comparison:
    """Re-run the job of `manifest` into `out_dir` with its shard plan; compare with the original,
    and measure what is not byte-identical against the job's copies from `originals` (module
    docstring). `theirs`: a pass over the job's images (its index, streamed); needed unless the
    manifest lists them inline (versions before 3). `excluded`: the identities the job's
    `sampler.exclude` named (`workers.exclusion.build_excluded`); None reads its reference sets from
    the model directory, and a job it excluded then cannot be found."""
    if theirs is None:
        if dataset_index.inline_files(manifest) is None:
            raise ValueError("the manifest lists its images in its Parquet index: pass its rows (theirs)")
        theirs = _inline_rows(manifest)
    s = settings or Settings()
    s = s.model_copy(update={"shard_identities": int(manifest["plan"]["shard_identities"])})
    spec = JobSpec.model_validate(manifest["spec"])
    if spec.spec_hash() != manifest["spec_hash"]:
        raise ValueError("the manifest's spec does not hash to its spec_hash: it was edited")
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine: must be in (0, 1], got {min_cosine}")
    models = ModelCache(model_registry(s), pick_device(s.device))
    if check:
        check_weights(manifest, models)
    try:  # the job's listing is readable before anything renders
        next(iter(theirs()), None)
    except (OSError, ValueError) as e:
        raise ListingMissing(f"the job's image listing (its {INDEX}) cannot be read: {e}") from e
    reproduced = generate(spec, out_dir, settings=s, on_progress=on_progress, models=models, excluded=excluded)
    result = compare(manifest, reproduced, theirs(), dataset_index.local_files(out_dir, reproduced))
    result.code_version = (str(manifest.get("code_version")), __version__)
    result.min_cosine = min_cosine
    return measure(result, manifest, out_dir, models.embedder(spec.models.embedder),
                   originals=originals, check_originals=check_originals, theirs=theirs)


def _inline_rows(manifest: dict[str, Any]) -> Rows:
    def rows() -> Iterator[dict[str, Any]]:
        yield from sorted(manifest["files"], key=lambda f: (f["identity"], f["sample"]))
    return rows
