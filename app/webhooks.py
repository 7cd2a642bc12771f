"""Webhooks, the part without network I/O: which events a job's spec asks for, the payload of
each, Standard Webhooks signing and verification, the URL and address safety rules, and the retry
schedule.

Standard Webhooks (https://www.standardwebhooks.com): every delivery is a JSON POST with the
headers `webhook-id` (one id per event, the same on every retry), `webhook-timestamp` (unix seconds
of the attempt) and `webhook-signature`, a space-separated list of `v1,<base64 HMAC-SHA256>` over
`{id}.{timestamp}.{body}` keyed with the secret (`whsec_` + base64 of the key bytes).

`notify` is the one function here that touches services: it records a message through the job
store and enqueues its delivery by task name; `workers/webhooks.py` sends it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

from app.errors import ServiceError
from app.queue import DELIVER_WEBHOOK
from app.redis_client import now_iso
from app.spec import JobSpec, SpecError

if TYPE_CHECKING:
    from app.jobstore import JobStore
    from app.queue import TaskQueue

log = logging.getLogger("idforge.webhooks")

Event = Literal["completed", "failed", "canceled", "stage"]
EVENTS: tuple[str, ...] = get_args(Event)
# Receivers should refuse timestamps further than this from their clock (replay protection).
DEFAULT_TOLERANCE_S = 300
JITTER = (0.8, 1.0)  # each delay is scaled by a uniform factor in this range


class WebhookUrlRefused(ValueError):
    """A webhook URL, or an address its host resolves to, that the service will not call."""


class WebhookVerificationError(ValueError):
    """A delivery whose headers or signature do not check out."""


# ---- secrets and signatures ---------------------------------------------------------------


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `{msg_id}.{timestamp}.{body}`."""
    if "." in msg_id:
        raise ValueError(f"a webhook id must not contain '.': {msg_id!r}")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signature_header(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(sign(k, msg_id, timestamp, body) for k in keys)


def delivery_headers(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt; no signature header when there is no key
    (development without IDFORGE_WEBHOOK_SECRET)."""
    headers = {"content-type": "application/json", "webhook-id": msg_id,
               "webhook-timestamp": str(timestamp)}
    if keys:
        headers["webhook-signature"] = signature_header(keys, msg_id, timestamp, body)
    return headers


def verify(keys: bytes | Sequence[bytes], headers: Mapping[str, str], body: bytes, *,
           now: float | None = None, tolerance_s: float = DEFAULT_TOLERANCE_S) -> None:
    """Check a received delivery as a receiver would: headers present, timestamp within
    `tolerance_s` of `now`, and one `v1` signature matching one key (constant-time compare).
    Raises WebhookVerificationError; returns None when it checks out."""
    keys = [keys] if isinstance(keys, bytes) else list(keys)
    low = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not low.get(h)]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    msg_id, stamp = low["webhook-id"], low["webhook-timestamp"]
    if not stamp.isdigit():
        raise WebhookVerificationError(f"webhook-timestamp is not unix seconds: {stamp!r}")
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp {stamp} is more than {tolerance_s} s from now")
    offered = [s.partition(",")[2] for s in low["webhook-signature"].split() if s.startswith("v1,")]
    for key in keys:
        expected = sign(key, msg_id, int(stamp), body).partition(",")[2]
        if any(hmac.compare_digest(expected, o) for o in offered):
            return
    raise WebhookVerificationError("no v1 signature matches")


# ---- events and payloads ------------------------------------------------------------------


def event_type(event: str) -> str:
    """The payload's hierarchical type: `completed` -> `job.completed`."""
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}; expected one of {', '.join(EVENTS)}")
    return f"job.{event}"


def build_payload(event: str, job_id: str, data: Mapping[str, Any], *, at: str) -> bytes:
    """The body of one event: `{"type", "timestamp", "data": {"job_id", ...}}`, compact JSON with
    sorted keys (the exact bytes are signed and sent, on every attempt)."""
    payload = {"type": event_type(event), "timestamp": at, "data": {"job_id": job_id, **data}}
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def wanted(spec: Mapping[str, Any] | None, event: str) -> str | None:
    """The webhook URL of a (normalised) spec when it asks for `event`, else None."""
    hook = (spec or {}).get("webhook")
    if not hook or event not in hook.get("events", ()):
        return None
    return str(hook["url"])


def notify(store: JobStore, queue: TaskQueue, job_id: str, event: Event, data: Mapping[str, Any]) -> str | None:
    """Record a webhook message for `event` of the job and enqueue its delivery, when the job's
    spec asks for the event; once per job and event (per stage for `stage`), however often it is
    called (redelivered tasks, the API and a worker both seeing a cancel). Returns the message id,
    or None when nothing was sent. Never raises: a webhook must not change the course of a job."""
    try:
        job = store.get(job_id)
        url = wanted((job or {}).get("spec"), event)
        if url is None:
            return None
        once = f"stage:{data.get('stage')}" if event == "stage" else event
        msg_id = new_message_id()
        body = build_payload(event, job_id, data, at=now_iso())
        message = json.dumps({"url": url, "event": event_type(event), "body": body.decode()})
        if not store.put_webhook(job_id, once, msg_id, message):
            return None
    except Exception:  # the job store is down or the record is odd: the job goes on regardless
        log.exception("job %s: could not record the %s webhook", job_id, event)
        return None
    try:
        queue.send(DELIVER_WEBHOOK, job_id, msg_id)
    except ServiceError as e:  # QueueUnavailable: the broker is down
        log.error("job %s: could not enqueue webhook %s: %s", job_id, msg_id, e.detail)
        try:
            store.add_event(job_id, "webhook", msg_id=msg_id, event=event_type(event),
                            outcome="not_enqueued", error=e.detail)
        except ServiceError as e2:
            log.error("job %s: could not record it either: %s", job_id, e2.detail)
        return None
    return msg_id


# ---- URL and address safety ---------------------------------------------------------------

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_refusal(address: str | IpAddress) -> str | None:
    """Why the service must not connect to `address` (private, loopback, link-local, multicast,
    reserved, unspecified or otherwise not globally routable, IPv4 addresses embedded in IPv6
    included), or None when it is a public address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        for inner in embedded:
            why = address_refusal(inner) if inner is not None else None
            if why:
                return f"{why} (inside {ip})"
    kinds = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
             ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
             ("reserved", ip.is_reserved), ("private", ip.is_private))
    for kind, hit in kinds:
        if hit:
            return f"{ip} is a {kind} address"
    if not ip.is_global:
        return f"{ip} is not a globally routable address"
    return None


def check_url(url: str, *, allow_private: bool) -> None:
    """The checks that need no DNS: http(s) only, no credentials, a host, a valid port, and no
    literal private/loopback/... address unless `allow_private`. A host name is checked after it
    is resolved, at delivery time. Raises WebhookUrlRefused."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlRefused(f"scheme {parts.scheme!r} is not allowed; use http or https")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlRefused("a webhook URL must not carry credentials (user:password@)")
    if not parts.hostname:
        raise WebhookUrlRefused("a webhook URL needs a host")
    try:
        _ = parts.port
    except ValueError as e:
        raise WebhookUrlRefused(f"bad port: {e}") from e
    if allow_private:
        return
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return  # a name: resolved and checked at delivery time
    why = address_refusal(literal)
    if why:
        raise WebhookUrlRefused(f"{why}; the service does not call private or local addresses "
                                "(IDFORGE_WEBHOOK_ALLOW_PRIVATE=true allows them)")


def check_spec_webhook(spec: JobSpec, *, allow_private: bool) -> None:
    """POST-time check of the spec's webhook URL; SpecError naming `webhook.url`."""
    if spec.webhook is None:
        return
    try:
        check_url(str(spec.webhook.url), allow_private=allow_private)
    except WebhookUrlRefused as e:
        raise SpecError("webhook.url", str(e), code="webhook_url_refused") from e


# ---- retries ------------------------------------------------------------------------------


def should_retry(status: int | None) -> bool:
    """Retry connection errors and timeouts (no status), 429 and 5xx; not 3xx (redirects are not
    followed) nor other 4xx."""
    return status is None or status == 429 or 500 <= status <= 599


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def retry_delay(attempt: int, *, base_s: float, max_s: float, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first): `base_s` doubled
    per attempt, capped at `max_s`, scaled by a jitter factor in JITTER; never less than the
    receiver's Retry-After (itself capped at `max_s`)."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    rng = rng or random.Random()
    delay = min(max_s, base_s * 2.0 ** (attempt - 1)) * rng.uniform(*JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max_s))
    return round(delay, 3)
