"""insightface's MXNet RecordIO: a segment of image records per render shard
(`shards/{shard:05d}/images.rec`), joined at finalize into `dataset/recordio/train.rec`, `.idx`,
`.lst` and `property` (`app.layout.RECORDIO`).

The writers take open files, so the caller decides where bytes go (a temp file that is then
uploaded) and tests read the results with an independent reader. They are byte-deterministic: the
same input gives the same bytes, so a rerun of a shard overwrites its segment with an identical one.

Format facts used here:
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

import struct
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from app import layout

if TYPE_CHECKING:
    from workers.outputs import PackageContext, ShardContext

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


def write_recordio_segment(out: BinaryIO, images: Iterable[tuple[int, int, int, bytes]],
                           offsets: list[int] | None = None) -> int:
    """Write image records (record_id, identity, sample, image bytes) to `out`; returns how many.

    Each record's IRHeader holds label = float(identity), id = record_id, id2 = sample. A segment
    is one render shard's part of `train.rec`; `RecordIOPackager` joins them and checks the ids.
    `offsets`, when given, gets each record's byte offset in the segment.
    """
    n, pos = 0, 0
    for record_id, identity, sample, data in images:
        _check_int("record_id", record_id, 1, FLOAT32_EXACT)
        _check_int("identity", identity, 0, FLOAT32_EXACT)
        _check_int("sample", sample, 0, 1 << 64)
        framed = _frame(_payload(float(identity), record_id, sample, data))
        if offsets is not None:
            offsets.append(pos)
        out.write(framed)
        pos += len(framed)
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
                 path_template: str, first_label: int = 0) -> None:
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
        _check_int("first_label", first_label, 0, FLOAT32_EXACT - n_identities + 1)
        self.n_images, self.n_identities, self.path_template = n_images, n_identities, path_template
        self.first_label = first_label  # identity k's records carry label first_label + k
        self.offset = 0  # bytes written to rec so far
        self.next_id = 1  # the record id the next image record must have
        self.first_image: list[int | None] = [None] * n_identities  # first image record of each identity
        self.last_label = first_label - 1
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
        lab, lo = int(label), self.first_label
        if lab != label or not lo <= lab < lo + self.n_identities:
            raise ValueError(f"record {rid}: label {label} is not an identity's in [{lo}, {lo + self.n_identities})")
        if lab < self.last_label:
            raise ValueError(f"record {rid}: label {lab} after {self.last_label}; labels must not decrease")
        if self.first_image[lab - lo] is None:
            self.first_image[lab - lo] = rid
        self.last_label = lab
        self.next_id += 1
        self.idx.write(f"{rid}\t{offset}\n")
        path = self.path_template.format(identity=lab, sample=sample)
        self.lst.write(f"1\t{path}\t{lab}\n")

    def close(self, image_size: int) -> str:
        """Write the identity records; returns the `property` text "{classes},{size},{size}", where
        classes = first_label + n_identities (every label is below it)."""
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
        return f"{self.first_label + self.n_identities},{image_size},{image_size}"



def lst_path_template(formats: Sequence[str], ext: str) -> str:
    """The .lst's path column: the ImageFolder file when the job has loose images, else the image's
    WebDataset member (`dataset/webdataset/...tar` is not named: the member name is unique in the
    dataset), else a virtual path `{identity:06d}/{sample:03d}.{ext}` (the layout insightface's
    im2rec reads, relative to no directory: the image is in train.rec alone)."""
    if "imagefolder" in formats:
        return layout.IMAGEFOLDER.replace("{ext}", ext)
    if "webdataset" in formats:
        return "{identity:06d}_{sample:03d}." + ext
    return "{identity:06d}/{sample:03d}." + ext


def recordio_id(identity: int, slot: int, images_per_identity: int) -> int:
    """Record id of an identity's `slot`-th kept image in train.rec: 1 + identity * A + slot (record 0
    is the header; the identity records follow the images)."""
    return 1 + identity * images_per_identity + slot


class RecordIO:
    name = "recordio"
    always = False

    def write_shard(self, ctx: ShardContext) -> None:
        """The shard's segment: its kept images as records, ids in (identity, slot) order, each
        labelled output.label_offset + identity."""
        a, base = ctx.spec.images_per_identity, ctx.spec.output.label_offset
        order = [(recordio_id(i, slot, a), i, s) for i in ctx.ids for slot, s in enumerate(ctx.kept[i])]
        records = ((rid, base + i, s, ctx.data[(i, s)]) for rid, i, s in order)
        offsets: list[int] = []
        segment = ctx.keys.shard_recordio(ctx.shard)
        ctx.put_stream(segment, "application/octet-stream",
                       lambda out: write_recordio_segment(out, records, offsets))
        for (rid, i, s), off in zip(order, offsets, strict=True):
            # the offset in the segment; the index adds the segment's place in train.rec
            ctx.locate(i, s, record_id=rid, record_offset=off)

    def package(self, ctx: PackageContext) -> None:
        """insightface's train.rec/.idx/.lst/property from the shards' segments, streamed through files."""
        spec, storage, keys = ctx.spec, ctx.storage, ctx.keys
        n_images = spec.rendered_identities * spec.images_per_identity
        with tempfile.TemporaryDirectory(prefix="idforge-rec-") as tmp:
            d = Path(tmp)
            with (d / "train.rec").open("wb") as rec, (d / "train.idx").open("w") as idx, \
                    (d / "train.lst").open("w") as lst:
                packer = RecordIOPackager(
                    rec, idx, lst, n_images=n_images, n_identities=spec.rendered_identities,
                    path_template=lst_path_template(spec.output.formats, ctx.ext),
                    first_label=spec.output.label_offset)
                for s in ctx.shards:
                    ctx.record_base[s["shard"]] = packer.offset
                    segment = d / "segment.rec"
                    storage.get_file(keys.shard_recordio(s['shard']), segment)
                    with segment.open("rb") as f:
                        packer.add_segment(f)
                    segment.unlink()
                (d / "property").write_text(packer.close(spec.output.image_size))
            for name, ctype in (("train.rec", "application/octet-stream"), ("train.idx", "text/plain"),
                                ("train.lst", "text/plain"), ("property", "text/plain")):
                ctx.upload(layout.RECORDIO.format(name=name), d / name, ctype)
