"""Webhook delivery: one signed POST per attempt, to an address checked just before connecting.

Each attempt re-reads the stored message (the same bytes every time), resolves the URL's host and
refuses private, loopback and other non-public addresses unless IDFORGE_WEBHOOK_ALLOW_PRIVATE is
on, then connects to one of the addresses it checked (no second DNS lookup that a rebinding
attacker could answer differently) while sending the URL's own host name as the Host header and,
for https, as the TLS server name. Redirects are not followed. Every attempt and the final outcome
are recorded in the job's event log as `webhook` events; nothing here changes a job's status.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app import __version__
from app.errors import JobStoreUnavailable
from app.webhooks import (
    WebhookUrlRefused,
    address_refusal,
    check_url,
    delivery_headers,
    parse_retry_after,
    retry_delay,
    should_retry,
)
from workers.runtime import Runtime, get_runtime

log = logging.getLogger("idforge.webhooks")

Resolver = Callable[[str, int], list[str]]
RESPONSE_BYTES = 4096  # what is read of a receiver's answer (only its status matters)


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses, in the system resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    url: str
    host: str  # the URL's host name, sent as Host and TLS server name
    port: int
    addresses: list[str]  # checked addresses to connect to, in order


def resolve_target(url: str, *, allow_private: bool, resolve: Resolver = system_resolver) -> Target:
    """Check `url` and resolve its host; WebhookUrlRefused when the URL or any address it
    resolves to is not allowed, OSError when the name does not resolve."""
    check_url(url, allow_private=allow_private)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port)
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    if not allow_private:
        for a in addresses:
            why = address_refusal(a)
            if why:
                raise WebhookUrlRefused(f"{host} resolves to {why}; the service does not call private or "
                                        "local addresses (IDFORGE_WEBHOOK_ALLOW_PRIVATE=true allows them)")
    return Target(url, host, port, addresses)


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a fixed address; the Host header still names the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a fixed address; SNI and certificate checks use the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=tls)
        self.address, self.tls = address, tls

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None


def post(target: Target, body: bytes, headers: dict[str, str], *, timeout: float,
         tls: ssl.SSLContext | None = None) -> Answer:
    """POST `body` to the first of the target's addresses that takes a connection. Raises OSError
    (refused, timed out, TLS failure) or http.client.HTTPException (a garbled answer)."""
    parts = urlsplit(target.url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    last: Exception | None = None
    for address in target.addresses:
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPS(
                target.host, target.port, address, timeout, tls or ssl.create_default_context())
        else:
            conn = _PinnedHTTP(target.host, target.port, address, timeout)
        try:
            try:
                conn.connect()
            except OSError as e:  # try the next checked address
                last = e
                continue
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(RESPONSE_BYTES)
            return Answer(resp.status, resp.getheader("retry-after"))
        finally:
            conn.close()
    raise last or OSError("no address to connect to")


def deliver(rt: Runtime, job_id: str, msg_id: str, attempt: int, *, resolve: Resolver = system_resolver,
            tls: ssl.SSLContext | None = None, rng: random.Random | None = None) -> float | None:
    """Attempt number `attempt` (from 1) of one stored message; records it in the job's events.
    Returns the seconds to wait before the next attempt, or None when delivery is over
    (delivered, refused, not retryable, or out of attempts)."""
    raw = rt.store.get_webhook(job_id, msg_id)
    if raw is None:
        log.warning("job %s: no webhook message %s; dropping it", job_id, msg_id)
        return None
    message: dict[str, Any] = json.loads(raw)
    s = rt.settings
    record: dict[str, Any] = {"msg_id": msg_id, "event": message["event"], "attempt": attempt}
    body = message["body"].encode()
    status: int | None = None
    retry_after: str | None = None
    error: str | None = None
    try:
        target = resolve_target(message["url"], allow_private=s.webhook_allow_private, resolve=resolve)
    except WebhookUrlRefused as e:
        rt.store.add_event(job_id, "webhook", **record, outcome="refused", error=str(e))
        log.warning("job %s: webhook %s refused: %s", job_id, msg_id, e)
        return None
    except OSError as e:
        error = f"cannot resolve the host: {e}"
    else:
        headers = {"user-agent": f"idforge-webhooks/{__version__}",
                   **delivery_headers(s.webhook_keys, msg_id, int(time.time()), body)}
        try:
            answer = post(target, body, headers, timeout=s.webhook_timeout_s, tls=tls)
            status, retry_after, error = answer.status, answer.retry_after, None
        except (OSError, http.client.HTTPException) as e:
            error = f"{type(e).__name__}: {e}"
    if status is not None:
        record["status_code"] = status
    if error is not None:
        record["error"] = error
    if status is not None and 200 <= status <= 299:
        rt.store.add_event(job_id, "webhook", **record, outcome="delivered")
        return None
    if not should_retry(status) or attempt >= s.webhook_max_attempts:
        why = "not retryable" if not should_retry(status) else f"{attempt} attempts made"
        rt.store.add_event(job_id, "webhook", **record, outcome="failed", reason=why)
        log.warning("job %s: webhook %s failed (%s): %s", job_id, msg_id, why, error or status)
        return None
    delay = retry_delay(attempt, base_s=s.webhook_backoff_s, max_s=s.webhook_backoff_max_s,
                        retry_after=parse_retry_after(retry_after), rng=rng)
    rt.store.add_event(job_id, "webhook", **record, outcome="retrying", next_retry_s=delay)
    return delay


def deliver_task(task: Any, job_id: str, msg_id: str) -> None:
    """The body of the `idforge.deliver_webhook` task: one attempt, then a Celery retry after the
    backoff when another is due. A failing receiver or job store never fails the job."""
    rt = get_runtime()
    attempt = task.request.retries + 1
    try:
        delay = deliver(rt, job_id, msg_id, attempt)
    except JobStoreUnavailable as e:  # cannot read the message or record the attempt
        if attempt >= rt.settings.webhook_max_attempts:
            log.error("job %s: webhook %s dropped after %d attempts: %s", job_id, msg_id, attempt, e.detail)
            return
        delay = retry_delay(attempt, base_s=rt.settings.webhook_backoff_s,
                            max_s=rt.settings.webhook_backoff_max_s)
    except Exception:  # a bug here must not loop: record nothing more, keep the job as it is
        log.exception("job %s: webhook %s attempt %d crashed", job_id, msg_id, attempt)
        return
    if delay is not None:
        raise task.retry(countdown=delay)
