"""Webhooks: Standard Webhooks signatures checked against a verifier written here from the spec
text, the address guard on a table of addresses, the retry schedule, pinned connections (plain and
TLS with SNI) to real loopback receivers, and deliveries from real jobs run through the service
(redis-server, a Celery worker subprocess, the API under uvicorn) to a real HTTP receiver. The
same live service checks that `GET /v1/jobs/{id}/events` streams real `text/event-stream` frames.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app import webhooks as wh
from app.api.main import create_app
from app.client import Client
from app.credentials import parse_secret
from app.jobstore import JobStore
from app.servers import RedisServer, free_port
from app.settings import Settings
from tests.conftest import TEAM_KEYS
from tests.servers import Proc, wait_http
from workers.webhooks import Target, post, resolve_target

A = {"Authorization": "Bearer key-alpha"}
KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
BACKOFF_S = 2.0  # the live service's first retry delay
TINY: dict[str, Any] = {"identities": 2, "images_per_identity": 1, "render": {"steps": 2, "batch_size": 2},
                        "quality": {"report": False}}


# ---- an independent verifier, from the spec text --------------------------------------------
# "The content to be signed is {msg_id}.{timestamp}.{payload}", HMAC-SHA256 keyed with the
# base64-decoded part of the secret after `whsec_`; `webhook-signature` is a space-delimited list
# of `v1,<base64 signature>`; compare in constant time; refuse timestamps outside a tolerance.


def spec_verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    key = base64.b64decode(secret.split("_", 1)[1])
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(stamp)) > tolerance_s:
        return False
    content = msg_id.encode() + b"." + stamp.encode() + b"." + body
    mine = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())
    for entry in headers["webhook-signature"].split(" "):
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(mine, sig.encode()):
            return True
    return False


# ---- signatures ----------------------------------------------------------------------------


def test_signed_headers_verify_with_the_spec_verifier_and_ours() -> None:
    body = wh.build_payload("completed", "j1", {"status": "succeeded", "result": {"images": 2}},
                            at="2025-01-01T00:00:00.000Z")
    assert json.loads(body) == {"type": "job.completed", "timestamp": "2025-01-01T00:00:00.000Z",
                                "data": {"job_id": "j1", "status": "succeeded", "result": {"images": 2}}}
    now = int(time.time())
    headers = wh.delivery_headers([KEY], "msg_abc", now, body)
    assert headers["webhook-id"] == "msg_abc" and headers["webhook-timestamp"] == str(now)
    assert headers["webhook-signature"].startswith("v1,")
    assert spec_verify(SECRET, headers, body)
    wh.verify(KEY, headers, body)  # raises when it does not check out
    # One known value, computed here by hand from the scheme.
    expected = base64.b64encode(hmac.new(KEY, b"msg_abc.1700000000.{}", hashlib.sha256).digest()).decode()
    assert wh.sign(KEY, "msg_abc", 1700000000, b"{}") == "v1," + expected


def test_tampered_body_timestamp_id_or_key_is_rejected() -> None:
    body = b'{"type":"job.completed"}'
    now = int(time.time())
    headers = wh.delivery_headers([KEY], "msg_abc", now, body)
    tampered = [
        (headers, body + b" "),
        (headers, body.replace(b"completed", b"failed")),
        ({**headers, "webhook-timestamp": str(now + 1)}, body),
        ({**headers, "webhook-id": "msg_abd"}, body),
    ]
    for h, b in tampered:
        assert not spec_verify(SECRET, h, b)
        with pytest.raises(wh.WebhookVerificationError):
            wh.verify(KEY, h, b)
    other = bytes(32)
    with pytest.raises(wh.WebhookVerificationError, match="no v1 signature"):
        wh.verify(other, headers, body)
    stale = wh.delivery_headers([KEY], "msg_abc", now - 600, body)
    assert not spec_verify(SECRET, stale, body)
    with pytest.raises(wh.WebhookVerificationError, match="from now"):
        wh.verify(KEY, stale, body)
    with pytest.raises(wh.WebhookVerificationError, match="missing"):
        wh.verify(KEY, {"webhook-id": "msg_abc"}, body)


def test_rotation_signs_with_every_secret() -> None:
    old = b"o" * 24
    headers = wh.delivery_headers([KEY, old], "msg_x", int(time.time()), b"{}")
    assert len(headers["webhook-signature"].split(" ")) == 2
    wh.verify(old, headers, b"{}")
    assert spec_verify("whsec_" + base64.b64encode(old).decode(), headers, b"{}")
    assert "webhook-signature" not in wh.delivery_headers([], "msg_x", 1, b"{}")  # development, no key


@pytest.mark.parametrize("value,message", [
    ("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "must start with 'whsec_'"),
    ("whsec_not base64!", "not base64"),
    ("whsec_" + base64.b64encode(b"short").decode(), "24..64 bytes, not 5"),
])
def test_bad_secrets_are_refused_naming_the_problem(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_secret(value)
    with pytest.raises(ValueError, match="IDFORGE_WEBHOOK_SECRET"):
        Settings(webhook_secret=value)


def test_secret_is_required_outside_development() -> None:
    prod: dict[str, Any] = {"environment": "production", "secret_key": "s" * 32, "api_keys": "team:a-long-api-key"}
    with pytest.raises(ValueError, match="IDFORGE_WEBHOOK_SECRET must be set outside development"):
        Settings(**prod)
    assert Settings(**prod, webhook_secret=SECRET).webhook_keys == [KEY]
    assert Settings().webhook_keys == []  # development: unsigned
    with pytest.raises(ValueError, match="below IDFORGE_VISIBILITY_TIMEOUT_S"):
        Settings(webhook_backoff_max_s=4000, visibility_timeout_s=3600)


# ---- the address guard ----------------------------------------------------------------------


@pytest.mark.parametrize("address,kind", [
    ("10.0.0.1", "private"), ("10.255.255.255", "private"), ("172.16.0.1", "private"),
    ("172.31.255.254", "private"), ("192.168.1.1", "private"), ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.1.2.3", "private"), ("169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("fc00::1", "private"), ("fd12:3456::1", "private"), ("100.64.0.1", "not a globally routable"),
    ("240.0.0.1", "reserved"), ("2002:7f00:1::1", "loopback"), ("198.18.0.1", "private"),
])
def test_forbidden_addresses(address: str, kind: str) -> None:
    why = wh.address_refusal(address)
    assert why is not None and kind in why, why


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                     "2001:4860:4860::8888", "172.32.0.1", "11.0.0.1"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert wh.address_refusal(address) is None


@pytest.mark.parametrize("url,message", [
    ("ftp://example.com/hook", "scheme 'ftp'"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("https://user:pw@example.com/hook", "credentials"),
    ("http://127.0.0.1:9000/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://10.1.2.3/", "private"),
    ("http://0.0.0.0:80/", "unspecified"),
])
def test_urls_refused_before_any_dns(url: str, message: str) -> None:
    with pytest.raises(wh.WebhookUrlRefused, match=message):
        wh.check_url(url, allow_private=False)


def test_private_literals_pass_only_with_the_setting_and_names_wait_for_dns() -> None:
    wh.check_url("http://127.0.0.1:9000/hook", allow_private=True)
    wh.check_url("https://hooks.example.com/x", allow_private=False)
    wh.check_url("http://localhost:9000/x", allow_private=False)  # a name: checked after resolution
    with pytest.raises(wh.WebhookUrlRefused, match="credentials"):
        wh.check_url("http://u:p@127.0.0.1/", allow_private=True)


# ---- retries --------------------------------------------------------------------------------


def test_which_answers_are_retried() -> None:
    assert [s for s in (None, 200, 301, 400, 401, 404, 410, 422, 429, 500, 502, 503, 504)
            if wh.should_retry(s)] == [None, 429, 500, 502, 503, 504]


def test_backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() -> None:
    rng = random.Random(0)
    for attempt in range(1, 8):
        nominal = min(60.0, 2.0 * 2 ** (attempt - 1))
        for _ in range(20):
            d = wh.retry_delay(attempt, base_s=2.0, max_s=60.0, rng=rng)
            assert 0.8 * nominal - 1e-3 <= d <= nominal + 1e-3
    # Consecutive delays grow, whatever the jitter draws.
    for seed in range(50):
        r = random.Random(seed)
        ds = [wh.retry_delay(a, base_s=1.0, max_s=1000, rng=r) for a in (1, 2, 3, 4)]
        assert ds == sorted(ds) and len(set(ds)) == 4
    assert wh.retry_delay(1, base_s=1.0, max_s=60, retry_after=30, rng=rng) == 30
    assert wh.retry_delay(1, base_s=1.0, max_s=60, retry_after=3600, rng=rng) == 60  # capped
    with pytest.raises(ValueError, match="attempt"):
        wh.retry_delay(0, base_s=1.0, max_s=60)


def test_retry_after_seconds_and_http_date() -> None:
    now = time.time()
    assert wh.parse_retry_after("120") == 120
    when = format_datetime(datetime.fromtimestamp(now + 90, UTC), usegmt=True)
    assert 88 <= (wh.parse_retry_after(when, now=now) or 0) <= 90
    assert wh.parse_retry_after("soon") is None and wh.parse_retry_after(None) is None


# ---- pinned connections to real loopback receivers ------------------------------------------


@dataclass
class Hit:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real HTTP server on a loopback port. `/flaky/...` answers 503 twice per webhook-id, then
    200; `/bad/...` answers 400; anything else 200."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer.lock:
                    outer.hits.append(Hit(time.monotonic(), self.path, headers, body))
                    seen = sum(1 for h in outer.hits if h.path == self.path
                               and h.headers.get("webhook-id") == headers.get("webhook-id"))
                code = 200
                if self.path.startswith("/flaky") and seen <= 2:
                    code = 503
                elif self.path.startswith("/bad"):
                    code = 400
                self.send_response(code)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def at(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_connects_to_the_checked_address_and_sends_the_url_host() -> None:
    rx = Receiver()
    calls: list[str] = []

    def rebinding_dns(host: str, port: int) -> list[str]:
        calls.append(host)  # first answer 127.0.0.1, any later one an internal address
        return ["127.0.0.1"] if len(calls) == 1 else ["10.255.255.1"]

    try:
        url = f"http://hooks.example.test:{rx.port}/ok/pinned?x=1"
        target = resolve_target(url, allow_private=True, resolve=rebinding_dns)
        assert target.addresses == ["127.0.0.1"]
        answer = post(target, b"{}", {"content-type": "application/json"}, timeout=5)
        assert answer.status == 200 and calls == ["hooks.example.test"]  # one lookup, no second one
        hit = rx.at("/ok/pinned?x=1")[0]
        assert hit.headers["host"] == f"hooks.example.test:{rx.port}" and hit.body == b"{}"
        # With the setting off, the same name is refused once it resolves to loopback, and a name
        # with one public and one private address is refused too.
        with pytest.raises(wh.WebhookUrlRefused, match=r"hooks\.example\.test resolves to 127\.0\.0\.1 is a loopback"):
            resolve_target(url, allow_private=False, resolve=lambda h, p: ["127.0.0.1"])
        with pytest.raises(wh.WebhookUrlRefused, match="10.0.0.7 is a private"):
            resolve_target(url, allow_private=False, resolve=lambda h, p: ["93.184.216.34", "10.0.0.7"])
        ok = resolve_target("https://hooks.example.test/x", allow_private=False,
                            resolve=lambda h, p: ["93.184.216.34"])
        assert (ok.port, ok.addresses) == (443, ["93.184.216.34"])
        # A refused connection on the first checked address (nothing listens on 127.0.0.2: the
        # receiver is bound to 127.0.0.1) falls through to the next checked one.
        two = Target(f"http://hooks.example.test:{rx.port}/ok/second", "hooks.example.test", rx.port,
                     ["127.0.0.2", "127.0.0.1"])
        assert post(two, b"{}", {}, timeout=5).status == 200 and len(rx.at("/ok/second")) == 1
        with pytest.raises(ConnectionRefusedError):
            post(Target(two.url, two.host, two.port, ["127.0.0.2"]), b"{}", {}, timeout=5)
    finally:
        rx.stop()


def _test_ca(tmp: Path, host: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for `host`: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idforge test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_https_to_the_checked_address_uses_the_url_host_for_sni_and_the_certificate(tmp_path: Path) -> None:
    host = "hooks.example.test"
    ca, cert, key = _test_ca(tmp_path, host)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    names: list[str | None] = []

    def record_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name)

    server_tls.sni_callback = record_sni
    rx = Receiver(tls=server_tls)
    try:
        target = Target(f"https://{host}:{rx.port}/ok/tls", host, rx.port, ["127.0.0.1"])
        client_tls = ssl.create_default_context(cafile=str(ca))
        assert post(target, b"{}", {}, timeout=5, tls=client_tls).status == 200
        assert names == [host] and rx.at("/ok/tls")[0].headers["host"] == f"{host}:{rx.port}"
        # The certificate is checked against the URL's host, not the address connected to.
        wrong = Target(f"https://other.example.test:{rx.port}/ok/tls", "other.example.test", rx.port, ["127.0.0.1"])
        with pytest.raises(ssl.SSLCertVerificationError):
            post(wrong, b"{}", {}, timeout=5, tls=client_tls)
    finally:
        rx.stop()


# ---- the API in-process: submission check and the queued-cancel path -----------------------


def _api(redis_server: RedisServer, tmp_path: Path, **extra: Any) -> TestClient:
    settings = Settings(redis_url=redis_server.url, api_keys=TEAM_KEYS, storage_dir=tmp_path / "storage",
                        public_url="http://testserver", **extra)
    return TestClient(create_app(settings))


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "http://[::1]/hook", "http://10.0.0.5/x",
                                 "http://[::ffff:127.0.0.1]/x", "http://169.254.169.254/", "http://2130706433/",
                                 "https://user:pw@hooks.example.com/x"])
def test_submission_refuses_a_private_literal_or_credentials_naming_webhook_url(
        redis_server: RedisServer, store: JobStore, tmp_path: Path, url: str) -> None:
    with _api(redis_server, tmp_path) as api:
        r = api.post("/v1/jobs", json={**TINY, "webhook": {"url": url}}, headers=A)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "webhook_url_refused"
        assert [e["field"] for e in body["errors"]] == ["webhook.url"]


def test_submission_accepts_public_names_and_private_addresses_when_allowed(
        redis_server: RedisServer, store: JobStore, tmp_path: Path) -> None:
    with _api(redis_server, tmp_path) as api:
        r = api.post("/v1/jobs", json={**TINY, "webhook": {"url": "https://hooks.example.com/x"}}, headers=A)
        assert r.status_code == 202, r.text
    with _api(redis_server, tmp_path, webhook_allow_private=True) as api:
        r = api.post("/v1/jobs", json={**TINY, "webhook": {"url": "http://127.0.0.1:9/x"}}, headers=A)
        assert r.status_code == 202, r.text


def _queued_deliveries(store: JobStore) -> list[list[Any]]:
    """The args of every idforge.deliver_webhook message waiting on the broker's `cpu` list."""
    out = []
    for raw in store.r.lrange("cpu", 0, -1):
        msg = json.loads(raw)
        if msg["headers"]["task"] == "idforge.deliver_webhook":
            out.append(json.loads(base64.b64decode(msg["body"]))[0])
    return out


def test_canceling_a_queued_job_enqueues_one_canceled_delivery(
        redis_server: RedisServer, store: JobStore, tmp_path: Path) -> None:
    with _api(redis_server, tmp_path) as api:
        hook = {"url": "https://hooks.example.com/x", "events": ["canceled"]}
        jid = api.post("/v1/jobs", json={**TINY, "webhook": hook}, headers=A).json()["id"]
        plain = api.post("/v1/jobs", json=TINY, headers=A).json()["id"]
        for _ in range(3):  # idempotent cancel: one event, one delivery
            assert api.post(f"/v1/jobs/{jid}/cancel", headers=A).json()["status"] == "canceled"
        api.post(f"/v1/jobs/{plain}/cancel", headers=A)
    queued = _queued_deliveries(store)
    assert len(queued) == 1 and queued[0][0] == jid
    message = json.loads(store.get_webhook(jid, queued[0][1]) or "{}")
    assert message["url"] == "https://hooks.example.com/x" and message["event"] == "job.canceled"
    assert json.loads(message["body"])["data"] == {"job_id": jid, "status": "canceled"}


def test_a_spec_without_the_event_records_nothing(store: JobStore) -> None:
    class NoQueue:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        def send(self, *args: Any) -> None:
            self.sent.append(args)

    jid = store.create("alpha", {**TINY, "webhook": {"url": "https://h.example/x", "events": ["failed"]}},
                       "h", identities=2, images=2).job_id
    q = NoQueue()
    assert wh.notify(store, q, jid, "completed", {"status": "succeeded"}) is None  # type: ignore[arg-type]
    assert wh.notify(store, q, jid, "stage", {"stage": "rendering"}) is None  # type: ignore[arg-type]
    first = wh.notify(store, q, jid, "failed", {"status": "failed"})  # type: ignore[arg-type]
    assert first is not None and wh.notify(store, q, jid, "failed", {}) is None  # type: ignore[arg-type]
    assert q.sent == [("idforge.deliver_webhook", jid, first)]


# ---- the live service ------------------------------------------------------------------------


class Service:
    def __init__(self, url: str, procs: list[Proc], root: Path) -> None:
        self.url, self.procs, self.root = url, procs, root
        self.alpha = Client(url, "key-alpha")

    def submit(self, spec: dict[str, Any]) -> str:
        r = httpx.post(f"{self.url}/v1/jobs", json=spec, headers=A, timeout=30)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def events(self, job_id: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/v1/jobs/{job_id}/events", headers=A, timeout=30)
        assert r.status_code == 200, r.text
        return list(r.json()["events"])

    def webhook_events(self, job_id: str) -> list[dict[str, Any]]:
        out = []
        for e in self.events(job_id):
            if e["type"] == "webhook":
                out.append({k: (json.loads(v) if k in ("attempt", "status_code", "next_retry_s") else v)
                            for k, v in e.items()})
        return out

    def wait_webhooks(self, job_id: str, done: Callable[[list[dict[str, Any]]], bool],
                      timeout: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.webhook_events(job_id)
            if done(got):
                return got
            if time.monotonic() > deadline:
                logs = "\n".join(p.log.read_text()[-3000:] for p in self.procs)
                raise AssertionError(f"webhook events of {job_id} still {got}\n{logs}")
            time.sleep(0.2)


def _finished(events: list[dict[str, Any]], n: int = 1) -> bool:
    return sum(e["outcome"] in ("delivered", "failed", "refused") for e in events) >= n


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def live_root(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("webhooks")
    shutil.copytree(model_dir, root / "models")  # one model directory for this module's workers
    return root


def _start(root: Path, models: Path, *, allow_private: bool) -> Iterator[Service]:
    redis = RedisServer(root / "redis").start()
    port = free_port()
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "IDFORGE_REDIS_URL": redis.url, "IDFORGE_API_KEYS": TEAM_KEYS,
        "IDFORGE_SECRET_KEY": "webhook-it-secret", "IDFORGE_STORAGE": "local",
        "IDFORGE_STORAGE_DIR": str(root / "storage"), "IDFORGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "IDFORGE_MODEL_DIR": str(models), "IDFORGE_WEBHOOK_SECRET": SECRET,
        "IDFORGE_WEBHOOK_ALLOW_PRIVATE": "true" if allow_private else "false",
        "IDFORGE_WEBHOOK_BACKOFF_S": str(BACKOFF_S), "IDFORGE_WEBHOOK_MAX_ATTEMPTS": "4",
        "IDFORGE_WEBHOOK_TIMEOUT_S": "5",
    }
    worker = Proc(["worker", "--queues", "gpu,cpu", "--concurrency", "1"], env, root / "worker.log")
    api = Proc(["serve", "--port", str(port)], env, root / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=api)
        yield Service(f"http://127.0.0.1:{port}", [worker, api], root)
    finally:
        api.stop()
        worker.stop()
        redis.stop()


@pytest.fixture(scope="module")
def open_service(live_root: Path) -> Iterator[Service]:
    """Webhooks to private addresses allowed: the receiver is on loopback."""
    yield from _start(live_root / "open", live_root / "models", allow_private=True)


@pytest.fixture(scope="module")
def closed_service(live_root: Path, open_service: Service) -> Iterator[Service]:
    """The default: no delivery to private or loopback addresses. (Started after open_service,
    which has built the tiny models into the shared model directory.)"""
    yield from _start(live_root / "closed", live_root / "models", allow_private=False)


def _sse_frames(url: str, job_id: str) -> list[dict[str, str]]:
    """Read `text/event-stream` frames from the live server until it closes the stream."""
    frames: list[dict[str, str]] = []
    frame: dict[str, str] = {}
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events",
                      headers={**A, "Accept": "text/event-stream"}, timeout=httpx.Timeout(30, read=60)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        for line in r.iter_lines():
            if line == "":
                if frame:
                    frames.append(frame)
                frame = {}
            elif not line.startswith(":"):  # comments are keep-alives
                field, _, value = line.partition(":")
                frame[field] = frame.get(field, "") + value.removeprefix(" ")
    return frames


@pytest.mark.integration
def test_a_real_job_sends_only_the_filtered_events_signed_and_streams_sse(
        open_service: Service, receiver: Receiver) -> None:
    svc = open_service
    wanted = svc.submit({**TINY, "seed": 1, "webhook": {
        "url": f"http://127.0.0.1:{receiver.port}/ok/filtered", "events": ["completed", "stage"]}})
    unwanted = svc.submit({**TINY, "seed": 2, "webhook": {
        "url": f"http://127.0.0.1:{receiver.port}/ok/unwanted", "events": ["failed", "canceled"]}})
    frames = _sse_frames(svc.url, wanted)  # follows the job live until it is terminal
    assert all(set(f) == {"id", "event", "data"} for f in frames), frames
    data = [json.loads(f["data"]) for f in frames]
    assert [d["id"] for d in data] == [f["id"] for f in frames]
    assert [f["event"] for f in frames] == [d["type"] for d in data]
    ids = [tuple(map(int, f["id"].split("-"))) for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    statuses = [d["to"] for d in data if d["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"], statuses
    stages = [d["stage"] for d in data if d["type"] == "stage"]
    assert stages[:2] == ["sampling_identities", "rendering"] and stages[-1] == "packaging"

    assert svc.alpha.wait(unwanted, timeout=240)["status"] == "succeeded"
    log = svc.wait_webhooks(wanted, lambda ev: _finished(ev, len(stages) + 1))
    assert {e["outcome"] for e in log} == {"delivered"}
    hits = receiver.at("/ok/filtered")
    bodies = [json.loads(h.body) for h in hits]
    assert sorted(b["type"] for b in bodies) == sorted(["job.stage"] * len(stages) + ["job.completed"])
    assert sorted(b["data"]["stage"] for b in bodies if b["type"] == "job.stage") == sorted(stages)
    done = next(b for b in bodies if b["type"] == "job.completed")
    assert done["data"]["job_id"] == wanted and done["data"]["status"] == "succeeded"
    assert done["data"]["result"]["images"] == 2
    for h in hits:
        assert spec_verify(SECRET, h.headers, h.body), h.headers
        assert h.headers["content-type"] == "application/json"
        assert h.headers["webhook-id"].startswith("msg_")
    assert len({h.headers["webhook-id"] for h in hits}) == len(hits)  # one id per event
    # The other job asked only for failed/canceled: it succeeded, so nothing was sent.
    time.sleep(1.0)
    assert receiver.at("/ok/unwanted") == [] and svc.webhook_events(unwanted) == []


@pytest.mark.integration
def test_a_receiver_answering_503_twice_gets_the_event_on_the_third_attempt(
        open_service: Service, receiver: Receiver) -> None:
    svc = open_service
    jid = svc.submit({**TINY, "seed": 3, "webhook": {"url": f"http://127.0.0.1:{receiver.port}/flaky/c"}})
    assert svc.alpha.wait(jid, timeout=240)["status"] == "succeeded"
    log = svc.wait_webhooks(jid, _finished)
    assert [(e["attempt"], e.get("status_code"), e["outcome"]) for e in log] == [
        (1, 503, "retrying"), (2, 503, "retrying"), (3, 200, "delivered")]
    delays = [e["next_retry_s"] for e in log[:2]]
    assert BACKOFF_S * 0.8 <= delays[0] <= BACKOFF_S and 2 * BACKOFF_S * 0.8 <= delays[1] <= 2 * BACKOFF_S
    hits = receiver.at("/flaky/c")
    assert len(hits) == 3
    assert len({h.headers["webhook-id"] for h in hits}) == 1 and len({h.body for h in hits}) == 1
    assert all(spec_verify(SECRET, h.headers, h.body) for h in hits)
    gaps = [hits[1].at - hits[0].at, hits[2].at - hits[1].at]
    assert gaps[0] >= delays[0] - 0.05 and gaps[1] >= delays[1] - 0.05, (gaps, delays)
    assert gaps[1] > gaps[0], gaps  # growing delays
    assert svc.alpha.job(jid)["status"] == "succeeded"  # delivery never touches the job


@pytest.mark.integration
def test_a_receiver_answering_400_is_not_retried(open_service: Service, receiver: Receiver) -> None:
    svc = open_service
    jid = svc.submit({**TINY, "seed": 4, "webhook": {"url": f"http://127.0.0.1:{receiver.port}/bad/d"}})
    assert svc.alpha.wait(jid, timeout=240)["status"] == "succeeded"
    log = svc.wait_webhooks(jid, _finished)
    time.sleep(BACKOFF_S * 1.5)  # longer than the first retry would have waited
    assert len(receiver.at("/bad/d")) == 1
    log = svc.webhook_events(jid)
    assert [(e["attempt"], e["status_code"], e["outcome"], e["reason"]) for e in log] == [
        (1, 400, "failed", "not retryable")]
    assert svc.alpha.job(jid)["status"] == "succeeded"


@pytest.mark.integration
def test_cancel_sends_one_canceled_event(open_service: Service, receiver: Receiver) -> None:
    svc = open_service
    jid = svc.submit({**TINY, "seed": 5, "identities": 6, "webhook": {
        "url": f"http://127.0.0.1:{receiver.port}/ok/canceled", "events": ["canceled", "completed"]}})
    svc.alpha.cancel(jid)
    svc.alpha.cancel(jid)
    assert svc.alpha.wait(jid, timeout=120)["status"] == "canceled"
    svc.wait_webhooks(jid, _finished)
    time.sleep(1.0)
    bodies = [json.loads(h.body) for h in receiver.at("/ok/canceled")]
    assert [(b["type"], b["data"]) for b in bodies] == [("job.canceled", {"job_id": jid, "status": "canceled"})]


@pytest.mark.integration
def test_with_the_setting_off_a_loopback_receiver_gets_nothing_and_the_refusal_is_recorded(
        closed_service: Service, receiver: Receiver) -> None:
    svc = closed_service
    r = httpx.post(f"{svc.url}/v1/jobs", headers=A, json={
        **TINY, "webhook": {"url": f"http://127.0.0.1:{receiver.port}/ok/closed"}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "webhook.url", r.text
    # A name that resolves to loopback passes submission and is refused at delivery time.
    jid = svc.submit({**TINY, "seed": 6, "webhook": {
        "url": f"http://localhost:{receiver.port}/ok/closed", "events": ["completed", "stage"]}})
    assert svc.alpha.wait(jid, timeout=240)["status"] == "succeeded"
    stages = [e["stage"] for e in svc.events(jid) if e["type"] == "stage"]
    log = svc.wait_webhooks(jid, lambda ev: _finished(ev, len(stages) + 1))
    assert {e["outcome"] for e in log} == {"refused"} and {e["attempt"] for e in log} == {1}
    assert all("localhost resolves to" in e["error"] and "loopback" in e["error"] for e in log), log
    assert sorted(e["event"] for e in log) == sorted(["job.stage"] * len(stages) + ["job.completed"])
    assert receiver.at("/ok/closed") == []


@pytest.mark.integration
def test_canceling_a_running_job_sends_canceled_once_the_worker_stops(
        open_service: Service, receiver: Receiver) -> None:
    svc = open_service
    jid = svc.submit({**TINY, "seed": 7, "identities": 48, "images_per_identity": 4,
                      "render": {"steps": 4, "batch_size": 4}, "webhook": {
                          "url": f"http://127.0.0.1:{receiver.port}/ok/running", "events": ["canceled"]}})
    deadline = time.monotonic() + 120
    while svc.alpha.job(jid).get("stage") != "rendering":
        assert time.monotonic() < deadline, svc.alpha.job(jid)
        time.sleep(0.05)
    assert svc.alpha.cancel(jid)["status"] == "canceling"  # a worker has to stop it
    assert svc.alpha.wait(jid, timeout=120)["status"] == "canceled"
    svc.wait_webhooks(jid, _finished)
    time.sleep(1.0)
    bodies = [json.loads(h.body) for h in receiver.at("/ok/running")]
    assert [(b["type"], b["data"]) for b in bodies] == [("job.canceled", {"job_id": jid, "status": "canceled"})]
    statuses = [e["to"] for e in svc.events(jid) if e["type"] == "status"]
    assert statuses == ["queued", "running", "canceling", "canceled"]
