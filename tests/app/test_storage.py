"""Storage backends: S3 against moto's server (fast) and the local directory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config

from app.errors import StorageError, StorageKeyMissing
from app.layout import JobKeys
from app.servers import free_port
from app.storage import MULTIPART_PART, LocalStorage, S3Storage, Storage


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_client(endpoint: str) -> object:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test",
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


@pytest.fixture(params=["s3", "local"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store", signing_key=b"k" * 32,
                            base_url="http://api.test")
    endpoint = request.getfixturevalue("moto_endpoint")
    client = s3_client(endpoint)
    bucket = f"b{time.time_ns()}"
    client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    return S3Storage(bucket, client=client)


def test_round_trip_list_and_delete(storage: Storage) -> None:
    keys = JobKeys.for_job("jobs", "j123")
    storage.put_bytes(keys.image(0, 1, "jpg"), b"img01", "image/jpeg")
    storage.put_bytes(keys.image(2, 0, "jpg"), b"img20", "image/jpeg")
    storage.put_bytes(keys.manifest, b"{}", "application/json")
    storage.put_bytes(keys.image(0, 1, "jpg"), b"img01-again")  # deterministic key: overwrite
    assert storage.get_bytes(keys.image(0, 1, "jpg")) == b"img01-again"
    assert storage.exists(keys.manifest) and not storage.exists(keys.spec)
    assert sorted(storage.list_keys("jobs/j123/dataset/")) == [
        "jobs/j123/dataset/imagefolder/000000/001.jpg",
        "jobs/j123/dataset/imagefolder/000002/000.jpg",
    ]
    with pytest.raises(StorageKeyMissing):
        storage.get_bytes(keys.spec)
    assert storage.delete_prefix("jobs/j123/dataset/") == 2
    assert list(storage.list_keys("jobs/j123/dataset/")) == []
    assert storage.exists(keys.manifest)
    storage.ping()


def test_presigned_urls_download_and_expire(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("jobs/j1/manifest.json", b'{"ok": 1}', "application/json")
    url = storage.presign_get("jobs/j1/manifest.json", 60)
    if isinstance(storage, S3Storage):
        assert httpx.get(url).content == b'{"ok": 1}'
        return
    assert isinstance(storage, LocalStorage)  # served by the API's /v1/files route
    assert url.startswith("http://api.test/v1/files/jobs/j1/manifest.json?")
    q = httpx.URL(url).params
    assert storage.verify("jobs/j1/manifest.json", int(q["expires"]), q["sig"])
    assert not storage.verify("jobs/j1/spec.json", int(q["expires"]), q["sig"])
    assert not storage.verify("jobs/j1/manifest.json", int(q["expires"]) + 1, q["sig"])
    assert not storage.verify("jobs/j1/manifest.json", int(time.time()) - 1,
                              storage.signature("jobs/j1/manifest.json", int(time.time()) - 1))


def test_local_storage_refuses_keys_outside_its_root(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path / "root")
    for bad in ("../escape", "jobs/../../escape", "/etc/passwd"):
        with pytest.raises(ValueError, match="escapes"):
            s.put_bytes(bad, b"x")
    assert not (tmp_path / "escape").exists()


def test_job_keys_refuse_non_alphanumeric_ids() -> None:
    with pytest.raises(ValueError, match="job_id"):
        JobKeys.for_job("jobs", "../other")


def test_s3_errors_are_translated(moto_endpoint: str) -> None:
    s = S3Storage("no-such-bucket", client=s3_client(moto_endpoint))
    with pytest.raises(StorageError):
        s.put_bytes("k", b"x")
    dead = S3Storage("b", client=boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
        aws_access_key_id="t", aws_secret_access_key="t",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1)))
    with pytest.raises(StorageError):
        dead.ping()


def test_seaweedfs_enforces_sigv4(tmp_path: Path) -> None:
    """The integration S3 server checks signatures: a wrong secret is refused."""
    from tests.servers import SeaweedS3

    srv = SeaweedS3(tmp_path / "weed")
    try:
        srv.start(bucket="sig")
        good = S3Storage("sig", client=srv.client())
        good.put_bytes("a/b", b"payload")
        assert httpx.get(good.presign_get("a/b", 30)).content == b"payload"
        bad = S3Storage("sig", client=srv.client(secret="wrong"))
        with pytest.raises(StorageError, match="SignatureDoesNotMatch|AccessDenied|403"):
            bad.get_bytes("a/b")
    finally:
        srv.stop()


def test_presigned_urls_use_the_public_endpoint_when_set(moto_endpoint: str) -> None:
    from app.settings import Settings

    s = Settings(storage="s3", s3_bucket="b", s3_endpoint_url=moto_endpoint,
                 s3_public_endpoint_url="http://downloads.example:9000",
                 s3_access_key_id="t", s3_secret_access_key="t")
    st = S3Storage.from_settings(s)
    assert st.client.meta.endpoint_url == moto_endpoint
    assert st.presign_get("k", 60).startswith("http://downloads.example:9000/b/k?")


def _big_file(path: Path, mib: int = 17) -> bytes:
    """`mib` MiB of bytes that differ from part to part (a repeated block would hide part mix-ups)."""
    data = b"".join(i.to_bytes(4, "little") * 256 for i in range(mib * 1024))  # 1 KiB blocks
    path.write_bytes(data)
    return data


def _multipart_round_trip(st: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = _big_file(src)
    st.put_file("jobs/j1/dataset/webdataset/000000.tar", src, "application/x-tar")
    head = st.client.head_object(Bucket=st.bucket, Key="jobs/j1/dataset/webdataset/000000.tar", PartNumber=1)
    assert head["PartsCount"] == 3  # 17 MiB in 8 MiB parts: 8 + 8 + 1
    assert head["ContentLength"] == MULTIPART_PART  # the part asked for
    etag = st.client.head_object(Bucket=st.bucket, Key="jobs/j1/dataset/webdataset/000000.tar")["ETag"]
    assert etag.strip('"').endswith("-3")
    out = tmp_path / "down" / "big.bin"
    st.get_file("jobs/j1/dataset/webdataset/000000.tar", out)
    assert out.read_bytes() == data
    # a rerun of the same shard gives the identical object (same parts, same ETag)
    st.put_file("jobs/j1/dataset/webdataset/000000.tar", src, "application/x-tar")
    assert st.client.head_object(Bucket=st.bucket, Key="jobs/j1/dataset/webdataset/000000.tar")["ETag"] == etag
    small = tmp_path / "small.json"
    small.write_bytes(b'{"a": 1}')
    st.put_file("jobs/j1/manifest.json", small, "application/json")
    got = st.client.head_object(Bucket=st.bucket, Key="jobs/j1/manifest.json")
    assert "-" not in got["ETag"] and got["ContentType"] == "application/json"  # one plain PUT
    with pytest.raises(StorageKeyMissing):
        st.get_file("jobs/j1/nothing.tar", tmp_path / "nothing.tar")
    assert not (tmp_path / "nothing.tar").exists()


def test_large_objects_go_multipart_on_moto(moto_endpoint: str, tmp_path: Path) -> None:
    client = s3_client(moto_endpoint)
    bucket = f"mp{time.time_ns()}"
    client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    _multipart_round_trip(S3Storage(bucket, client=client), tmp_path)


def test_large_objects_go_multipart_on_seaweedfs(tmp_path: Path) -> None:
    from tests.servers import SeaweedS3

    srv = SeaweedS3(tmp_path / "weed")
    try:
        srv.start(bucket="multipart")  # inside try: a failed start still stops the server
        _multipart_round_trip(S3Storage("multipart", client=srv.client()), tmp_path)
    finally:
        srv.stop()


def test_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "shard.tar"
    src.write_bytes(b"tar bytes" * 1000)
    storage.put_file("jobs/j2/dataset/webdataset/000001.tar", src, "application/x-tar")
    assert storage.get_bytes("jobs/j2/dataset/webdataset/000001.tar") == src.read_bytes()
    src.write_bytes(b"rewritten")  # deterministic key: overwrite
    storage.put_file("jobs/j2/dataset/webdataset/000001.tar", src, "application/x-tar")
    dest = tmp_path / "a" / "b" / "copy.tar"
    storage.get_file("jobs/j2/dataset/webdataset/000001.tar", dest)
    assert dest.read_bytes() == b"rewritten"
    assert [p.name for p in dest.parent.iterdir()] == ["copy.tar"]  # no temp file left behind
    with pytest.raises(StorageKeyMissing):
        storage.get_file("jobs/j2/missing.tar", tmp_path / "missing.tar")
    with pytest.raises(StorageError):  # the source file does not exist
        storage.put_file("jobs/j2/x.tar", tmp_path / "no-such-file.tar")


def test_put_file_errors_are_translated(moto_endpoint: str, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    s = S3Storage("no-such-bucket", client=s3_client(moto_endpoint))
    with pytest.raises(StorageError, match="NoSuchBucket"):
        s.put_file("k", src)


def _ranges(storage: Storage) -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes
    storage.put_bytes("r/obj", data)
    assert storage.size("r/obj") == len(data)
    assert storage.get_range("r/obj", 0, 10) == data[:10]
    assert storage.get_range("r/obj", 5000, 1234) == data[5000:6234]
    assert storage.get_range("r/obj", len(data) - 3, 100) == data[-3:]  # short at the end
    assert storage.get_range("r/obj", len(data) + 10, 5) == b""
    assert storage.get_range("r/obj", 7, 0) == b""
    with pytest.raises(ValueError, match="byte range"):
        storage.get_range("r/obj", -1, 5)
    with pytest.raises(StorageKeyMissing):
        storage.get_range("r/none", 0, 5)
    with pytest.raises(StorageKeyMissing):
        storage.size("r/none")


def test_ranged_reads_and_sizes(storage: Storage) -> None:
    _ranges(storage)


def test_ranged_reads_on_seaweedfs(tmp_path: Path) -> None:
    from tests.servers import SeaweedS3

    srv = SeaweedS3(tmp_path / "weed")
    try:
        srv.start(bucket="ranges")
        _ranges(S3Storage("ranges", client=srv.client()))
    finally:
        srv.stop()


def test_an_index_pages_by_ranged_reads(storage: Storage, tmp_path: Path) -> None:
    """The Parquet index read through `get_range`: the tail once, then one read per row group."""
    from app import dataset_index
    from workers.outputs.index import ParquetIndexWriter

    path = tmp_path / "index.parquet"
    with path.open("wb") as f, ParquetIndexWriter(f) as w:
        for k in range(5):
            w.write_rows([{"identity": k, "sample": s, "seed": s, "shard": k, "aligned": True, "filtered": False,
                           "centre_cosine": 0.25, "path": f"p/{k}/{s}"} for s in range(4)])
    storage.put_file("r/index.parquet", path)
    calls: list[int] = []

    def read(start: int, length: int) -> bytes:
        calls.append(length)
        return storage.get_range("r/index.parquet", start, length)

    f = dataset_index.IndexFile(read, storage.size("r/index.parquet"))
    assert f.row_groups == 5 and len(calls) == 1
    # a small index: its tail read held the whole file
    assert [r["sample"] for r in f.read_row_group(3)] == [0, 1, 2, 3] and len(calls) == 1
    again = dataset_index.IndexFile(read, storage.size("r/index.parquet"), f.metadata)  # footer given
    assert [r["path"] for r in again.read_row_group(4)] == [f"p/4/{s}" for s in range(4)] and len(calls) == 2
    assert calls[1] < calls[0] / 3  # one row group's bytes
