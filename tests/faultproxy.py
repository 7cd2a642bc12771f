"""A fault-injecting HTTP/1.1 reverse proxy for the fault tests.

It sits between the service and the S3 server and forwards every request unchanged (SigV4 still
verifies: the Host header is passed through, and `Expect`, which SigV4 never signs, is answered by
the proxy itself). Rules that the test adds or clears while a job runs decide which requests get a
fault instead:

  slowdown        answer `503 SlowDown` (S3's throttling reply); the server never sees the request
  reset_before    read the request, then reset the connection (TCP RST); the server never sees it
  reset_after     forward the request, let the server act on it, then reset before the response
  reset_mid_body  forward, send the response head and half its body, then reset
  delay           forward, then hold the response back `delay_s` seconds (a slow server)

A rule matches by method and by a substring of the request target, fires with probability `p`
(from a seeded generator, so a run is repeatable), and at most `times` times. Every request and
every injected fault is counted in `stats`.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO, NoReturn
from urllib.parse import urlsplit

FAULTS = ("slowdown", "reset_before", "reset_after", "reset_mid_body", "delay")
NO_BODY_STATUS = {204, 304}
SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Rule:
    fault: str
    p: float = 1.0  # probability that a matching request gets the fault
    times: int | None = None  # at most this many injections; None = no limit
    methods: frozenset[str] | None = None  # e.g. {"PUT"}; None = every method
    path_contains: str = ""  # substring of the request target (path and query)
    delay_s: float = 1.0  # for `delay`
    fired: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault: expected one of {FAULTS}, got {self.fault!r}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {self.p}")

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        return (self.methods is None or method in self.methods) and self.path_contains in target


@dataclass
class _Message:
    head: bytes  # start line and headers, up to and including the blank line
    start: list[str]  # the start line's words
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""  # as framed on the wire (chunked bodies stay chunked)
    until_close: bool = False  # a response delimited by the server closing the connection

    @property
    def closes(self) -> bool:
        return self.until_close or self.headers.get("connection", "").lower() == "close"


@dataclass
class FaultProxy:
    upstream: str  # http://host:port of the real server
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    rules: list[Rule] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    # (method, target, fault or "") of every request, in arrival order
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        u = urlsplit(self.upstream)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"upstream: expected http://host:port, got {self.upstream!r}")
        self._up = (u.hostname, u.port)
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._open: set[socket.socket] = set()

    # ---- control, from the test ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def inject(self, fault: str, *, p: float = 1.0, times: int | None = None,
               methods: Iterable[str] | None = None, path_contains: str = "",
               delay_s: float = 1.0) -> Rule:
        rule = Rule(fault, p, times, frozenset(m.upper() for m in methods) if methods else None,
                    path_contains, delay_s)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def injected(self) -> int:
        """Faults injected so far, of every kind."""
        with self._lock:
            return sum(self.stats[f] for f in FAULTS)

    def start(self) -> FaultProxy:
        self._sock = socket.create_server((self.host, self.port))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            for s in list(self._open):
                _close(s)

    # ---- the proxy ----------------------------------------------------------------------------

    def _choose(self, method: str, target: str) -> Rule | None:
        with self._lock:
            self.stats["requests"] += 1
            chosen = None
            for rule in self.rules:
                if rule.matches(method, target) and self._rng.random() < rule.p:
                    rule.fired += 1
                    self.stats[rule.fault] += 1
                    chosen = rule
                    break
            self.log.append((method, target, chosen.fault if chosen else ""))
            return chosen

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        up_reader: BinaryIO | None = None
        reader = client.makefile("rb")
        files: list[BinaryIO] = [reader]
        try:
            while True:
                request = _read_head(reader)
                if request is None:
                    return
                method, target = request.start[0], request.start[1]
                if request.headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    request.head = _drop_header(request.head, "expect")
                request.body = _read_body(reader, request.headers)
                rule = self._choose(method, target)
                fault = rule.fault if rule else ""
                if fault == "slowdown":
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(SLOWDOWN) + SLOWDOWN)
                    continue
                if fault == "reset_before":
                    return _reset(client)
                if upstream is None:
                    upstream = socket.create_connection(self._up, timeout=120)
                    up_reader = upstream.makefile("rb")
                    files.append(up_reader)
                    with self._lock:
                        self._open.add(upstream)
                assert up_reader is not None
                upstream.sendall(request.head + request.body)
                response = _read_head(up_reader)
                if response is None:
                    return _reset(client)
                response.body, response.until_close = _read_response_body(
                    up_reader, response, head_request=method == "HEAD")
                with self._lock:
                    self.stats["forwarded"] += 1
                if fault == "reset_after":
                    return _reset(client)
                if fault == "reset_mid_body" and len(response.body) > 1:
                    client.sendall(response.head + response.body[:len(response.body) // 2])
                    return _reset(client)
                if fault == "delay" and rule is not None:
                    time.sleep(rule.delay_s)
                client.sendall(response.head + response.body)
                if response.closes or request.closes:
                    return
        except OSError:
            return
        finally:  # a socket really closes (with the RST, if one was asked for) once its files do
            for f in files:
                _close(f)
            for s in (client, upstream):
                if s is not None:
                    _close(s)
                    with self._lock:
                        self._open.discard(s)


def _read_head(reader: BinaryIO) -> _Message | None:
    lines: list[bytes] = []
    while True:
        line = reader.readline(65537)
        if not line:
            if lines:
                _fail("connection closed inside a message head")
            return None
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue  # stray blank line between messages
            break
        lines.append(line)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return _Message(b"".join(lines) + b"\r\n", lines[0].decode("latin-1").split(), headers)


def _read_body(reader: BinaryIO, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _read_chunked(reader)
    n = int(headers.get("content-length", "0"))
    data = reader.read(n) if n else b""
    if len(data) != n:
        _fail(f"body cut short: {len(data)} of {n} bytes")
    return data


def _read_response_body(reader: BinaryIO, response: _Message, *, head_request: bool) -> tuple[bytes, bool]:
    status = int(response.start[1])
    if head_request or status in NO_BODY_STATUS or 100 <= status < 200:
        return b"", False
    h = response.headers
    if "chunked" in h.get("transfer-encoding", "").lower() or "content-length" in h:
        return _read_body(reader, h), False
    return reader.read(), True  # delimited by the server closing the connection


def _read_chunked(reader: BinaryIO) -> bytes:
    out: list[bytes] = []
    while True:
        size_line = reader.readline(65537)
        out.append(size_line)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the blank line
                line = reader.readline(65537)
                out.append(line)
                if line in (b"\r\n", b"\n", b""):
                    return b"".join(out)
        out.append(reader.read(size + 2))


def _drop_header(head: bytes, name: str) -> bytes:
    lines = head.split(b"\r\n")
    keep = [ln for ln in lines if not ln.lower().startswith(name.encode() + b":")]
    return b"\r\n".join(keep)


def _reset(s: socket.socket) -> None:
    """Make the coming close an RST instead of a FIN: the peer sees `connection reset by peer`."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _close(s: socket.socket | BinaryIO) -> None:
    try:
        s.close()
    except OSError:
        pass


def _fail(message: str) -> NoReturn:
    raise OSError(message)
