"""Dataset output formats as streaming writers: WebDataset tar shards, insightface RecordIO and the
Parquet index of every image.

No broker, job store or storage here: every writer takes open files, so the pipeline decides where
bytes go (a temp file that is then uploaded) and tests read the results with independent readers.
Every writer is byte-deterministic: the same input gives the same bytes, so a rerun of a shard
overwrites its objects with identical ones.

Format facts used here:
- WebDataset: a POSIX tar whose members `{key}.{ext}` are grouped into samples by `key`, the member
  name up to its first dot; `.cls` holds the class as ASCII decimal.
- MXNet RecordIO (dmlc-core): each record is framed as uint32 magic 0xced7230a, uint32 lrecord
  (upper 3 bits: continuation flag, lower 29 bits: length), the payload, zero padding to 4 bytes;
  little-endian. A payload holding the magic word at a 4-byte aligned offset is split there into
  parts (flag 1 first, 2 middle, 3 last; the magic itself is dropped and restored by readers).
  An image record's payload starts with IRHeader `<IfQQ` (flag, label, id, id2); flag > 0 means
  `flag` float32 labels follow the header and `label` is 0; the encoded image comes last.
- insightface's layout: record 0's labels are [first identity record, end); image records are
  ids 1..n_images with the identity as their float label; identity record k's labels are
  [first image record, end). `.idx` lines are "{id}\\t{byte offset}", `.lst` lines
  "{aligned}\\t{path}\\t{label}", `property` is "{classes},{height},{width}".
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, BinaryIO, Self, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

# ---- WebDataset ------------------------------------------------------------------------------

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
                      meta: Mapping[str, Any]) -> tuple[str, dict[str, bytes]]:
    """One WebDataset sample: the image, `.cls` (identity, ASCII decimal) and `.json` (`meta` with
    identity and sample added; sorted keys, compact, NaN refused)."""
    key = sample_key(identity, sample)
    if image_ext not in IMAGE_EXTS:
        raise ValueError(f"image_ext: expected one of {IMAGE_EXTS}, got {image_ext!r}")
    for name, v in (("identity", identity), ("sample", sample)):
        if name in meta and meta[name] != v:
            raise ValueError(f"meta[{name!r}] is {meta[name]!r} but the sample's {name} is {v}")
    try:
        doc = json.dumps({**meta, "identity": identity, "sample": sample}, sort_keys=True,
                         separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta of sample {key}: not JSON-serialisable: {e}") from e
    return key, {image_ext: bytes(image_bytes), "cls": str(identity).encode("ascii"),
                 "json": doc.encode("utf-8")}


# ---- MXNet / insightface RecordIO ------------------------------------------------------------

RECORD_MAGIC = 0xCED7230A  # dmlc recordio's frame marker
_MAGIC = struct.pack("<I", RECORD_MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrecord
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2: the image record header (24 bytes)
MAX_PART = 1 << 29  # lrecord's length field has 29 bits
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3  # continuation flags
FLOAT32_EXACT = 1 << 24  # integers up to here survive a float32 label exactly
COPY_CHUNK = 1 << 20  # bytes per read when copying segments into the .rec


def _frame(payload: bytes) -> bytes:
    """Frame one record as dmlc's writer does: split at aligned magic words, pad the end to 4 bytes."""
    if len(payload) >= MAX_PART:
        raise ValueError(f"record payload of {len(payload)} bytes: RecordIO allows less than 2**29")
    parts, start = [], 0
    pos = payload.find(_MAGIC)
    while pos != -1:
        if pos % 4 == 0:  # aligned: the reader would take it for a frame, so split here
            parts.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC, start)
        else:
            pos = payload.find(_MAGIC, pos + 1)
    parts.append(payload[start:])
    out = bytearray()
    for k, part in enumerate(parts):
        flag = WHOLE if len(parts) == 1 else FIRST if k == 0 else LAST if k == len(parts) - 1 else MIDDLE
        out += _FRAME.pack(RECORD_MAGIC, flag << 29 | len(part))
        out += part
    out += bytes(-len(out) % 4)  # inner parts are whole words already: only the end needs padding
    return bytes(out)


def _payload(labels: float | Sequence[float], record_id: int, id2: int, data: bytes = b"") -> bytes:
    """IRHeader (+ float32 labels when `labels` is a sequence) + data, as mxnet's `pack` lays it out."""
    if isinstance(labels, (int, float)):
        return IR_HEADER.pack(0, float(labels), record_id, id2) + data
    return IR_HEADER.pack(len(labels), 0.0, record_id, id2) + struct.pack(f"<{len(labels)}f", *labels) + data


def _check_int(name: str, v: int, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}), got {v!r}")


def write_recordio_segment(out: BinaryIO, images: Iterable[tuple[int, int, int, bytes]]) -> int:
    """Write image records (record_id, identity, sample, image bytes) to `out`; returns how many.

    Each record's IRHeader holds label = float(identity), id = record_id, id2 = sample. A segment
    is one render shard's part of `train.rec`; `RecordIOPackager` joins them and checks the ids.
    """
    n = 0
    for record_id, identity, sample, data in images:
        _check_int("record_id", record_id, 1, FLOAT32_EXACT)
        _check_int("identity", identity, 0, FLOAT32_EXACT)
        _check_int("sample", sample, 0, 1 << 64)
        out.write(_frame(_payload(float(identity), record_id, sample, data)))
        n += 1
    return n


class _Copier:
    """Copies framed records from a segment to the .rec unchanged, keeping each one's IRHeader."""

    def __init__(self, src: BinaryIO, dst: BinaryIO) -> None:
        self.src, self.dst = src, dst
        self.copied = 0  # bytes written to dst

    def _read(self, n: int, what: str) -> bytes:
        data = self.src.read(n)
        if len(data) != n:
            raise ValueError(f"segment truncated: {what} needs {n} bytes, {len(data)} left")
        return data

    def next_header(self) -> tuple[int, float, int, int] | None:
        """Copy one record; its IRHeader (flag, label, id, id2), or None at the segment's end."""
        head = bytearray()
        flag_expected: tuple[int, ...] = (WHOLE, FIRST)
        while True:
            frame = self.src.read(_FRAME.size)
            if not frame and flag_expected == (WHOLE, FIRST):
                return None
            if len(frame) != _FRAME.size:
                raise ValueError(f"segment truncated inside a record frame ({len(frame)} of 8 bytes)")
            magic, lrec = _FRAME.unpack(frame)
            if magic != RECORD_MAGIC:
                raise ValueError(f"segment: bad record magic {magic:#010x} (expected {RECORD_MAGIC:#010x})")
            flag, length = lrec >> 29, lrec & (MAX_PART - 1)
            if flag not in flag_expected:
                raise ValueError(f"segment: continuation flag {flag} where {flag_expected} was expected")
            self.dst.write(frame)
            self.copied += len(frame)
            remaining, payload_left = length + (-length % 4), length
            while remaining:
                buf = self._read(min(COPY_CHUNK, remaining), "a record payload")
                self.dst.write(buf)
                self.copied += len(buf)
                real = buf[:max(0, payload_left)]  # payload bytes, not padding
                head += real[:max(0, IR_HEADER.size - len(head))]
                payload_left -= len(buf)
                remaining -= len(buf)
            if flag in (WHOLE, LAST):
                break
            head += _MAGIC[:max(0, IR_HEADER.size - len(head))]  # the split-off magic word
            flag_expected = (MIDDLE, LAST)
        if len(head) < IR_HEADER.size:
            raise ValueError(f"segment: a record of {len(head)} bytes is too short for its IRHeader")
        flag_, label, rid, id2 = IR_HEADER.unpack(bytes(head))
        return flag_, label, rid, id2


class RecordIOPackager:
    """Joins render shards' RecordIO segments into insightface's `train.rec`, `.idx`, `.lst`.

    Streams: the header record first, then each segment's records copied in chunks (never the whole
    .rec in memory) while they are indexed, then one identity record per identity. Segments come in
    shard order; their record ids must run 1, 2, ... with no gap and their labels never decrease.
    Identities with no image (all filtered) get an empty range [a, a).
    """

    def __init__(self, rec: BinaryIO, idx: TextIO, lst: TextIO, *, n_images: int, n_identities: int,
                 path_template: str) -> None:
        _check_int("n_images", n_images, 1, FLOAT32_EXACT)
        _check_int("n_identities", n_identities, 1, FLOAT32_EXACT)
        if n_images + n_identities + 1 > FLOAT32_EXACT:
            raise ValueError(f"{n_images} images + {n_identities} identities: insightface stores record "
                             f"ids as float32 labels, exact only up to 2**24 records")
        try:
            path_template.format(identity=0, sample=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"path_template {path_template!r}: needs only {{identity}} and {{sample}}: {e}") from e
        self.rec, self.idx, self.lst = rec, idx, lst
        self.n_images, self.n_identities, self.path_template = n_images, n_identities, path_template
        self.offset = 0  # bytes written to rec so far
        self.next_id = 1  # the record id the next image record must have
        self.first_image: list[int | None] = [None] * n_identities  # first image record of each identity
        self.last_label = -1
        self.closed = False
        self._write(0, [float(n_images + 1), float(n_images + 1 + n_identities)], 0)

    def _write(self, record_id: int, labels: list[float], id2: int) -> None:
        self.idx.write(f"{record_id}\t{self.offset}\n")
        blob = _frame(_payload(labels, record_id, id2))
        self.rec.write(blob)
        self.offset += len(blob)

    def add_segment(self, f: BinaryIO) -> int:
        """Copy and index one segment (a readable binary file); returns its number of records."""
        if self.closed:
            raise ValueError("add_segment after close")
        copier = _Copier(f, self.rec)
        n = 0
        while True:
            start = self.offset + copier.copied
            header = copier.next_header()
            if header is None:
                break
            self._index(start, *header)
            n += 1
        self.offset += copier.copied
        return n

    def _index(self, offset: int, flag: int, label: float, rid: int, sample: int) -> None:
        if flag != 0:
            raise ValueError(f"record {rid}: image records carry one float label (flag 0), got flag {flag}")
        if rid != self.next_id:
            what = "a gap" if rid > self.next_id else "a repeat or reordering"
            raise ValueError(f"record id {rid} where {self.next_id} was expected: {what} in the segments")
        if rid > self.n_images:
            raise ValueError(f"record id {rid}: more image records than n_images={self.n_images}")
        identity = int(label)
        if identity != label or not 0 <= identity < self.n_identities:
            raise ValueError(f"record {rid}: label {label} is not an identity in [0, {self.n_identities})")
        if identity < self.last_label:
            raise ValueError(f"record {rid}: label {identity} after {self.last_label}; labels must not decrease")
        if self.first_image[identity] is None:
            self.first_image[identity] = rid
        self.last_label = identity
        self.next_id += 1
        self.idx.write(f"{rid}\t{offset}\n")
        path = self.path_template.format(identity=identity, sample=sample)
        self.lst.write(f"1\t{path}\t{identity}\n")

    def close(self, image_size: int) -> str:
        """Write the identity records; returns the `property` text "{classes},{size},{size}"."""
        _check_int("image_size", image_size, 1, 1 << 16)
        if self.closed:
            raise ValueError("close called twice")
        if self.next_id - 1 != self.n_images:
            raise ValueError(f"{self.next_id - 1} image records in the segments, n_images={self.n_images}")
        self.closed = True
        bounds = []  # [first, end) image records of each identity, from the last one back
        stop = self.n_images + 1
        for first in reversed(self.first_image):
            start = stop if first is None else first  # no image: the empty range [stop, stop)
            bounds.append((start, stop))
            stop = start
        for k, (start, stop) in enumerate(reversed(bounds)):
            self._write(self.n_images + 1 + k, [float(start), float(stop)], 0)
        return f"{self.n_identities},{image_size},{image_size}"


# ---- Parquet index ---------------------------------------------------------------------------

INDEX_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=True),  # dataset-relative image path; null: filtered out
    pa.field("identity", pa.int32(), nullable=False),
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
                                        use_dictionary=["path", "sha256"], write_statistics=True)

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
