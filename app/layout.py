"""Every object key of a job, in one place (DESIGN §4). The manifest's `layout` table is generated
from the templates here, so the keys written and the keys documented cannot drift.

```
{prefix}/{job_id}/
  spec.json  manifest.json  CANCELED
  identities/ embeddings.safetensors  stats.json  checkpoint.safetensors  gallery/{k:05d}.safetensors
  shards/{shard:05d}/ done.json  features.safetensors  latents.safetensors  images.rec
  dataset/ imagefolder/{identity:06d}/{sample:03d}.{ext}  webdataset/{shard:06d}.tar
           recordio/{train.rec,train.idx,train.lst,property}  index.parquet  objects.jsonl
  report/ report.html  report.json  plots/*.png ...
  preview/ contact_sheet.png                                      (a preview job)
```

In the ImageFolder template `{identity}` is the identity's class label, `output.label_offset` + the
job's identity index (the same number unless the job continues another's labels).
"""

from __future__ import annotations

from collections.abc import Collection

IMAGEFOLDER = "dataset/imagefolder/{identity:06d}/{sample:03d}.{ext}"
WEBDATASET = "dataset/webdataset/{shard:06d}.tar"
RECORDIO_FILES = ("train.rec", "train.idx", "train.lst", "property")
RECORDIO = "dataset/recordio/{name}"
INDEX = "dataset/index.parquet"
# The per-shard dataset objects (WebDataset tars), a JSON line each (`path`, `shard`, `size`,
# `sha256`): the manifest pins this file, so it stays the same size however many shards a job has.
OBJECTS = "dataset/objects.jsonl"
IDENTITIES = "identities/embeddings.safetensors"
REPORT = "report/{name}"
SHARD = "shards/{shard:05d}/{name}"
CONTACT_SHEET = "preview/contact_sheet.png"  # a preview's first identities, a row each


class JobKeys:
    """The keys of one job under its root (`{prefix}/{job_id}`, or '' for a local directory)."""

    def __init__(self, root: str) -> None:
        self.root = root.strip("/")

    @classmethod
    def for_job(cls, prefix: str, job_id: str) -> JobKeys:
        if not job_id.isalnum():
            raise ValueError(f"job_id must be alphanumeric, got {job_id!r}")
        return cls(f"{prefix.strip('/')}/{job_id}" if prefix.strip("/") else job_id)

    def key(self, relative: str) -> str:
        return f"{self.root}/{relative}" if self.root else relative

    def relative(self, key: str) -> str:
        return key[len(self.root) + 1:] if self.root else key

    # ---- the job ---------------------------------------------------------------------------

    @property
    def spec(self) -> str:
        return self.key("spec.json")

    @property
    def manifest(self) -> str:
        return self.key("manifest.json")

    @property
    def canceled(self) -> str:
        return self.key("CANCELED")

    # ---- identities ------------------------------------------------------------------------

    @property
    def identities(self) -> str:
        return self.key(IDENTITIES)

    @property
    def identity_stats(self) -> str:
        return self.key("identities/stats.json")

    @property
    def identity_checkpoint(self) -> str:
        return self.key("identities/checkpoint.safetensors")

    def gallery_chunk(self, k: int) -> str:
        return self.key(f"identities/gallery/{k:05d}.safetensors")

    # ---- shards (intermediates) ------------------------------------------------------------

    def shard_done(self, shard: int) -> str:
        return self.key(SHARD.format(shard=shard, name="done.json"))

    def shard_features(self, shard: int) -> str:
        return self.key(SHARD.format(shard=shard, name="features.safetensors"))

    def shard_latents(self, shard: int) -> str:
        return self.key(SHARD.format(shard=shard, name="latents.safetensors"))

    def shard_recordio(self, shard: int) -> str:
        return self.key(SHARD.format(shard=shard, name="images.rec"))

    # ---- the dataset and the report --------------------------------------------------------

    def image(self, identity: int, sample: int, ext: str) -> str:
        return self.key(IMAGEFOLDER.format(identity=identity, sample=sample, ext=ext))

    def webdataset_tar(self, shard: int) -> str:
        return self.key(WEBDATASET.format(shard=shard))

    def recordio(self, name: str) -> str:
        return self.key(RECORDIO.format(name=name))

    @property
    def index(self) -> str:
        return self.key(INDEX)

    def report(self, name: str = "") -> str:
        """A report file's key; '' gives the report's prefix."""
        return self.key(REPORT.format(name=name))


def manifest_layout(formats: Collection[str], ext: str, report: bool,
                    preview: bool = False) -> dict[str, str | None]:
    """The manifest's `layout` table: each output's key template relative to the job root, None for
    an output the job did not ask for."""
    return {
        "imagefolder": IMAGEFOLDER.replace("{ext}", ext) if "imagefolder" in formats else None,
        "webdataset": WEBDATASET if "webdataset" in formats else None,
        "recordio": RECORDIO.format(name="{" + ",".join(RECORDIO_FILES) + "}") if "recordio" in formats else None,
        "index": INDEX,
        "objects": OBJECTS,
        "identities": IDENTITIES,
        "report": REPORT.format(name="report.html") if report else None,
        **({"contact_sheet": CONTACT_SHEET} if preview else {}),
    }
