"""The dataset's output formats: one file per format, each with a per-shard writer and a
finalize-time packaging step, registered here in the order they run.

  imagefolder   the loose images (when the spec asks for them)
  webdataset    a tar per shard (.jpg + .cls + .json per image); nothing to package
  recordio      a segment per shard, joined at finalize into insightface's train.rec/.idx/.lst/property
  index         per shard, the file list (each image's facts and where each format put it); at
                finalize the Parquet table of every image, kept or filtered

Each format's `write_shard` records where it put each image in `ShardContext.locations` (the loose
file's `path`; the tar, member and member offset; the RecordIO record id and offset in the shard's
segment); the index's `write_shard`, which runs last, joins them with the images' facts into the
shard's file list (`done.json`), so no format depends on another being written.

`workers.shard` builds a `ShardContext` once its images are cropped, embedded and filtered, and
calls `write_shard` of every format the spec asks for; `workers.finalize` builds a
`PackageContext` and calls `package`. Object keys come from `app.layout` alone, which also owns the
manifest's `layout` table. Adding a format: `workers/outputs/<format>.py` with a class that has
the `Output` members, its entry in `OUTPUTS`, and its name in the spec's `DatasetFormat` literal.

No format module imports this package at run time (the contexts are only annotations there), so
the registry can import them without a cycle.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from app.layout import JobKeys
from app.spec import JobSpec
from app.storage import Storage
from models.registry import hash_file
from workers.outputs import imagefolder, index, recordio, webdataset


@dataclass
class ShardContext:
    """One shard's kept images, as `workers.shard` hands them to each format's `write_shard`."""

    spec: JobSpec
    storage: Storage
    keys: JobKeys
    shard: int
    ids: range  # the shard's identities
    kept: dict[int, list[int]]  # each identity's kept samples, in sample order
    ext: str  # the images' file extension: jpg or png
    data: dict[tuple[int, int], bytes]  # the encoded image of each kept (identity, sample)
    # Each kept image's facts, in (identity, sample) order: identity, sample, seed, shard, size,
    # sha256, aligned, centre_cosine, reference_cosine, evaluator_centre_cosine.
    records: list[dict[str, Any]]
    files: list[dict[str, Any]]  # the shard's file list (ShardResult.files): the index fills it
    objects: dict[str, dict[str, Any]]  # shard-level objects written, by relative key: size, sha256
    # Where each format put each kept image, by (identity, sample): path; tar, member, tar_offset;
    # record_id, record_offset (in the shard's segment). The index joins them into `files`.
    locations: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)

    def locate(self, identity: int, sample: int, **where: Any) -> None:
        self.locations.setdefault((identity, sample), {}).update(where)

    def put_stream(self, key: str, content_type: str, write: Callable[[Any], Any]) -> None:
        """Write an object through a temporary file (a multipart upload when large) and record its digest."""
        with tempfile.TemporaryDirectory(prefix="idforge-") as tmp:
            path = Path(tmp) / "object"
            with path.open("wb") as out:
                write(out)
            self.storage.put_file(key, path, content_type)
            self.objects[self.keys.relative(key)] = {"size": path.stat().st_size, "sha256": hash_file(path)}


@dataclass
class PackageContext:
    """The finished shards, as `workers.finalize` hands them to each format's `package`."""

    spec: JobSpec
    storage: Storage
    keys: JobKeys
    shards: Sequence[dict[str, Any]]  # the shards' done.json records, in shard order (loaded lazily)
    ext: str  # the images' file extension: jpg or png
    label_flips: torch.Tensor | None  # bool [N, A] by (identity, slot); None: not checked
    objects: dict[str, dict[str, Any]]  # dataset objects written, by relative key: size, sha256
    # Byte offset of each shard's RecordIO segment in train.rec (RecordIO's package fills it; the
    # index adds it to each record's offset in its segment).
    record_base: dict[int, int] = field(default_factory=dict)
    index_rows: int = 0  # rows of the index written (the index's package sets it)
    index_row_groups: int = 0

    def upload(self, rel: str, path: Path, content_type: str) -> None:
        """Store the file at `path` under the job-relative key `rel` and record its digest."""
        self.storage.put_file(self.keys.key(rel), path, content_type)
        self.objects[rel] = {"size": path.stat().st_size, "sha256": hash_file(path)}


class Output(Protocol):
    """A dataset format: its name in the spec's `output.formats`, whether it is written whatever the
    spec lists, its per-shard writer and its finalize-time packaging (either may do nothing)."""

    name: str
    always: bool

    def write_shard(self, ctx: ShardContext) -> None: ...

    def package(self, ctx: PackageContext) -> None: ...


# In the order they run. The index comes last: it joins the others' locations into the file list,
# and at finalize it needs RecordIO's segment offsets.
OUTPUTS: tuple[Output, ...] = (imagefolder.ImageFolder(), webdataset.WebDataset(), recordio.RecordIO(),
                               index.Index())


def asked_for(spec: JobSpec) -> list[Output]:
    """The formats the job writes, in `OUTPUTS` order: those its spec lists and those always written."""
    return [o for o in OUTPUTS if o.always or o.name in spec.output.formats]
