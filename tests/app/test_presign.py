"""app.presign: byte-for-byte the URLs botocore presigns (its clock pinned to ours), accepted by a real
SigV4-checking S3 server (SeaweedFS), and `from_client` declines the clients it cannot reproduce."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import boto3
import httpx
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from pydantic import SecretStr

from app.presign import Presigner
from app.storage import s3_client

AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+abc/def==+"
T0 = dt.datetime(2024, 2, 29, 23, 59, 58, 987654)  # naive UTC, as botocore's clock gives it
KEYS = [
    "a", "jobs/0123456789abcdef/images/000/000001.png", "a b/c d.png", "ü/é/ß/日本語/😀.jpg",
    "plus+sign", "eq=ual", "tilde~name", "per%cent", "already%20encoded", "a+b=c~d%e f",
    "deep/" * 40 + "leaf", "/leading", "trailing/", "a//b", "./dot/../segments/.", "..",
    "reserved!*'()$,;:@&?#[]", "quote\"back\\tick`<>{}|^", "tab\tnewline\nnul\x00", "café",
    "x" * 1024,
]
ENDPOINTS = ["http://127.0.0.1:8333", "http://localhost:9000", "https://s3.example.com",
             "https://s3.example.com:443", "http://s3.example.com:80", "https://s3.example.com:8443/pre/fix",
             "https://S3.Example.COM/tenant/", "http://[::1]:8333"]


def botocore_client(endpoint: str | None, region: str, token: str | None = None,
                    addressing: str | None = "path", **config: Any) -> Any:
    config.setdefault("signature_version", "s3v4")
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=AK,
                        aws_secret_access_key=SK, aws_session_token=token,
                        config=Config(s3={"addressing_style": addressing} if addressing else None, **config))


def botocore_url(client: Any, bucket: str, key: str, expires_s: int, now: dt.datetime) -> str:
    """botocore's URL with its clock (`botocore.auth.get_current_datetime`, naive UTC) at `now`."""
    with mock.patch("botocore.auth.get_current_datetime", return_value=now):
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)
    return url


@pytest.mark.parametrize("token", [None, TOKEN], ids=["static", "session-token"])
@pytest.mark.parametrize("region", ["us-east-1", "eu-central-1"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_path_style_urls_equal_botocores(endpoint: str, region: str, token: str | None) -> None:
    client = botocore_client(endpoint, region, token)
    ours = Presigner(endpoint_url=endpoint, bucket="idforge", access_key=AK, secret_key=SK, region=region,
                     session_token=token)
    for i, key in enumerate(KEYS):
        expires = [1, 60, 3600, 604800][i % 4]
        want = botocore_url(client, "idforge", key, expires, T0)
        assert ours.presign_get(key, expires, now=T0) == want, key


@pytest.mark.parametrize("token", [None, TOKEN], ids=["static", "session-token"])
@pytest.mark.parametrize("endpoint,bucket", [
    ("https://s3.example.com", "idforge"), ("https://s3.example.com", "my-bucket-2"),
    ("http://minio.internal:9000/base", "idforge"), ("http://minio.internal:9000/base", "dotted.bucket"),
    ("http://localhost:8333", "my-bucket-2"),
])  # (a dotted bucket over https botocore puts in the path: see the from_client tests)
def test_virtual_host_urls_equal_botocores(endpoint: str, bucket: str, token: str | None) -> None:
    client = botocore_client(endpoint, "eu-west-1", token, addressing="virtual")
    host = urlsplit(botocore_url(client, bucket, "k", 60, T0)).hostname
    assert host == f"{bucket}.{urlsplit(endpoint).hostname}"
    ours = Presigner(endpoint_url=endpoint, bucket=bucket, access_key=AK, secret_key=SK,
                     region="eu-west-1", session_token=token, addressing="virtual")
    for key in KEYS:
        assert ours.presign_get(key, 900, now=T0) == botocore_url(client, bucket, key, 900, T0), key


def test_the_signing_key_follows_the_utc_date_and_any_timezone_is_accepted() -> None:
    endpoint = "http://127.0.0.1:8333"
    client = botocore_client(endpoint, "us-east-1")
    ours = Presigner(endpoint_url=endpoint, bucket="b", access_key=AK, secret_key=SK, region="us-east-1")
    # Across midnight and back: the cached day key must be replaced each time the date changes.
    for now in [T0, T0 + dt.timedelta(seconds=3), T0 + dt.timedelta(days=400), T0, T0.replace(microsecond=0)]:
        assert ours.presign_get("k/ü", 300, now=now) == botocore_url(client, "b", "k/ü", 300, now)
    # An aware time is converted to UTC: in Tokyo it is already 1 March, the scope's date stays 29 February.
    tokyo = dt.timezone(dt.timedelta(hours=9))
    aware = (T0 + dt.timedelta(seconds=1)).replace(tzinfo=dt.UTC).astimezone(tokyo)
    assert aware.date() != (T0 + dt.timedelta(seconds=1)).date()
    assert ours.presign_get("k", 300, now=aware) == botocore_url(client, "b", "k", 300,
                                                                 T0 + dt.timedelta(seconds=1))
    # The default clock is UTC now: the URL's X-Amz-Date is within a few seconds of it.
    stamp = dict(parse_qsl(urlsplit(ours.presign_get("k", 300)).query))["X-Amz-Date"]
    signed_at = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - signed_at).total_seconds()) < 5


def test_bad_arguments_are_refused() -> None:
    good: dict[str, Any] = {"endpoint_url": "http://127.0.0.1:8333", "bucket": "b", "access_key": AK,
                            "secret_key": SK, "region": "us-east-1"}
    for bad in [{"endpoint_url": "127.0.0.1:8333"}, {"endpoint_url": "ftp://h"},
                {"endpoint_url": "http://u:p@h"}, {"endpoint_url": "http://h/?x=1"}, {"bucket": ""},
                {"secret_key": ""}, {"region": ""}, {"addressing": "auto"}]:
        with pytest.raises(ValueError):
            Presigner(**{**good, **bad})
    p = Presigner(**good)
    for key, expires in [("", 60), ("k", 0), ("k", -5), ("k", 1.5), ("k", True)]:
        with pytest.raises(ValueError):
            p.presign_get(key, expires)  # type: ignore[arg-type]


# ---- from_client ----------------------------------------------------------------------------------


def test_from_client_reproduces_the_services_own_client() -> None:
    """The client `app.storage.s3_client` builds (s3v4, path style) is one from_client takes on."""
    for endpoint, region in [("http://127.0.0.1:8333", "us-east-1"), ("https://s3.example.com", "eu-west-3")]:
        settings = SimpleNamespace(s3_region=region, s3_access_key_id=AK, s3_secret_access_key=SecretStr(SK))
        client = s3_client(settings, endpoint)
        p = Presigner.from_client(client, "idforge")
        assert p is not None and p.addressing == "path" and p.region == region
        for key in KEYS:
            assert p.presign_get(key, 3600, now=T0) == botocore_url(client, "idforge", key, 3600, T0)


@pytest.mark.parametrize("endpoint,bucket,expected", [
    ("https://s3.example.com", "idforge", "virtual"),
    ("https://s3.example.com", "dotted.bucket", "path"),  # botocore's own fallback
    ("http://127.0.0.1:8333", "idforge", "path"),  # an IP address has no subdomains
])
def test_from_client_follows_botocores_virtual_addressing(endpoint: str, bucket: str, expected: str) -> None:
    client = botocore_client(endpoint, "us-east-1", TOKEN, addressing="virtual")
    p = Presigner.from_client(client, bucket)
    assert p is not None and p.addressing == expected
    for key in KEYS:
        assert p.presign_get(key, 60, now=T0) == botocore_url(client, bucket, key, 60, T0)


def refreshable(client: Any) -> Any:
    creds = RefreshableCredentials.create_from_metadata(
        {"access_key": AK, "secret_key": SK, "token": TOKEN,
         "expiry_time": (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()},
        refresh_using=dict, method="test")
    client._request_signer._credentials = creds
    return client


@pytest.mark.parametrize("make", [
    # SigV2 query auth, asked for or botocore's presigning default when the config names no version
    lambda: botocore_client("http://127.0.0.1:8333", "us-east-1", signature_version="s3"),
    lambda: botocore_client("http://127.0.0.1:8333", "us-east-1", signature_version=None),
    lambda: botocore_client("http://127.0.0.1:8333", "us-east-1", signature_version=UNSIGNED),
    # AWS's default endpoint, auto addressing: virtual host on the global endpoint, whatever the region
    lambda: botocore_client(None, "eu-west-1", addressing=None),
    # rotating credentials: a presigner built now would sign with stale keys later
    lambda: refreshable(botocore_client("http://127.0.0.1:8333", "us-east-1")),
    lambda: SimpleNamespace(),  # not a botocore client at all
], ids=["sigv2", "default-signature", "unsigned", "aws-auto-addressing", "refreshable", "not-a-client"])
def test_from_client_declines_what_it_cannot_reproduce(make: Any) -> None:
    assert Presigner.from_client(make(), "idforge") is None


def test_from_client_declines_an_invalid_bucket() -> None:
    client = botocore_client("http://127.0.0.1:8333", "us-east-1")
    assert Presigner.from_client(client, "idforge") is not None
    assert Presigner.from_client(client, "no/such bucket") is None  # botocore refuses the name


# ---- against a real S3 server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.servers import SeaweedS3

    srv = SeaweedS3(tmp_path_factory.mktemp("weed")).start(bucket="presign")
    yield srv
    srv.stop()


SERVER_KEYS = ["plain.bin", "a b/c+d=e~f%g.png", "ü/日本語/😀.jpg", "deep/" * 20 + "leaf.bin", "x'(!)*$,;:@.bin"]


def test_urls_are_accepted_by_seaweedfs(seaweed: Any) -> None:
    from tests.servers import S3_KEY, S3_SECRET

    client = seaweed.client()
    for i, key in enumerate(SERVER_KEYS):
        client.put_object(Bucket="presign", Key=key, Body=f"payload {i} {key}".encode())
    built = Presigner(endpoint_url=seaweed.endpoint, bucket="presign", access_key=S3_KEY,
                      secret_key=S3_SECRET, region="us-east-1")
    derived = Presigner.from_client(client, "presign")
    assert derived is not None
    for p in (built, derived):
        for i, key in enumerate(SERVER_KEYS):
            r = httpx.get(p.presign_get(key, 60))
            assert r.status_code == 200, (key, r.text)
            assert r.content == f"payload {i} {key}".encode()
        assert httpx.get(p.presign_get("no/such/key", 60)).status_code == 404


def test_seaweedfs_refuses_tampered_expired_and_wrongly_signed_urls(seaweed: Any) -> None:
    from tests.servers import S3_KEY, S3_SECRET

    seaweed.client().put_object(Bucket="presign", Key="secret/a.bin", Body=b"secret")
    seaweed.client().put_object(Bucket="presign", Key="secret/b.bin", Body=b"other")
    p = Presigner(endpoint_url=seaweed.endpoint, bucket="presign", access_key=S3_KEY, secret_key=S3_SECRET,
                  region="us-east-1")
    wrong = Presigner(endpoint_url=seaweed.endpoint, bucket="presign", access_key=S3_KEY, secret_key="wrong",
                      region="us-east-1")
    url = p.presign_get("secret/a.bin", 60)
    assert httpx.get(url).status_code == 200  # the untampered control
    tampered = [
        url[:-1] + ("0" if url[-1] != "0" else "1"),  # one digit of the signature
        url.replace("secret/a.bin", "secret/b.bin"),  # another object under the same signature
        url.replace("X-Amz-Expires=60", "X-Amz-Expires=61"),  # a longer life
        wrong.presign_get("secret/a.bin", 60),  # signed with the wrong secret
    ]
    for bad in tampered:
        assert bad != url
        assert httpx.get(bad).status_code == 403, bad
    # Signed two hours ago for a minute: expired.
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    assert httpx.get(p.presign_get("secret/a.bin", 60, now=old)).status_code == 403


def test_no_layer_is_crossed() -> None:
    """The kernel module imports the standard library alone (no botocore, workers, models, app.api)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[2] / "app" / "presign.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "hashlib", "hmac", "datetime", "typing", "urllib"}, imported
