"""The one way the service talks to Redis: the connection recipe, the key prefix, the error
translation and the timestamp format of every record.

Every Redis key of the service starts with `PREFIX`. `translate` turns what redis-py raises while
the server is unreachable, restarting (`LOADING`) or a replica (`READONLY`) into
`JobStoreUnavailable` (503), so each caller maps the same replies the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from app.errors import JobStoreUnavailable

PREFIX = "idf:"


def connect(url: str) -> redis.Redis:
    """A client (str replies) that rides out a Redis restart of a few seconds (connection refused,
    reset, timeouts): six retries with capped exponential backoff and jitter, about 10 s in all."""
    retry = Retry(EqualJitterBackoff(cap=4.0, base=0.1), 6)
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                                health_check_interval=30, retry=retry,
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


@contextmanager
def translate(what: str = "job store") -> Iterator[None]:
    """Redis outages and not-ready replies -> JobStoreUnavailable naming `what`."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise JobStoreUnavailable(f"{what} unreachable: {e}") from e
    except redis.ResponseError as e:
        if "LOADING" in str(e) or "READONLY" in str(e):
            raise JobStoreUnavailable(f"{what} not ready: {e}") from e
        raise


def now_iso(timespec: Literal["seconds", "milliseconds"] = "milliseconds") -> str:
    """UTC now as ISO 8601 with a Z, the format of every timestamp the service stores."""
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def iso_from_epoch(seconds: float) -> str:
    """A Unix time (Redis' TIME) in the format of `now_iso`."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
