"""WebDataset: one POSIX tar per render shard, `dataset/webdataset/{shard:06d}.tar`
(`app.layout.WEBDATASET`), with `.jpg` (or `.png`) + `.cls` + `.json` per image.

No broker, job store or storage in the writer: it takes an open file, so the caller decides where
bytes go (a temp file that is then uploaded) and tests read the result with the `webdataset`
library. It is byte-deterministic: the same samples give the same bytes, so a rerun of a shard
overwrites its tar with an identical one.

Format facts used here: a POSIX tar whose members `{key}.{ext}` are grouped into samples by `key`,
the member name up to its first dot; `.cls` holds the class as ASCII decimal.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from workers.outputs import PackageContext, ShardContext

TAR_MTIME = 0  # every member's mtime (1970-01-01): the same samples give the same tar bytes
TAR_MODE = 0o644  # every member's permission bits
IMAGE_EXTS = ("jpg", "png")  # image members webdataset_sample makes


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key or not key.isascii() or not key.isprintable():
        raise ValueError(f"sample key: expected non-empty printable ASCII without '.' or '/', got {key!r}")


def _check_ext(key: str, ext: str) -> None:
    if not ext or "/" in ext or not ext.isascii() or not ext.isprintable():
        raise ValueError(f"sample {key!r}: member extension must be non-empty printable ASCII "
                         f"without '/', got {ext!r}")


def write_webdataset_tar(out: BinaryIO, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> int:
    """Write `samples` (key, {ext: bytes}) as one WebDataset tar shard to `out`; returns how many.

    Members are `{key}.{ext}` in the order given; their headers carry no time, owner or host
    detail, so the same samples give the same bytes. Keys must be unique, non-empty and free of
    '.' (webdataset splits the member name at its first dot) and '/'.
    """
    n = 0
    seen: set[str] = set()
    # "w|": a plain stream, no seeking, so `out` may be a pipe or an upload buffer
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            _check_key(key)
            if key in seen:
                raise ValueError(f"sample key {key!r} appears twice in one shard")
            seen.add(key)
            if not members:
                raise ValueError(f"sample {key!r} has no members")
            for ext, data in members.items():
                _check_ext(key, ext)
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    got = type(data).__name__
                    raise ValueError(f"sample {key!r} member {ext!r}: expected bytes, got {got}")  # noqa: TRY004
                name = f"{key}.{ext}"
                if len(name) > 100:  # the ustar name field
                    raise ValueError(f"member name {name!r} is longer than 100 characters")
                tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
            n += 1
    return n


TAR_BLOCK = 512  # a ustar header, and the unit member data is padded to


def member_span(size: int) -> int:
    """Bytes a member of `size` data bytes takes in a ustar tar: its header, its data padded to 512."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sample_key(identity: int, sample: int) -> str:
    """The WebDataset key of image (identity, sample): "000012_003"."""
    for name, v in (("identity", identity), ("sample", sample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    return f"{identity:06d}_{sample:03d}"


def webdataset_sample(identity: int, sample: int, image_ext: str, image_bytes: bytes,
                      meta: Mapping[str, Any], label: int | None = None) -> tuple[str, dict[str, bytes]]:
    """One WebDataset sample: the image, `.cls` (the class label, ASCII decimal) and `.json` (`meta`
    with identity and sample added; sorted keys, compact, NaN refused). The label is the identity
    unless `label` is given (a job whose labels start at `output.label_offset` > 0): then the key and
    `.cls` carry it, and the JSON has it as `label` beside the job's own identity."""
    cls = identity if label is None else label
    key = sample_key(cls, sample)
    if image_ext not in IMAGE_EXTS:
        raise ValueError(f"image_ext: expected one of {IMAGE_EXTS}, got {image_ext!r}")
    for name, v in (("identity", identity), ("sample", sample)):
        if name in meta and meta[name] != v:
            raise ValueError(f"meta[{name!r}] is {meta[name]!r} but the sample's {name} is {v}")
    extra = {} if label is None else {"label": label}
    try:
        doc = json.dumps({**meta, "identity": identity, "sample": sample, **extra}, sort_keys=True,
                         separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta of sample {key}: not JSON-serialisable: {e}") from e
    return key, {image_ext: bytes(image_bytes), "cls": str(cls).encode("ascii"),
                 "json": doc.encode("utf-8")}



class WebDataset:
    name = "webdataset"
    always = False

    def write_shard(self, ctx: ShardContext) -> None:
        """The shard's tar: one sample per kept image, in (identity, sample) order. Records each
        image's tar, member name and the member data's byte offset in the tar."""
        tar = ctx.keys.webdataset_tar(ctx.shard)
        rel = ctx.keys.relative(tar)

        def wds_samples() -> Iterator[tuple[str, dict[str, bytes]]]:
            pos = 0  # byte offset of the next member's header in the tar
            offset = ctx.spec.output.label_offset
            for f in ctx.records:
                i, s = f["identity"], f["sample"]
                meta = {k: f[k] for k in ("identity", "sample", "seed", "reference_cosine", "centre_cosine",
                                          "aligned")}
                key, members = webdataset_sample(i, s, ctx.ext, ctx.data[(i, s)], meta,
                                                 offset + i if offset else None)
                for ext, data in members.items():
                    if ext == ctx.ext:
                        ctx.locate(i, s, tar=rel, member=f"{key}.{ext}", tar_offset=pos + TAR_BLOCK)
                    pos += member_span(len(data))
                yield key, members

        ctx.put_stream(tar, "application/x-tar", lambda out: write_webdataset_tar(out, wds_samples()))

    def package(self, ctx: PackageContext) -> None:
        """Nothing: the shards' tars are the dataset (finalize lists them from the shards' objects)."""
