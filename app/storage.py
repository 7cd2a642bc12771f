"""Artifact storage: S3 (boto3, any S3-compatible endpoint) or a local directory.

Keys are deterministic (`{prefix}/{job_id}/...`), so re-running a shard overwrites the same
objects. botocore errors become `StorageError` here, at the boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from app.errors import StorageError, StorageKeyMissing
from app.presign import Presigner


class Storage(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str = ...) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, key: str, path: Path, content_type: str = ...) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def copy(self, src: str, dst: str) -> None: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str) -> Iterator[str]: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def presign_get(self, key: str, expires_s: int) -> str: ...
    def ping(self) -> None: ...



def _check_range(start: int, length: int) -> None:
    if isinstance(start, bool) or isinstance(length, bool) or not isinstance(start, int) \
            or not isinstance(length, int) or start < 0 or length < 0:
        raise ValueError(f"byte range: start and length must be ints >= 0, got {start!r}, {length!r}")


def _missing(key: str) -> int:
    raise StorageKeyMissing(f"no object {key}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MULTIPART_PART = 8 * 1024 * 1024  # S3 objects of this size and up go as multipart uploads in parts of it
PUT_CONCURRENCY = 16  # small objects (loose images) in flight at once from one process (`put_many`)
GET_BODY_ATTEMPTS = 4  # a GET whose body stream breaks is sent again, at most this many times in all


class LocalStorage:
    """A directory. Download URLs point at the API's `/v1/files/...` route, HMAC-signed."""

    def __init__(self, root: Path, *, signing_key: bytes = b"", base_url: str = "") -> None:
        self.root = Path(root).resolve()
        self.signing_key = signing_key
        self.base_url = base_url.rstrip("/")

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if not p.is_relative_to(self.root) or p == self.root:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return p

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        p = self._path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)  # atomic: readers see the old object or the new one
        except OSError as e:
            raise StorageError(f"cannot write {key}: {e}") from e

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise StorageKeyMissing(f"no object {key}") from e
        except OSError as e:
            raise StorageError(f"cannot read {key}: {e}") from e

    def put_file(self, key: str, path: Path, content_type: str = "") -> None:
        """Copy the local file `path` in as `key`, atomically like put_bytes."""
        p = self._path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, p)
        except OSError as e:
            raise StorageError(f"cannot write {key} from {path}: {e}") from e

    def get_file(self, key: str, path: Path) -> None:
        """Copy object `key` to the local file `path` (replaced atomically)."""
        src = self._path(key)
        if not src.is_file():
            raise StorageKeyMissing(f"no object {key}")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        except FileNotFoundError as e:
            tmp.unlink(missing_ok=True)
            raise StorageKeyMissing(f"no object {key}") from e
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot read {key} into {path}: {e}") from e

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object from byte `start` (fewer at its end)."""
        _check_range(start, length)
        try:
            with self._path(key).open("rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError as e:
            raise StorageKeyMissing(f"no object {key}") from e
        except OSError as e:
            raise StorageError(f"cannot read {key}: {e}") from e

    def copy(self, src: str, dst: str) -> None:
        """Copy object `src` to `dst` (atomically, like put_file)."""
        path = self._path(src)
        if not path.is_file():
            raise StorageKeyMissing(f"no object {src}")
        self.put_file(dst, path)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size if self._path(key).is_file() else _missing(key)
        except OSError as e:
            raise StorageError(f"cannot stat {key}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        if base.is_file():
            yield prefix
            return
        for p in sorted(base.rglob("*")) if base.is_dir() else []:
            if p.is_file() and not p.name.startswith("."):
                yield p.relative_to(self.root).as_posix()

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` and the directories that leaves empty; the count."""
        n = 0
        for key in list(self.list_keys(prefix)):
            self._path(key).unlink(missing_ok=True)
            n += 1
        base = self._path(prefix)
        if base.is_dir():
            for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):  # not empty: a hidden temp file, or a late write
                    d.rmdir()
            with contextlib.suppress(OSError):
                base.rmdir()
        return n

    def presign_get(self, key: str, expires_s: int) -> str:
        expires = int(time.time()) + expires_s
        query = urlencode({"expires": expires, "sig": self.signature(key, expires)})
        return f"{self.base_url}/v1/files/{quote(key)}?{query}"

    def signature(self, key: str, expires: int) -> str:
        if not self.signing_key:
            raise StorageError("local storage has no signing key for download URLs")
        msg = f"{key}\n{expires}".encode()
        return hmac.new(self.signing_key, msg, hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, sig: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(self.signature(key, expires), sig)

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"storage directory unusable: {e}") from e


class S3Storage:
    """An S3 bucket through boto3; `client` is injected (tests pass one bound to moto or SeaweedFS)."""

    def __init__(self, bucket: str, *, client: Any, presign_client: Any = None) -> None:
        self.bucket = bucket
        self.client = client
        # Signs download URLs; a separate client when clients reach S3 at another address.
        self.presign_client = presign_client or client
        self.presigner = Presigner.from_client(self.presign_client, bucket)  # None: boto3 signs

    @classmethod
    def from_settings(cls, s: Any) -> S3Storage:
        public = s.s3_public_endpoint_url
        return cls(s.s3_bucket, client=s3_client(s, s.s3_endpoint_url),
                   presign_client=s3_client(s, public) if public else None)

    def _call(self, what: str, key: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError as URLLib3Error

        try:
            return fn(Bucket=self.bucket, **kw)
        except URLLib3Error as e:  # botocore lets a connection lost inside an error reply's body through
            raise StorageError(f"S3 {what} {key}: {e}") from e
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageKeyMissing(f"no object {key}") from e
            raise StorageError(f"S3 {what} {key}: {code or e}") from e
        except BotoCoreError as e:
            raise StorageError(f"S3 {what} {key}: {e}") from e

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call("put", key, self.client.put_object, Key=key, Body=data, ContentType=content_type)

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes. botocore retries a request until its response head arrives; a
        connection lost while the body streams is retried here, GET_BODY_ATTEMPTS times in all."""
        from botocore.exceptions import BotoCoreError

        for attempt in range(1, GET_BODY_ATTEMPTS + 1):
            body = self._call("get", key, self.client.get_object, Key=key)["Body"]
            try:
                data: bytes = body.read()
                return data
            except BotoCoreError as e:  # ResponseStreamingError, IncompleteReadError, ReadTimeoutError
                if attempt == GET_BODY_ATTEMPTS:
                    raise StorageError(f"S3 get {key}: the body broke off {attempt} times: {e}") from e
            finally:
                body.close()
        raise AssertionError("unreachable")

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """Upload the local file `path` as `key`: one PUT below MULTIPART_PART bytes, else a multipart
        upload in MULTIPART_PART parts (fixed, so the same bytes always give the same ETag)."""
        from boto3.exceptions import S3UploadFailedError

        try:
            self._call("put", key, self.client.upload_file, Filename=str(path), Key=key,
                       ExtraArgs={"ContentType": content_type}, Config=transfer_config())
        except S3UploadFailedError as e:  # boto3's transfer wraps the ClientError
            raise StorageError(f"S3 put {key}: {e}") from e
        except OSError as e:
            raise StorageError(f"cannot upload {path} as {key}: {e}") from e

    def get_file(self, key: str, path: Path) -> None:
        """Download `key` to the local file `path`, streaming (boto3 writes a temp file, then renames)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._call("get", key, self.client.download_file, Key=key, Filename=str(path),
                       Config=transfer_config())
        except OSError as e:
            raise StorageError(f"cannot download {key} to {path}: {e}") from e

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object from byte `start` (fewer at its end): one ranged GET."""
        from botocore.exceptions import BotoCoreError

        _check_range(start, length)
        if length == 0:
            return b""
        for attempt in range(1, GET_BODY_ATTEMPTS + 1):
            try:
                resp = self._call("get", key, self.client.get_object, Key=key,
                                  Range=f"bytes={start}-{start + length - 1}")
            except StorageKeyMissing:
                raise
            except StorageError as e:
                if "InvalidRange" in str(e):  # start at or past the end
                    return b""
                raise
            body = resp["Body"]
            try:
                data: bytes = body.read()
                return data[:length]
            except BotoCoreError as e:
                if attempt == GET_BODY_ATTEMPTS:
                    raise StorageError(f"S3 get {key}: the body broke off {attempt} times: {e}") from e
            finally:
                body.close()
        raise AssertionError("unreachable")

    def copy(self, src: str, dst: str) -> None:
        """Copy object `src` to `dst` inside the bucket, server-side (a multipart copy when large)."""
        self._call("copy", src, self.client.copy, CopySource={"Bucket": self.bucket, "Key": src}, Key=dst,
                   Config=transfer_config())

    def size(self, key: str) -> int:
        """The object's size in bytes (a HEAD)."""
        return int(self._call("head", key, self.client.head_object, Key=key)["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Key=key)
            return True
        except StorageKeyMissing:
            return False

    def list_keys(self, prefix: str) -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError as URLLib3Error

        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                for obj in page.get("Contents", []):
                    yield obj["Key"]
        except (ClientError, BotoCoreError, URLLib3Error) as e:
            raise StorageError(f"S3 list {prefix}: {e}") from e

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`, a listing page (1,000 keys) per DeleteObjects call, so
        memory does not grow with the objects; the count. A key the server could not delete (the
        call's `Errors`) raises StorageError naming it: the caller tries again."""
        n, chunk = 0, []
        for key in self.list_keys(prefix):
            chunk.append({"Key": key})
            if len(chunk) == 1000:
                n += self._delete_objects(prefix, chunk)
                chunk = []
        if chunk:
            n += self._delete_objects(prefix, chunk)
        return n

    def _delete_objects(self, prefix: str, chunk: list[dict[str, str]]) -> int:
        got = self._call("delete", prefix, self.client.delete_objects,
                         Delete={"Objects": chunk, "Quiet": True})
        errors = got.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(f"S3 delete {prefix}: {len(errors)} of {len(chunk)} objects not deleted, "
                               f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip())
        return len(chunk)

    def presign_get(self, key: str, expires_s: int) -> str:
        """A GET URL for `key`, valid `expires_s` seconds: `app.presign` (the URL boto3 would make,
        about 20x faster: a page of the listing signs 1,000 of them) unless the client's signing
        scheme is one it cannot match, then boto3."""
        if self.presigner is not None:
            return self.presigner.presign_get(key, expires_s)
        url: str = self.presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )
        return url

    def ping(self) -> None:
        self._call("head bucket", "", self.client.head_bucket)


def put_many(storage: Storage, items: Iterable[tuple[str, bytes, str]]) -> None:
    """Store many small objects, (key, bytes, content type) each, PUT_CONCURRENCY requests in flight:
    a loose image's PUT is mostly a round trip, so one at a time the worker waits on the network.
    Raises the first failure once every request has ended (each PUT is idempotent; a retried shard
    writes them all again)."""
    with ThreadPoolExecutor(PUT_CONCURRENCY, thread_name_prefix="idforge-put") as pool:
        futures = [pool.submit(storage.put_bytes, key, data, ctype) for key, data, ctype in items]
    for f in futures:
        f.result()


def copy_many(storage: Storage, pairs: Iterable[tuple[str, str]]) -> None:
    """Copy many objects, (source, destination) each, PUT_CONCURRENCY copies in flight; raises the
    first failure once every copy has ended (a copy is idempotent)."""
    with ThreadPoolExecutor(PUT_CONCURRENCY, thread_name_prefix="idforge-copy") as pool:
        futures = [pool.submit(storage.copy, src, dst) for src, dst in pairs]
    for f in futures:
        f.result()


def transfer_config() -> Any:
    """boto3's managed-transfer settings: multipart above MULTIPART_PART, in MULTIPART_PART parts."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_PART, multipart_chunksize=MULTIPART_PART)


def s3_client(s: Any, endpoint: str) -> Any:
    """A boto3 S3 client for the settings' credentials at `endpoint` (empty = AWS)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=s.s3_region,
        aws_access_key_id=s.s3_access_key_id or None,
        aws_secret_access_key=s.s3_secret_access_key.get_secret_value() or None,
        config=Config(signature_version="s3v4", retries={"max_attempts": 8, "mode": "standard"},
                      s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=60,
                      max_pool_connections=PUT_CONCURRENCY),
    )


def fetch_s3_object(client: Any, uri: str, dest: Path) -> None:
    """Copy `s3://bucket/key` to the local file `dest`: FileNotFoundError when there is no such object,
    StorageError on any other failure."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise ValueError(f"uri: expected s3://bucket/key, got {uri!r}")
    try:
        client.download_file(bucket, key, str(dest))
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
            raise FileNotFoundError(uri) from e
        raise StorageError(f"fetching {uri} failed: {e}") from e
    except BotoCoreError as e:
        raise StorageError(f"fetching {uri} failed: {e}") from e


def storage_from_settings(s: Any) -> Storage:
    if s.storage == "s3":
        return S3Storage.from_settings(s)
    return LocalStorage(s.storage_dir, signing_key=s.signing_key, base_url=s.public_url)
