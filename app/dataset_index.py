"""Reading a job's Parquet index (`dataset/index.parquet`) by byte ranges, its page cursors, and
the images the index locates inside a WebDataset tar or the RecordIO `train.rec`.

Used by the API (`GET /v1/jobs/{id}/artifacts` pages the index), `idforge download` and
`idforge reproduce`. Kernel code: pyarrow, no torch.

The index is written one row group per render shard, each sorted by (identity, sample), the kept
images first and then the ones the quality filter dropped (`filtered = true`). A page reads the
footer (once per job: `JobCache`) and only the row groups it needs, each in one ranged read, so
its cost does not depend on the job's size.

A cursor is opaque to clients: base64url of `{row group}.{row}.{check}`, where `check` binds the
position to the job and its index (sha256 of `{job_id}|{index sha256}|{rg}|{row}`, 16 hex). It is
an integrity check, not a secret: a cursor of another job, an edited one or one past the end is
refused (`CursorError`, a 422 naming the parameter). Old manifests (`files` inline) page with the
same cursors over their list (row group 0, row = position).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from app.layout import INDEX

if TYPE_CHECKING:  # pyarrow (and numpy with it) loads when an index is first read, not with the API
    import pyarrow.parquet as pq

V = TypeVar("V")
ReadRange = Callable[[int, int], bytes]  # (start, length) -> bytes of one object
FOOTER_READ = 64 * 1024  # the first read of an index: its tail, which holds the footer of most
MANIFEST_VERSION = 3  # manifests with the per-image list in the index alone; 2 and older: inline `files`
CURSOR_MAX = 200


def manifest_version(manifest: dict[str, Any]) -> int:
    """3 for manifests whose images are listed by the index alone; older ones list `files` inline."""
    v = manifest.get("manifest_version")
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    fmt = str(manifest.get("format", ""))
    m = re.fullmatch(r"idforge\.manifest/(\d+)", fmt)
    return int(m.group(1)) if m else 1


def inline_files(manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The images of an old manifest (inline `files`), or None when the index lists them."""
    files = manifest.get("files")
    return files if isinstance(files, list) else None


# ---- ranged reads ---------------------------------------------------------------------------------


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over an object read by byte ranges. `prefetch` fetches a span in
    one read; reads inside a fetched span cost nothing, others are one ranged read each."""

    def __init__(self, read: ReadRange, size: int) -> None:
        super().__init__()
        self._read, self.size, self.pos = read, size, 0
        self._spans: list[tuple[int, bytes]] = []
        self.reads = 0  # ranged reads made (tests and benchmarks count them)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def prefetch(self, start: int, end: int) -> None:
        start, end = max(0, start), min(self.size, end)
        if end > start and self._cached(start, end - start) is None:
            self._spans.append((start, self._fetch(start, end - start)))

    def _fetch(self, start: int, length: int) -> bytes:
        self.reads += 1
        data = self._read(start, length)
        if len(data) != length:
            raise OSError(f"short ranged read: {len(data)} of {length} bytes at {start}")
        return data

    def _cached(self, start: int, length: int) -> bytes | None:
        for s, data in self._spans:
            if s <= start and start + length <= s + len(data):
                return data[start - s:start - s + length]
        return None

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        data = self._cached(self.pos, n)
        if data is None:
            data = self._fetch(self.pos, n)
        b[:n] = data
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        n = self.size - self.pos if size is None or size < 0 else size
        buf = bytearray(max(0, min(n, self.size - self.pos)))
        got = self.readinto(buf)
        return bytes(buf[:got])


class IndexFile:
    """An index opened by ranged reads: its footer (given, or read once from the tail) and its row
    groups, each fetched in one read."""

    def __init__(self, read: ReadRange, size: int, metadata: pq.FileMetaData | None = None) -> None:
        import pyarrow.parquet as pq

        self.file = RangeFile(read, size)
        if metadata is None:
            self.file.prefetch(size - FOOTER_READ, size)
        self.parquet = pq.ParquetFile(self.file, metadata=metadata)
        self.metadata = self.parquet.metadata

    @property
    def row_groups(self) -> int:
        return int(self.metadata.num_row_groups)

    def rows_in(self, rg: int) -> int:
        return int(self.metadata.row_group(rg).num_rows)

    def read_row_group(self, rg: int) -> list[dict[str, Any]]:
        """Row group `rg`'s rows, fetched in one ranged read."""
        meta = self.metadata.row_group(rg)
        start, end = None, 0
        for c in range(meta.num_columns):
            col = meta.column(c)
            first = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset \
                else col.data_page_offset
            start = first if start is None else min(start, first)
            end = max(end, first + col.total_compressed_size)
        if start is not None:
            self.file.prefetch(start, end)
        rows: list[dict[str, Any]] = self.parquet.read_row_group(rg).to_pylist()
        for row in rows:  # float32 columns back to the 6 decimals they were written with
            for k, v in row.items():
                if isinstance(v, float):
                    row[k] = round(v, 6)
        return rows


class JobCache(Generic[V]):
    """What the API keeps of recently listed jobs, by (job, digest of the object it came from): a
    small LRU (an index footer is about a kilobyte per row group; a shard-objects table, about
    130 bytes per shard)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> V | None:
        with self._lock:
            got = self._items.get(key)
            if got is not None:
                self._items.move_to_end(key)
            return got

    def put(self, key: tuple[str, str], value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def parse_objects(data: bytes) -> dict[int, list[dict[str, Any]]]:
    """A job's shard-objects table (`layout.OBJECTS`, JSON lines of `path`, `shard`, `size`,
    `sha256`) by shard. ValueError on a line that is not such an object."""
    out: dict[int, list[dict[str, Any]]] = {}
    for n, line in enumerate(data.splitlines(), 1):
        row = json.loads(line)
        if not (isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(row.get("shard"), int)
                and isinstance(row.get("size"), int) and isinstance(row.get("sha256"), str)):
            raise ValueError(f"line {n}: expected path, shard, size and sha256, got {line[:200]!r}")  # noqa: TRY004 (bad data)
        out.setdefault(row["shard"], []).append(row)
    return out


def iter_index(read: ReadRange, size: int, *, kept_only: bool = True) -> Iterator[dict[str, Any]]:
    """Every row of an index, one row group in memory at a time, in (identity, sample) order per
    shard; `kept_only`: without the rows the quality filter dropped."""
    f = IndexFile(read, size)
    for rg in range(f.row_groups):
        for row in f.read_row_group(rg):
            if not (kept_only and row.get("filtered")):
                yield row


def manifest_files(manifest: dict[str, Any], open_index: Callable[[], tuple[ReadRange, int]]
                   ) -> Iterator[dict[str, Any]]:
    """The job's kept images in (identity, sample) order: an old manifest's inline `files`, else
    the index's rows, streamed (`open_index()` gives the index's (read, size))."""
    inline = inline_files(manifest)
    if inline is not None:
        yield from sorted(inline, key=lambda f: (f["identity"], f["sample"]))
        return
    read, size = open_index()
    yield from iter_index(read, size)


def local_files(root: Path, manifest: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """`manifest_files` of a dataset directory (a job's, `idforge generate`'s or a download)."""
    root = Path(root)
    if manifest is None:
        manifest = json.loads((root / "manifest.json").read_bytes())
    return manifest_files(manifest, lambda: file_reader(root / INDEX))


def local_reader(root: Path) -> Callable[[str, int, int | None], bytes]:
    """`read_image`'s object reader over a dataset directory."""
    root = Path(root)

    def read(key: str, start: int, length: int | None) -> bytes:
        p = (root / key).resolve()
        if not p.is_relative_to(root.resolve()):
            raise ValueError(f"object {key!r} is outside the dataset directory")
        with p.open("rb") as fh:
            fh.seek(start)
            return fh.read() if length is None else fh.read(length)
    return read


def file_reader(path: Any) -> tuple[ReadRange, int]:
    """(read, size) of a local file."""
    import os

    def read(start: int, length: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read(length)
    return read, os.path.getsize(path)


# ---- cursors --------------------------------------------------------------------------------------


class CursorError(ValueError):
    """A cursor that is malformed, of another job or index, or past the end."""


def _check(tag: str, rg: int, row: int) -> str:
    return hashlib.sha256(f"{tag}|{rg}|{row}".encode()).hexdigest()[:16]


def encode_cursor(tag: str, rg: int, row: int) -> str:
    raw = f"{rg}.{row}.{_check(tag, rg, row)}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_RAW = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.([0-9a-f]{16})")


def decode_cursor(tag: str, cursor: str) -> tuple[int, int]:
    """(row group, row) of a cursor that `encode_cursor` made for `tag`; CursorError otherwise."""
    if not isinstance(cursor, str) or not cursor or len(cursor) > CURSOR_MAX or \
            not re.fullmatch(r"[A-Za-z0-9_-]+", cursor):
        raise CursorError("not a cursor of this listing: pass the `next` of the previous page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError) as e:
        raise CursorError("not a cursor of this listing: pass the `next` of the previous page") from e
    m = _RAW.fullmatch(raw)
    if not m or m.group(3) != _check(tag, int(m.group(1)), int(m.group(2))):
        raise CursorError("not a cursor of this listing (malformed, edited, or another job's): pass "
                          "the `next` of the previous page")
    return int(m.group(1)), int(m.group(2))


# ---- images inside the containers -----------------------------------------------------------------

_RECORD_MAGIC = 0xCED7230A
_FRAME = struct.Struct("<II")
_IR_HEADER_SIZE = 24


def image_name(row: dict[str, Any]) -> str:
    """An image's name in listings: its ImageFolder path, else `{tar}#{member}`, else
    `{train.rec}#{record_id}`."""
    if row.get("path"):
        return str(row["path"])
    if row.get("tar") and row.get("member"):
        return f"{row['tar']}#{row['member']}"
    if row.get("record_id") is not None:
        return f"{row.get('rec') or 'dataset/recordio/train.rec'}#{row['record_id']}"
    raise ValueError(f"index row of image ({row.get('identity')}, {row.get('sample')}) names no location")


def image_location(row: dict[str, Any]) -> tuple[str, int, int | None]:
    """(object, byte offset, length) of an image: the loose file (0, None), the tar member's data
    (its offset, its size) or the RecordIO record's frame (its offset, None: `read_record`)."""
    if row.get("path"):
        return str(row["path"]), 0, None
    if row.get("tar") and row.get("tar_offset") is not None:
        return str(row["tar"]), int(row["tar_offset"]), int(row["size"])
    if row.get("record_offset") is not None:
        return str(row.get("rec") or "dataset/recordio/train.rec"), int(row["record_offset"]), None
    raise ValueError(f"index row of image ({row.get('identity')}, {row.get('sample')}) names no location")


def read_record(read: ReadRange, offset: int, hint: int = 0) -> bytes:
    """The payload after the IRHeader (the image bytes) of the RecordIO record framed at `offset`,
    its parts joined as dmlc's reader joins them (the magic word restored between parts)."""
    magic = struct.pack("<I", _RECORD_MAGIC)
    payload = bytearray()
    pos, first = offset, True
    while True:
        frame = read(pos, _FRAME.size)
        if len(frame) != _FRAME.size:
            raise ValueError(f"RecordIO: truncated frame at {pos}")
        m, lrec = _FRAME.unpack(frame)
        if m != _RECORD_MAGIC:
            raise ValueError(f"RecordIO: no record at offset {pos}")
        flag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        if not first:
            payload += magic
        payload += read(pos + _FRAME.size, length)
        pos += _FRAME.size + length + (-length % 4)
        first = False
        if flag in (0, 3):
            break
    return bytes(payload[_IR_HEADER_SIZE:])


def read_image(row: dict[str, Any], read_object: Callable[[str, int, int | None], bytes]) -> bytes:
    """An image's bytes wherever the index says it is; read_object(key, start, length or None:
    the whole object for a loose file) reads the dataset's objects (relative keys)."""
    key, start, length = image_location(row)
    if row.get("path"):
        return read_object(key, 0, None)
    if length is not None:
        return read_object(key, start, length)
    return read_record(lambda s, n: read_object(key, s, n), start)
