"""The Parquet index of every image, `dataset/index.parquet` (`app.layout.INDEX`): one row per
rendered image the job kept or the quality filter dropped (`INDEX_SCHEMA`), and the only
per-image listing of the dataset (the manifest pins its sha256; since manifest version 3 it lists no
images itself).

Per shard: the file list (`done.json`'s `files`), each kept image's facts joined with where each
format put it. At finalize the index is written from the shards' file lists, one shard (one row
group, sorted by (identity, sample), kept images first) in memory at a time. `ParquetIndexWriter` takes an open file and is byte-deterministic: the same rows give the
same bytes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Self

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from app import layout

if TYPE_CHECKING:
    from workers.outputs import PackageContext, ShardContext

INDEX_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=True),  # ImageFolder file; null: filtered out or no imagefolder
    pa.field("identity", pa.int32(), nullable=False),
    pa.field("label", pa.int32(), nullable=True),  # class label: output.label_offset + identity (null in
    # indexes written before labels could be offset: there it is the identity)
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),  # derive_seed output, in [0, 2**63)
    pa.field("shard", pa.int32(), nullable=False),  # render shard that made the image
    pa.field("size", pa.int64(), nullable=True),  # encoded bytes; null: not written
    pa.field("sha256", pa.string(), nullable=True),  # of the encoded bytes; null: not written
    pa.field("aligned", pa.bool_(), nullable=False),  # a face was found and aligned (else centre crop)
    pa.field("filtered", pa.bool_(), nullable=False),  # dropped by the quality filter
    pa.field("label_flip", pa.bool_(), nullable=True),  # nearer another identity's centre; null: not checked
    pa.field("centre_cosine", pa.float32(), nullable=False),  # to its identity centre, job embedder
    pa.field("reference_cosine", pa.float32(), nullable=True),  # to its reference embedding
    pa.field("evaluator_centre_cosine", pa.float32(), nullable=True),  # to its centre, independent FR model
    # Where the image is besides (or instead of) its ImageFolder file; null: not in that format.
    pa.field("tar", pa.string(), nullable=True),  # its WebDataset tar (dataset-relative key)
    pa.field("member", pa.string(), nullable=True),  # its member in the tar: 000012_003.jpg
    pa.field("tar_offset", pa.int64(), nullable=True),  # byte offset of the member's data in the tar
    pa.field("record_id", pa.int64(), nullable=True),  # its record id in dataset/recordio/train.rec
    pa.field("record_offset", pa.int64(), nullable=True),  # byte offset of its record in train.rec
])
_INT_TYPES = {pa.int32(), pa.int64()}


def _column(field: pa.Field, values: list[Any]) -> pa.Array:
    if field.type in _INT_TYPES and any(isinstance(v, bool) for v in values):
        raise ValueError(f"column {field.name!r}: expected integers, got a bool")
    if field.type == pa.bool_() and any(v is not None and not isinstance(v, bool) for v in values):
        raise ValueError(f"column {field.name!r}: expected bools")
    try:
        arr = pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as e:
        raise ValueError(f"column {field.name!r}: {e}") from e
    if not field.nullable and arr.null_count:
        raise ValueError(f"column {field.name!r} may not be null")
    return arr


class ParquetIndexWriter:
    """The Parquet table of every image (`INDEX_SCHEMA`), one row group per `write_rows` call.

    Byte-deterministic for the same rows (fixed schema, compression and writer options). Rows are
    dicts keyed by column name; a nullable column may be left out (null).
    """

    def __init__(self, out: BinaryIO) -> None:
        self.rows = 0
        self._writer = pq.ParquetWriter(out, INDEX_SCHEMA, compression="zstd", compression_level=3,
                                        use_dictionary=["path", "sha256", "tar"], write_statistics=True)

    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        names = set(INDEX_SCHEMA.names)
        for i, row in enumerate(rows):
            unknown = sorted(set(row) - names)
            if unknown:
                raise ValueError(f"row {self.rows + i}: unknown column(s) {unknown}")
            missing = [f.name for f in INDEX_SCHEMA if not f.nullable and f.name not in row]
            if missing:
                raise ValueError(f"row {self.rows + i}: missing column(s) {missing}")
        arrays = [_column(f, [row.get(f.name) for row in rows]) for f in INDEX_SCHEMA]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=INDEX_SCHEMA), row_group_size=len(rows))
        self.rows += len(rows)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def index_rows(shard: dict[str, Any], label_flips: torch.Tensor | None = None,
               record_base: int | None = None, label_offset: int = 0) -> list[dict[str, Any]]:
    """The Parquet rows of one shard: its kept images, then the ones the quality filter dropped.
    label_flips: bool [N, A] by (identity, slot), slot = rank of the image among its identity's.
    record_base: the byte offset of the shard's RecordIO segment in train.rec (its files hold each
    record's offset in the segment); None: the job has no RecordIO. label_offset: the label of
    identity 0 (`output.label_offset`)."""
    columns = set(INDEX_SCHEMA.names)
    rows: list[dict[str, Any]] = []
    slot: dict[int, int] = {}
    for f in sorted(shard["files"], key=lambda f: (f["identity"], f["sample"])):
        i = f["identity"]
        slot[i] = slot.get(i, -1) + 1
        flip = bool(label_flips[i, slot[i]]) if label_flips is not None else None
        row = {**{k: v for k, v in f.items() if k in columns}, "filtered": False, "label_flip": flip,
               "label": label_offset + i}
        if row.get("record_offset") is not None:
            row["record_offset"] = None if record_base is None else record_base + row["record_offset"]
        rows.append(row)
    gone = {"filtered": True, "path": None, "label_flip": None, "tar": None, "member": None,
            "tar_offset": None, "record_id": None, "record_offset": None}
    rows += [{**{k: v for k, v in f.items() if k in columns}, **gone, "label": label_offset + f["identity"]}
             for f in shard.get("filtered", [])]
    return rows


def write_index(ctx: PackageContext) -> None:
    """dataset/index.parquet from the shards' file lists, one shard in memory at a time."""
    with tempfile.TemporaryDirectory(prefix="idforge-index-") as tmp:
        path = Path(tmp) / "index.parquet"
        with path.open("wb") as out, ParquetIndexWriter(out) as writer:
            groups = 0
            for s in ctx.shards:  # one shard's file list in memory at a time
                rows = index_rows(s, ctx.label_flips, ctx.record_base.get(s["shard"]), ctx.spec.output.label_offset)
                writer.write_rows(rows)
                groups += bool(rows)
            ctx.index_rows, ctx.index_row_groups = writer.rows, groups
        ctx.upload(layout.INDEX, path, "application/vnd.apache.parquet")


class Index:
    name = "index"
    always = True  # not a format the spec names: every job has its index

    def write_shard(self, ctx: ShardContext) -> None:
        """The shard's file list: each kept image's facts and where the formats put it (the index
        itself is written at finalize, from the shards' file lists)."""
        for record in ctx.records:
            where = ctx.locations.get((record["identity"], record["sample"]), {})
            ctx.files.append({**record, **where})

    def package(self, ctx: PackageContext) -> None:
        write_index(ctx)
