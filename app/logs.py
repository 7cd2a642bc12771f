"""Log records as one JSON object per line (or plain text), carrying the job they belong to.

A job's context (`job_id`, and in workers the task and the shard) is set by the workers' task
wrapper with `log_context(...)` and, for requests under `/v1/jobs/{id}`, by the API's
`RequestLogContext` middleware; every record logged inside it, by any logger, carries those fields.
Processes call `setup_logging(format, level)` once at start: it installs one stderr handler on the
root logger and routes uvicorn's, Celery's and billiard's loggers (and warnings) through it.

    {"time": "2026-11-24T00:41:07.112Z", "level": "INFO", "logger": "idforge.worker",
     "message": "job j0001 canceled", "job_id": "j0001", "task": "idforge.render_shard", "shard": 3}
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text", "auto"]

# The fields a record picks up from the context it was logged in, in output order.
CONTEXT_FIELDS = ("job_id", "task", "shard")
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("idforge_log_context",
                                                                                 default=None)

# Libraries whose own handlers are dropped so that their records reach the root handler once.
_ROUTED = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker",
           "celery.app.trace", "celery.redirected")


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Records logged inside this block (in this thread or task, and in the threads it hands work
    to with a copied context) carry `fields`; None values are left out. Blocks nest."""
    merged = {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    """The fields that a record logged here would carry."""
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the log context onto each record (as attributes) so that any formatter can use it."""

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in (_context.get() or {}).items():
            if not hasattr(record, k):
                setattr(record, k, v)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, the context fields, any
    `extra=` fields that are JSON-serialisable, and the traceback as `exc_info` when there is one."""

    # LogRecord's own attributes: not copied as extra fields.
    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
    _STANDARD |= {"message", "asctime", "color_message", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._STANDARD and k not in out and not k.startswith("_"):
                out[k] = v if _jsonable(v) else repr(v)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [job_id=... task=... shard=...] message` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(context)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if hasattr(record, k))
        record.context = f"[{ctx}] " if ctx else ""
        return super().format(record)


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool | list | dict)


def resolve_format(fmt: LogFormat, stream: Any = None) -> Literal["json", "text"]:
    """`auto`: text when the stream is a terminal, JSON otherwise (a file, a pipe, a container log)."""
    if fmt != "auto":
        return fmt
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup_logging(fmt: LogFormat = "auto", level: str = "INFO", stream: Any = None) -> logging.Handler:
    """Replace the root logger's handlers with one handler on `stream` (default stderr) in the
    chosen format, and send uvicorn's and Celery's records through it. Returns the handler."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if resolve_format(fmt, stream) == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _ROUTED:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    # billiard (Celery's pool) logs to "multiprocessing", which it keeps from propagating.
    pool = logging.getLogger("multiprocessing")
    pool.handlers[:] = [handler]
    pool.propagate = False
    logging.captureWarnings(True)  # warnings become records of logger "py.warnings"
    return handler


_JOB_PATH = re.compile(r"^/v1/jobs/([A-Za-z0-9]{1,64})(?:/|$)")


class RequestLogContext:
    """ASGI middleware: while a request under `/v1/jobs/{id}` is handled, records carry its job_id.

    When the request fails, the context stays set: the 500 handler logs the error outside this
    middleware (the server runs each request in its own task, so it ends with the request)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        m = _JOB_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if m is None:
            await self.app(scope, receive, send)
            return
        token = _context.set({**(_context.get() or {}), "job_id": m[1]})
        await self.app(scope, receive, send)
        _context.reset(token)
