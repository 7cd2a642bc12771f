"""Dataset output formats, read back by independent readers: the `webdataset` library for the tar
shards, a RecordIO reader written here from the dmlc/insightface format description (it shares no
parsing code with workers/outputs/recordio.py), and pyarrow.parquet for the index."""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from workers.outputs.index import INDEX_SCHEMA, ParquetIndexWriter
from workers.outputs.recordio import RecordIOPackager, write_recordio_segment
from workers.outputs.webdataset import webdataset_sample, write_webdataset_tar

# ---- WebDataset ------------------------------------------------------------------------------


def _samples(identities: range, per_identity: int, seed: int) -> list[tuple[str, dict[str, bytes]]]:
    rng = random.Random(seed)
    out = []
    for i in identities:
        for s in range(per_identity):
            image = rng.randbytes(rng.randrange(50, 400))
            meta = {"seed": rng.getrandbits(63), "reference_cosine": round(rng.random(), 6), "shard": seed}
            out.append(webdataset_sample(i, s, "jpg", image, meta))
    return out


def test_webdataset_shards_read_back_with_the_webdataset_library(tmp_path: Path) -> None:
    shards = [_samples(range(3), 4, seed=0), _samples(range(3, 5), 4, seed=1)]
    urls = []
    for k, samples in enumerate(shards):
        path = tmp_path / f"{k:06d}.tar"
        with path.open("wb") as f:
            assert write_webdataset_tar(f, samples) == len(samples)
        urls.append(str(path))
    expected = {key: members for samples in shards for key, members in samples}
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [g["__key__"] for g in got] == list(expected)  # every sample, in order
    for g in got:
        members = expected[g["__key__"]]
        assert {k for k in g if not k.startswith("__")} == {"jpg", "cls", "json"}
        assert g["jpg"] == members["jpg"]
        meta = json.loads(g["json"])
        identity, sample = (int(p) for p in g["__key__"].split("_"))
        assert int(g["cls"].decode("ascii")) == identity == meta["identity"]
        assert meta["sample"] == sample
        assert g["json"] == members["json"]
    # webdataset's own decoder turns .cls into the int label
    decoded = next(iter(wds.WebDataset(urls[1:], shardshuffle=False).decode()))
    assert decoded["cls"] == 3 and decoded["json"]["identity"] == 3


def test_webdataset_json_is_sorted_and_compact() -> None:
    key, members = webdataset_sample(12, 3, "png", b"\x89PNG", {"seed": 5, "b": 1.5, "a": None})
    assert key == "000012_003"
    assert list(members) == ["png", "cls", "json"]
    assert members["cls"] == b"12"
    assert members["json"] == b'{"a":null,"b":1.5,"identity":12,"sample":3,"seed":5}'


def test_webdataset_tar_is_byte_deterministic_with_fixed_headers() -> None:
    samples = _samples(range(2), 3, seed=7)
    a, b = io.BytesIO(), io.BytesIO()
    write_webdataset_tar(a, samples)
    write_webdataset_tar(b, samples)
    assert a.getvalue() == b.getvalue()
    with tarfile.open(fileobj=io.BytesIO(a.getvalue())) as tar:
        infos = tar.getmembers()
    assert [m.name for m in infos[:3]] == ["000000_000.jpg", "000000_000.cls", "000000_000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in infos} == {(0, 0, 0, "", "", 0o644)}
    other = io.BytesIO()
    write_webdataset_tar(other, _samples(range(2), 3, seed=8))
    assert other.getvalue() != a.getvalue()


@pytest.mark.parametrize("key", ["000001.003", "a/b", "", "caf\u00e9"])
def test_webdataset_refuses_bad_keys(key: str) -> None:
    with pytest.raises(ValueError, match="sample key"):
        write_webdataset_tar(io.BytesIO(), [(key, {"jpg": b"x"})])


def test_webdataset_refuses_bad_samples() -> None:
    with pytest.raises(ValueError, match="twice"):
        write_webdataset_tar(io.BytesIO(), [("a", {"jpg": b"x"}), ("a", {"jpg": b"y"})])
    with pytest.raises(ValueError, match="no members"):
        write_webdataset_tar(io.BytesIO(), [("a", {})])
    with pytest.raises(ValueError, match="extension"):
        write_webdataset_tar(io.BytesIO(), [("a", {"x/y": b"x"})])
    with pytest.raises(ValueError, match="expected bytes"):
        write_webdataset_tar(io.BytesIO(), [("a", {"cls": 3})])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="identity"):
        webdataset_sample(-1, 0, "jpg", b"x", {})
    with pytest.raises(ValueError, match="image_ext"):
        webdataset_sample(1, 0, "jpeg", b"x", {})
    with pytest.raises(ValueError, match="identity"):
        webdataset_sample(1, 0, "jpg", b"x", {"identity": 2})
    with pytest.raises(ValueError, match="JSON"):
        webdataset_sample(1, 0, "jpg", b"x", {"reference_cosine": float("nan")})


# ---- RecordIO: an independent reader from the format description ------------------------------

MAGIC = 0xCED7230A


def read_record(rec: bytes, offset: int) -> tuple[bytes, int, int]:
    """One logical record at `offset`: (payload, offset of the next record, number of parts).

    Frame = uint32 magic, uint32 lrecord (cflag = top 3 bits, length = low 29), data, zero padding
    to 4 bytes. cflag 0 = whole record; 1, 2..., 3 = parts joined by the magic word they replaced.
    """
    payload, parts = b"", 0
    while True:
        magic, lrec = struct.unpack_from("<II", rec, offset)
        assert magic == MAGIC, f"bad magic at {offset}"
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        assert cflag in ((0, 1) if parts == 0 else (2, 3)), f"continuation flag {cflag} at {offset}"
        data = rec[offset + 8: offset + 8 + length]
        padded = (length + 3) // 4 * 4
        assert rec[offset + 8 + length: offset + 8 + padded] == bytes(padded - length)
        offset += 8 + padded
        payload += data
        parts += 1
        if cflag in (0, 3):
            return payload, offset, parts
        payload += struct.pack("<I", MAGIC)


def unpack(payload: bytes) -> tuple[int, Any, int, int, bytes]:
    """IRHeader = uint32 flag, float32 label, uint64 id, uint64 id2; flag > 0: `flag` float32 labels
    follow and replace `label`. Returns (flag, label or list of labels, id, id2, the rest)."""
    flag, label, rid, id2 = struct.unpack_from("<IfQQ", payload, 0)
    rest = payload[24:]
    if flag > 0:
        label = list(struct.unpack_from(f"<{flag}f", rest, 0))
        rest = rest[4 * flag:]
    return flag, label, rid, id2, rest


MAGIC_LE = struct.pack("<I", MAGIC)
TEMPLATE = "dataset/imagefolder/{identity:06d}/{sample:03d}.jpg"


def _images() -> list[tuple[int, int, int, bytes]]:
    """(record id, identity, sample, bytes) for 5 identities x 3 samples, identity 1's sample 1
    filtered out and identity 3 filtered out entirely; some images hold the magic word."""
    rng = random.Random(3)
    kept = [(i, s) for i in range(5) for s in range(3) if (i, s) != (1, 1) and i != 3]
    images = [(rid, i, s, rng.randbytes(rng.randrange(1, 300))) for rid, (i, s) in enumerate(kept, start=1)]
    # payload = 24-byte IRHeader + image: image offset 0 and 8 are word-aligned, 2 is not
    images[0] = (*images[0][:3], MAGIC_LE + b"abc")  # magic first: an empty first part
    images[1] = (*images[1][:3], b"12345678" + MAGIC_LE + MAGIC_LE + b"tail1")  # two in a row
    images[2] = (*images[2][:3], b"xy" + MAGIC_LE + b"unaligned")  # no split
    images[3] = (*images[3][:3], b"1234" + MAGIC_LE)  # magic at the very end: an empty last part
    return images


def _package(segments: list[list[tuple[int, int, int, bytes]]], n_images: int, n_identities: int = 5
             ) -> tuple[bytes, str, str, str]:
    blobs = []
    for seg in segments:
        f = io.BytesIO()
        assert write_recordio_segment(f, seg) == len(seg)
        blobs.append(f.getvalue())
    rec, idx, lst = io.BytesIO(), io.StringIO(), io.StringIO()
    packager = RecordIOPackager(rec, idx, lst, n_images=n_images, n_identities=n_identities,
                                path_template=TEMPLATE)
    for blob in blobs:
        packager.add_segment(io.BytesIO(blob))
    prop = packager.close(image_size=112)
    return rec.getvalue(), idx.getvalue(), lst.getvalue(), prop


def test_recordio_reads_back_with_an_independent_reader() -> None:
    images = _images()
    n = len(images)  # 11
    rec, idx, lst, prop = _package([images[:4], images[4:5], [], images[5:]], n)
    # the whole file, record by record
    records, offset, split = [], 0, 0
    while offset < len(rec):
        payload, nxt, parts = read_record(rec, offset)
        records.append((offset, payload))
        split += parts > 1
        offset = nxt
    assert len(records) == 1 + n + 5
    assert split == 3  # images 0, 1 and 3 hold the magic word at aligned offsets: split there
    # header record: labels = [first identity record, end)
    flag, label, rid, id2, rest = unpack(records[0][1])
    assert (flag, label, rid, id2, rest) == (2, [n + 1, n + 1 + 5], 0, 0, b"")
    # image records: label = identity (flag 0), id = record id, id2 = sample, then the image bytes
    for (rid_want, identity, sample, data), (_, payload) in zip(images, records[1:n + 1], strict=True):
        assert unpack(payload) == (0, float(identity), rid_want, sample, data)
    # identity records: [first image record, end); identity 3 has none: an empty range
    ranges = []
    for k, (_, payload) in enumerate(records[n + 1:]):
        flag, label, rid, id2, rest = unpack(payload)
        assert (flag, rid, rest) == (2, n + 1 + k, b"")
        ranges.append(tuple(int(x) for x in label))
    assert ranges == [(1, 4), (4, 6), (6, 9), (9, 9), (9, 12)]
    for k, (a, b) in enumerate(ranges):
        assert all(images[r - 1][1] == k for r in range(a, b))
    # .idx: "id\toffset" for every record, offsets pointing at that record
    idx_lines = [line.split("\t") for line in idx.splitlines()]
    assert [int(r) for r, _ in idx_lines] == list(range(len(records)))
    assert [int(o) for _, o in idx_lines] == [o for o, _ in records]
    assert unpack(read_record(rec, int(idx_lines[7][1]))[0])[2] == 7
    # .lst: "aligned\tpath\tlabel" per image, in record order
    assert lst.splitlines() == [f"1\t{TEMPLATE.format(identity=i, sample=s)}\t{i}" for _, i, s, _ in images]
    assert "dataset/imagefolder/000001/002.jpg" in lst  # the sample index survives the filtered one
    assert prop == "5,112,112"
    # what insightface's MXFaceDataset iterates: image records 1 .. header.label[0] - 1
    assert list(range(1, int(unpack(records[0][1])[1][0]))) == [r for r, *_ in images]


def test_recordio_is_byte_deterministic_whatever_the_segment_cut() -> None:
    images = _images()
    one = _package([images], len(images))
    assert one == _package([images], len(images))
    assert one == _package([images[:2], images[2:7], images[7:]], len(images))


def test_recordio_refuses_broken_segments() -> None:
    images = _images()
    with pytest.raises(ValueError, match="id 3 where 2 was expected: a gap"):
        _package([images[:1], images[2:]], len(images))
    with pytest.raises(ValueError, match="repeat"):
        _package([images[:3], images[2:]], len(images))
    swapped = [(1, 4, 0, b"a"), (2, 2, 0, b"b")]
    with pytest.raises(ValueError, match="must not decrease"):
        _package([swapped], 2)
    with pytest.raises(ValueError, match="10 image records in the segments, n_images=11"):
        _package([images[:10]], len(images))
    with pytest.raises(ValueError, match="more image records"):
        _package([images], len(images) - 1)
    with pytest.raises(ValueError, match="not an identity"):
        _package([[(1, 7, 0, b"a")]], 1)
    seg = io.BytesIO()
    write_recordio_segment(seg, images[:3])
    for broken, what in ((seg.getvalue()[:-6], "truncated"), (b"\0" * 8 + seg.getvalue(), "magic")):
        packager = RecordIOPackager(io.BytesIO(), io.StringIO(), io.StringIO(), n_images=3, n_identities=5,
                                    path_template=TEMPLATE)
        with pytest.raises(ValueError, match=what):
            packager.add_segment(io.BytesIO(broken))
    with pytest.raises(ValueError, match="path_template"):
        RecordIOPackager(io.BytesIO(), io.StringIO(), io.StringIO(), n_images=1, n_identities=1,
                         path_template="{label}.jpg")
    with pytest.raises(ValueError, match="2\\*\\*24"):
        RecordIOPackager(io.BytesIO(), io.StringIO(), io.StringIO(), n_images=(1 << 24) - 1, n_identities=1,
                         path_template=TEMPLATE)
    with pytest.raises(ValueError, match="record_id"):
        write_recordio_segment(io.BytesIO(), [(0, 0, 0, b"x")])


# ---- Parquet index ---------------------------------------------------------------------------


def _rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for k in range(start, start + n):
        filtered = k % 5 == 4
        row: dict[str, Any] = {
            "identity": k // 4, "sample": k % 4, "seed": (1 << 63) - 1 - k, "shard": k // 8,
            "aligned": k % 3 != 0, "filtered": filtered, "centre_cosine": 0.5 + k / 100,
        }
        if not filtered:
            row |= {"path": f"dataset/imagefolder/{k // 4:06d}/{k % 4:03d}.jpg", "size": 1000 + k,
                    "sha256": f"{k:064x}", "reference_cosine": 0.25}
        if k % 2:
            row["label_flip"] = k % 4 == 3
        rows.append(row)
    return rows


def _write(groups: list[list[dict[str, Any]]]) -> bytes:
    out = io.BytesIO()
    with ParquetIndexWriter(out) as w:
        for rows in groups:
            w.write_rows(rows)
    return out.getvalue()


def test_parquet_index_round_trips_with_nulls() -> None:
    groups = [_rows(8), _rows(5, start=8)]
    blob = _write(groups)
    f = pq.ParquetFile(io.BytesIO(blob))
    assert f.metadata.num_row_groups == 2 and f.metadata.num_rows == 13
    table = f.read()
    assert table.schema.equals(INDEX_SCHEMA)
    got = table.to_pylist()
    for want, row in zip([r for g in groups for r in g], got, strict=True):
        for name in INDEX_SCHEMA.names:
            if name in ("centre_cosine", "reference_cosine", "evaluator_centre_cosine") and want.get(name) is not None:
                assert row[name] == pytest.approx(want[name], rel=1e-6)  # float32
            else:
                assert row[name] == want.get(name), name
    assert got[4]["path"] is None and got[4]["size"] is None and got[4]["filtered"] is True
    assert got[0]["seed"] == (1 << 63) - 1  # derive_seed's range fits int64
    assert table.column("evaluator_centre_cosine").null_count == 13


def test_parquet_index_is_byte_deterministic() -> None:
    assert _write([_rows(8), _rows(5, start=8)]) == _write([_rows(8), _rows(5, start=8)])
    assert _write([_rows(8)]) != _write([_rows(7)])


@pytest.mark.parametrize(("change", "match"), [
    ({"colour": "red"}, "unknown column.*colour"),
    ({"identity": None}, "'identity' may not be null"),
    ({"identity": "7"}, "column 'identity'"),
    ({"identity": 1 << 31}, "column 'identity'"),
    ({"seed": 1 << 63}, "column 'seed'"),
    ({"sample": True}, "column 'sample'"),
    ({"aligned": 1}, "column 'aligned'"),
    ({"centre_cosine": "high"}, "column 'centre_cosine'"),
])
def test_parquet_index_refuses_bad_rows(change: dict[str, Any], match: str) -> None:
    rows = _rows(3)
    rows[1] |= change
    with pytest.raises(ValueError, match=match):
        _write([rows])


def test_parquet_index_refuses_a_missing_required_column() -> None:
    rows = _rows(2)
    del rows[1]["shard"]
    with pytest.raises(ValueError, match=r"row 1: missing column\(s\) \['shard'\]"):
        _write([rows])


def test_offset_labels_run_through_recordio_and_webdataset() -> None:
    """A job whose labels start at `output.label_offset` (an extension): RecordIO's records, its
    .lst and `property` carry the offset labels; WebDataset's key and .cls the label, its JSON both."""
    images = [(1, 10, 0, b"a"), (2, 10, 1, b"b"), (3, 12, 0, b"c")]  # identities 0 and 2 at offset 10
    seg = io.BytesIO()
    write_recordio_segment(seg, images)
    rec, idx, lst = io.BytesIO(), io.StringIO(), io.StringIO()
    packager = RecordIOPackager(rec, idx, lst, n_images=3, n_identities=3, path_template=TEMPLATE, first_label=10)
    packager.add_segment(io.BytesIO(seg.getvalue()))
    assert packager.close(image_size=112) == "13,112,112"  # every label is below the class count
    assert [line.split("\t")[2] for line in lst.getvalue().splitlines()] == ["10", "10", "12"]
    ranges, offset = [], 0
    data = rec.getvalue()
    while offset < len(data):
        payload, offset, _ = read_record(data, offset)
        _, label, rid, *_ = unpack(payload)
        if rid > 3:
            ranges.append(tuple(int(x) for x in label))
    assert ranges == [(1, 3), (3, 3), (3, 4)]  # identity 1 (label 11) has no image: an empty range
    with pytest.raises(ValueError, match="not an identity"):  # label 9 is below the offset
        p = RecordIOPackager(io.BytesIO(), io.StringIO(), io.StringIO(), n_images=1, n_identities=3,
                             path_template=TEMPLATE, first_label=10)
        s = io.BytesIO()
        write_recordio_segment(s, [(1, 9, 0, b"x")])
        p.add_segment(io.BytesIO(s.getvalue()))

    key, members = webdataset_sample(2, 1, "jpg", b"img", {"seed": 5}, label=12)
    assert key == "000012_001" and members["cls"] == b"12"
    assert json.loads(members["json"]) == {"identity": 2, "label": 12, "sample": 1, "seed": 5}
    plain_key, plain = webdataset_sample(2, 1, "jpg", b"img", {"seed": 5})
    assert plain_key == "000002_001" and b"label" not in plain["json"]  # offset 0: the bytes as before
