"""The service's error tree. Each error knows its HTTP status and its RFC 9457 problem type.

```
ServiceError (500 internal)
  BadRequest 400  Unauthorized 401  Forbidden 403  NotFound 404  Conflict 409  Gone 410
  PayloadTooLarge 413  UnsupportedMediaType 415  InvalidRequest 422  InvalidSpec 422
  TooManyRequests 429
  StorageKeyMissing 404 object_not_found     not transient: retrying finds nothing more
  transient (503; TRANSIENT, retried by the workers before they fail a job):
    JobStoreUnavailable  StorageError  QueueUnavailable
```

Adapters translate library errors at the boundary: redis errors become `JobStoreUnavailable`
(`app/redis_client.py`), botocore errors `StorageError` or `StorageKeyMissing` (`app/storage.py`);
the HTTP edge renders every `ServiceError` as problem+json.
"""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://idforge.dev/problems/"


class ServiceError(Exception):
    status = 500
    code = "internal"
    title = "Internal error"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}
        if code:
            self.code = code

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body


class BadRequest(ServiceError):
    status, code, title = 400, "bad_request", "Bad request"


class Unauthorized(ServiceError):
    status, code, title = 401, "unauthorized", "Missing or invalid API key"


class Forbidden(ServiceError):
    status, code, title = 403, "forbidden", "Forbidden"


class TooManyRequests(ServiceError):
    """429: a rate limit or a quota; always sent with Retry-After (seconds)."""

    status, code, title = 429, "too_many_requests", "Too many requests"


class NotFound(ServiceError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(ServiceError):
    status, code, title = 409, "conflict", "Conflict"


class Gone(ServiceError):
    """410: it existed and was deleted on purpose (a deleted job's artifacts)."""

    status, code, title = 410, "gone", "Gone"


class PayloadTooLarge(ServiceError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class UnsupportedMediaType(ServiceError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class InvalidRequest(ServiceError):
    status, code, title = 422, "invalid_request", "Invalid request"


class InvalidSpec(ServiceError):
    status, code, title = 422, "invalid_spec", "Invalid job spec"


class JobStoreUnavailable(ServiceError):
    status, code, title = 503, "job_store_unavailable", "Job store unavailable"


class StorageError(ServiceError):
    status, code, title = 503, "storage_unavailable", "Storage unavailable"


class QueueUnavailable(ServiceError):
    status, code, title = 503, "queue_unavailable", "Task queue unavailable"


class StorageKeyMissing(ServiceError):
    status, code, title = 404, "object_not_found", "Object not found"


# Outages worth another attempt: the workers retry these before they fail a job.
TRANSIENT: tuple[type[ServiceError], ...] = (JobStoreUnavailable, StorageError, QueueUnavailable)
