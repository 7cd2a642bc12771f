"""Rate limits and quotas: what a team may ask of the service, and the 413/429/403 answers.

Rate limit: a token bucket per API key in Redis (rate `rate_limit_per_s`, capacity
`rate_limit_burst`). It runs inside the authentication script (`app.api.auth`), so a request pays one
Redis round trip for its key and its rate limit together. A refused request takes no token, and
its `Retry-After` is the time until the bucket holds one again.

Quotas, per team (settings' defaults, overridden per team by `team_quotas`):
- concurrent jobs: queued, running and canceling jobs; the next submission is a 429 with
  `Retry-After` and code `quota_concurrent_jobs`.
- images per day: the images of the jobs submitted in the current UTC day, counted at submission,
  atomically with the job's creation (one Lua script). A job that no longer fits in today's
  remainder is a 429 with `Retry-After` until 00:00 UTC; a job larger than the whole daily quota
  can never pass and is a 403. Both carry code `quota_images_per_day` and the numbers.
Refused requests count nothing; an Idempotency-Key replay returns its job and counts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.errors import Forbidden, PayloadTooLarge, TooManyRequests

if TYPE_CHECKING:  # annotations only
    from fastapi import Request

    from app.jobstore import Created, JobStore
    from app.settings import Settings

# A team at its concurrent-jobs quota is told to come back after this many seconds: jobs run for
# minutes, so sooner is pointless polling.
CONCURRENT_RETRY_AFTER_S = 30

# The token bucket, as a Lua function for scripts that include it (app.api.auth's authentication).
# take(key, rate per second, burst, now in seconds) -> {1, 0} when a token was taken, else
# {0, milliseconds until one is there}. The bucket hash holds `t` (tokens) and `ts` (last refill,
# seconds); it expires once it would be full again, so idle keys cost no memory.
TAKE_TOKEN_LUA = """
local function take(key, rate, burst, now)
  local b = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  if tokens < 1 then
    return {0, math.ceil((1 - tokens) / rate * 1000)}
  end
  redis.call('HSET', key, 't', tostring(tokens - 1), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
  return {1, 0}
end
"""


def rate_limited(key_id: str, rate: float, burst: int, retry_after_ms: int) -> TooManyRequests:
    retry = max(1, -(-retry_after_ms // 1000))  # whole seconds, rounded up
    return TooManyRequests(
        f"API key {key_id} is over its rate limit of {rate:g} requests/s (burst {burst}); "
        f"retry in {retry} s", code="rate_limited", headers={"Retry-After": str(retry)})


@dataclass(frozen=True)
class Quota:
    """A team's limits; 0 = no limit."""

    concurrent_jobs: int  # queued + running + canceling jobs
    images_per_day: int  # images of the jobs submitted per UTC day


def quota_for(settings: Settings, team: str) -> Quota:
    """The team's quota: its `team_quotas` entry over the settings' defaults."""
    own = settings.team_quotas.get(team)
    return Quota(
        concurrent_jobs=settings.max_concurrent_jobs if own is None or own.concurrent_jobs is None
        else own.concurrent_jobs,
        images_per_day=settings.max_images_per_day if own is None or own.images_per_day is None
        else own.images_per_day)


@dataclass(frozen=True)
class Admitted:
    """A submission that passed the quotas: the job (or the replayed one) and the UTC day
    (days since the epoch) its images were counted on."""

    made: Created
    day: int
    images: int  # counted against the day (0 for a replay)


def admit(store: JobStore, settings: Settings, team: str, spec: dict[str, Any], spec_hash: str, *,
          identities: int, images: int, idempotency_key: str | None, body_hash: str,
          retention_s: float = 0, dataset_hash: str | None = None) -> Admitted:
    """Record the job if the team's quotas allow it (atomically), else raise the 429/403. The
    service's `submit` (app.api.jobs_service) calls it, and gives the images back when the job
    cannot be enqueued."""
    quota = quota_for(settings, team)
    made, usage = store.create_within_quota(
        team, spec, spec_hash, identities=identities, images=images,
        max_concurrent=quota.concurrent_jobs, max_images_per_day=quota.images_per_day,
        idempotency_key=idempotency_key, body_hash=body_hash,
        idempotency_ttl_s=settings.idempotency_ttl_s, retention_s=retention_s, dataset_hash=dataset_hash)
    if made is not None:
        return Admitted(made, usage["day"], images if made.created else 0)
    if usage["refused"] == "concurrent_jobs":
        raise TooManyRequests(
            f"team {team} has {usage['concurrent']} unfinished jobs, its quota of concurrent jobs is "
            f"{quota.concurrent_jobs}; wait for one to finish or cancel one",
            code="quota_concurrent_jobs", headers={"Retry-After": str(CONCURRENT_RETRY_AFTER_S)})
    used, left_s = usage["images_today"], usage["seconds_left"]
    why = (f"this job needs {images} images; team {team} has used {used} of its {quota.images_per_day} "
           "images for today (UTC)")
    if images > quota.images_per_day:
        raise Forbidden(f"{why}: the job is larger than the whole daily quota; split it or ask for a "
                        "larger quota", code="quota_images_per_day")
    raise TooManyRequests(f"{why}; the quota resets at 00:00 UTC, in {left_s} s",
                          code="quota_images_per_day", headers={"Retry-After": str(left_s)})


def usage(store: JobStore, settings: Settings, team: str) -> dict[str, Any]:
    """The team's quotas and what it uses of them now."""
    quota = quota_for(settings, team)
    now = store.quota_usage(team)
    return {"team": team,
            "concurrent_jobs": {"limit": quota.concurrent_jobs, "used": now["concurrent"]},
            "images_per_day": {"limit": quota.images_per_day, "used": now["images_today"],
                               "resets_in_s": now["seconds_left"]},
            "rate_limit": {"per_s": settings.rate_limit_per_s, "burst": settings.rate_limit_burst,
                           "exempt": team in settings.rate_limit_exempt}}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: by its
    Content-Length before reading, or while streaming a body sent without one (chunked)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    return bytes(body)
