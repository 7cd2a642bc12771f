"""Presigned S3 GET URLs (SigV4 query signing) without botocore's per-URL machinery.

An artifacts page lists up to 1,000 images, each with a download URL. botocore's
`generate_presigned_url` spends ~0.2-0.3 ms per URL (parameter validation, endpoint rules, request
objects, event hooks, and four HMACs to derive the signing key), so most of a page goes to presigning.
`Presigner` derives the SigV4 signing key once per UTC date and per URL does only what varies: the
key's path, the canonical request, its SHA-256 and one HMAC.

Exactness: for the same credentials, region, endpoint, addressing style and instant, the URL is byte
for byte the one botocore's `S3SigV4QueryAuth` makes (`signature_version="s3v4"`).
`Presigner.from_client` only hands out a presigner after checking that on a probe key against the
client itself, and returns None (use boto3) otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qsl, quote, urlsplit

Addressing = Literal["path", "virtual"]

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
TIMESTAMP = "%Y%m%dT%H%M%SZ"  # SigV4's X-Amz-Date
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"  # a presigned URL signs no body
QUERY_SAFE = "-_.~"  # query keys and values: everything but RFC 3986's unreserved is %-encoded
KEY_SAFE = "/~"  # an object key is S3's greedy `{Key+}` label: its slashes stay
DEFAULT_PORTS = {"http": 80, "https": 443}
# `from_client` checks itself on this key: non-ASCII, spaces, reserved and %-like characters, dot
# segments and an empty segment, all of which S3 keeps verbatim.
PROBE_KEY = "idforge/presign-probe/ü é+=~%20&?#!*'()$,;:@[]/./../a//b"
PROBE_EXPIRES_S = 3600


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.digest(key, msg.encode(), "sha256")


class _Day(NamedTuple):
    """What a UTC date fixes: the credential scope, the encoded X-Amz-Credential, the signing key."""

    date: str  # YYYYMMDD
    scope: str
    credential: str
    signing_key: bytes


def _host_header(scheme: str, hostname: str, port: int | None) -> str:
    """The Host header as botocore signs it: lowercase, IPv6 bracketed, the scheme's default port
    left out."""
    host = f"[{hostname}]" if ":" in hostname else hostname
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return host


class Presigner:
    """Presigns GET URLs for the objects of one bucket at one endpoint with static credentials.

    `addressing="path"` makes `{endpoint}/{bucket}/{key}`; `"virtual"` makes the bucket a subdomain of
    the endpoint's host, `{scheme}://{bucket}.{host}{endpoint path}/{key}`. Thread-safe."""

    def __init__(self, *, endpoint_url: str, bucket: str, access_key: str, secret_key: str, region: str,
                 session_token: str | None = None, addressing: Addressing = "path") -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None \
                or parts.query or parts.fragment:
            raise ValueError(f"endpoint_url: expected http(s)://host[:port][/path], got {endpoint_url!r}")
        if not bucket or not access_key or not secret_key or not region:
            raise ValueError("bucket, access_key, secret_key and region must be non-empty")
        if addressing not in ("path", "virtual"):
            raise ValueError(f"addressing: expected 'path' or 'virtual', got {addressing!r}")
        # botocore joins the endpoint's path and the bucket/key path with one slash.
        prefix = parts.path.rstrip("/")
        hostname = parts.hostname  # lowercased by urlsplit
        if addressing == "virtual":
            self._base = f"{parts.scheme}://{bucket}.{parts.netloc}{prefix}/"
            hostname = f"{bucket}.{hostname}".lower()
        else:
            self._base = f"{parts.scheme}://{parts.netloc}{prefix}/{quote(bucket, safe='')}/"
        self._path_prefix = urlsplit(self._base).path
        self._host = _host_header(parts.scheme, hostname, parts.port)
        self.bucket = bucket
        self.region = region
        self.addressing = addressing
        self._access_key = access_key
        self._secret_key = secret_key
        self._token = None if session_token is None else quote(session_token, safe=QUERY_SAFE)
        self._day = _Day("", "", "", b"")

    def _day_for(self, date: str) -> _Day:
        """The date's scope and signing key (kSigning: an HMAC chain over the date, region, service and
        "aws4_request"), made once per UTC day."""
        day = self._day
        if day.date != date:
            scope = f"{date}/{self.region}/{SERVICE}/aws4_request"
            key = _hmac(f"AWS4{self._secret_key}".encode(), date)
            for part in (self.region, SERVICE, "aws4_request"):
                key = _hmac(key, part)
            day = _Day(date, scope, quote(f"{self._access_key}/{scope}", safe=QUERY_SAFE), key)
            self._day = day  # one attribute swap: other threads see the old day or the new one
        return day

    def presign_get(self, key: str, expires_s: int, *, now: datetime | None = None) -> str:
        """A URL that GETs `key` for `expires_s` seconds from `now` (default: the current time; a naive
        datetime is taken as UTC)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"key: expected a non-empty str, got {key!r}")
        if isinstance(expires_s, bool) or not isinstance(expires_s, int) or expires_s < 1:
            raise ValueError(f"expires_s: expected an int >= 1, got {expires_s!r}")
        if now is None:
            now = datetime.now(UTC)
        elif now.tzinfo is not None:
            now = now.astimezone(UTC)
        stamp = now.strftime(TIMESTAMP)
        day = self._day_for(stamp[:8])

        # The query as botocore writes it (this order in the URL), already %-encoded.
        params = [
            ("X-Amz-Algorithm", ALGORITHM),
            ("X-Amz-Credential", day.credential),
            ("X-Amz-Date", stamp),
            ("X-Amz-Expires", str(expires_s)),
            ("X-Amz-SignedHeaders", "host"),
        ]
        if self._token is not None:
            params.append(("X-Amz-Security-Token", self._token))
        query = "&".join(f"{k}={v}" for k, v in params)

        path = quote(key, safe=KEY_SAFE)  # UTF-8, then %-encoded; S3 paths are signed unnormalised
        canonical_request = "\n".join([
            "GET",
            self._path_prefix + path,
            "&".join(f"{k}={v}" for k, v in sorted(params)),  # canonical order: sorted encoded pairs
            f"host:{self._host}\n",  # the canonical headers, each line ended by a newline
            "host",
            UNSIGNED_PAYLOAD,
        ])
        string_to_sign = "\n".join([
            ALGORITHM, stamp, day.scope, hashlib.sha256(canonical_request.encode()).hexdigest(),
        ])
        signature = hmac.digest(day.signing_key, string_to_sign.encode(), "sha256").hex()
        return f"{self._base}{path}?{query}&X-Amz-Signature={signature}"

    @classmethod
    def from_client(cls, client: Any, bucket: str) -> Presigner | None:
        """A presigner that makes exactly the URLs `client.generate_presigned_url("get_object", ...)`
        makes for `bucket`, or None when this module cannot: not SigV4 query signing (botocore presigns
        with SigV2 unless the client's config names s3v4), refreshable credentials (they rotate under
        us), no credentials, an endpoint or addressing rule it does not follow (e.g. AWS's default
        `auto` addressing). Decided by presigning PROBE_KEY with the client, then with this module at
        the timestamp botocore put in that URL: the two must be equal."""
        try:
            meta = client.meta
            # botocore has no public accessor for a client's credentials; any change in this private
            # one lands in the `except` below and means "use boto3".
            creds = client._get_credentials()
            if creds is None or callable(getattr(creds, "refresh_needed", None)):
                return None
            s3_config = getattr(meta.config, "s3", None) or {}
            styles: tuple[Addressing, ...] = ("path",)
            if s3_config.get("addressing_style") == "virtual":
                # botocore falls back to path style for some buckets and hosts (IP addresses, names
                # that are not DNS labels, dotted names over https): the probe says which it used.
                styles = ("virtual", "path")
            probe: str = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": PROBE_KEY}, ExpiresIn=PROBE_EXPIRES_S)
            stamp = dict(parse_qsl(urlsplit(probe).query)).get("X-Amz-Date")
            if stamp is None:
                return None
            at = datetime.strptime(stamp, TIMESTAMP).replace(tzinfo=UTC)
            for style in styles:
                presigner = cls(endpoint_url=meta.endpoint_url, bucket=bucket, access_key=creds.access_key,
                                secret_key=creds.secret_key, region=meta.region_name,
                                session_token=creds.token, addressing=style)
                if presigner.presign_get(PROBE_KEY, PROBE_EXPIRES_S, now=at) == probe:
                    return presigner
            return None
        except Exception:  # noqa: BLE001 - e.g. ParamValidationError, a private API gone: use boto3
            return None
