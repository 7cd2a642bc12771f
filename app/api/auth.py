"""API keys and their scopes: who is asking, for which team, allowed to do what.

A key belongs to one team and carries scopes:
- `read`: GET jobs, events, artifacts (presigned URLs), models, the team's quota;
- `submit`: POST jobs and cancel them; implies `read`, because a submitter must follow and
  download what it submitted;
- `admin`: manage the team's keys (`/v1/keys`); it implies nothing else, but an admin key can mint a
  key with any scope for its own team.

Keys are stored hashed: Redis holds, under the key's sha256, a record with the team, scopes, name and
creation time; the plaintext is shown once when the key is made (`idforge keys create` or
`POST /v1/keys`) and never stored. Keys are 256-bit random strings, so an unsalted sha256 is safe to
keep and lets an operator put `team:sha256:<hex>` in IDFORGE_API_KEYS instead of the key itself
(format in app/settings.py). Those bootstrap entries live in the process, not in Redis; revoking
one writes a revocation record that every API process sees.

One Redis round trip authenticates a request and takes a token from its key's rate-limit bucket
(app.api.limits): the script reads the key's record and runs the bucket.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from app.api.limits import TAKE_TOKEN_LUA, rate_limited
from app.credentials import (
    SCOPES,
    KeyEntry,
    check_team,
    effective_scopes,
    key_digest,
    key_id,
    new_key,
    parse_scopes,
)
from app.errors import Forbidden, Unauthorized
from app.redis_client import PREFIX as P
from app.redis_client import now_iso, translate

KEY_NAME_MAX = 64

INDEX = P + "apikeys"  # hash: key id -> sha256 hex of the key

_AUTHENTICATE = """
local rec = redis.call('HMGET', KEYS[1], 'team', 'scopes', 'revoked_at')
if rec[3] and rec[3] ~= '' then return {'revoked'} end
local team, scopes = rec[1], rec[2]
if not team then
  if ARGV[1] == '' then return {'unknown'} end
  team, scopes = ARGV[1], ARGV[2]
end
local rate = tonumber(ARGV[3])
if rate > 0 and not string.find(ARGV[5], ',' .. team .. ',', 1, true) then
  local t = redis.call('TIME')
  local got = take(KEYS[2], rate, tonumber(ARGV[4]), tonumber(t[1]) + tonumber(t[2]) / 1000000)
  if got[1] == 0 then return {'limited', team, scopes, got[2]} end
end
return {'ok', team, scopes}
"""


@dataclass(frozen=True)
class KeyRecord:
    """What is known of a key, never the key itself."""

    id: str
    team: str
    scopes: tuple[str, ...]
    name: str
    created_at: str | None  # None for bootstrap keys
    source: Literal["redis", "env"]  # made by `keys create`/`POST /v1/keys`, or IDFORGE_API_KEYS
    revoked_at: str | None = None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "team": self.team, "scopes": list(self.scopes), "name": self.name,
                "created_at": self.created_at, "source": self.source, "revoked_at": self.revoked_at,
                "active": self.revoked_at is None}


@dataclass(frozen=True)
class Principal:
    """An authenticated request: its key, team and effective scopes."""

    key_id: str
    team: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        """403 `insufficient_scope` naming `scope` unless the key has it."""
        if scope not in self.scopes:
            has = ", ".join(sorted(self.scopes)) or "none"
            raise Forbidden(f"this API key lacks the '{scope}' scope (it has: {has})",
                            code="insufficient_scope",
                            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'})


def _sorted_scopes(scopes: Collection[str]) -> tuple[str, ...]:
    return tuple(s for s in SCOPES if s in scopes)


class KeyRing:
    """Every key the service accepts: bootstrap entries (in memory) and keys in Redis.

    `client` is a redis-py client with decode_responses=True. `rate_per_s` = 0 turns the rate limit
    off; keys of `exempt_teams` are never limited."""

    def __init__(self, client: redis.Redis, entries: Sequence[KeyEntry] = (), *, rate_per_s: float = 0,
                 burst: int = 1, exempt_teams: Collection[str] = ()) -> None:
        self.r: Any = client
        self._env = {e.digest: e for e in entries}
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._exempt = "," + ",".join(exempt_teams) + ","
        self._authenticate = client.register_script(TAKE_TOKEN_LUA + _AUTHENTICATE)

    # ---- requests ----------------------------------------------------------------------

    def authenticate(self, token: str) -> Principal:
        """The key's principal; 401 for an unknown or revoked key, 429 over the rate limit."""
        digest = key_digest(token)
        kid = key_id(digest)
        env = self._env.get(digest)
        with translate("key store"):
            got = self._authenticate(keys=[P + f"apikey:{digest}", P + f"ratelimit:{kid}"], args=[
                env.team if env else "", ",".join(sorted(env.scopes)) if env else "",
                self.rate_per_s, self.burst, self._exempt])
        if got[0] != "ok" and got[0] != "limited":
            detail = "the API key has been revoked" if got[0] == "revoked" else "the API key is not valid"
            raise Unauthorized(detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if got[0] == "limited":
            raise rate_limited(kid, self.rate_per_s, self.burst, int(got[3]))
        return Principal(kid, got[1], effective_scopes(got[2].split(",")))

    # ---- management (the CLI and the admin routes) -------------------------------------

    def create(self, team: str, scopes: Collection[str], name: str = "") -> tuple[str, KeyRecord]:
        """A new key for `team`: (the plaintext, shown once; its record)."""
        check_team(team)
        granted = parse_scopes(scopes)
        if len(name) > KEY_NAME_MAX or not name.isprintable():
            raise ValueError(f"a key name is at most {KEY_NAME_MAX} printable characters")
        plaintext = new_key()
        digest = key_digest(plaintext)
        rec = KeyRecord(key_id(digest), team, _sorted_scopes(granted), name, now_iso("seconds"), "redis")
        with translate("key store"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(P + f"apikey:{digest}", mapping={
                "id": rec.id, "team": team, "scopes": ",".join(rec.scopes), "name": name,
                "created_at": rec.created_at, "source": "redis"})
            pipe.hset(INDEX, rec.id, digest)
            pipe.execute()
        return plaintext, rec

    def records(self, team: str | None = None) -> list[KeyRecord]:
        """Every key (of `team`), revoked ones included, oldest first; bootstrap ones first."""
        with translate("key store"):
            index: dict[str, str] = self.r.hgetall(INDEX)
            pipe = self.r.pipeline(transaction=False)
            for digest in index.values():
                pipe.hgetall(P + f"apikey:{digest}")
            stored = [_record(raw) for raw in pipe.execute() if raw]
        ids = {r.id for r in stored}
        env = [_env_record(e) for e in self._env.values() if e.id not in ids]
        out = env + sorted(stored, key=lambda r: (r.source, r.created_at or "", r.id))
        return [r for r in out if team is None or r.team == team]

    def get(self, kid: str) -> KeyRecord | None:
        return next((r for r in self.records() if r.id == kid), None)

    def revoke(self, kid: str, *, team: str | None = None) -> KeyRecord | None:
        """Revoke key `kid` (only if it is `team`'s, when given); None when there is no such key.
        Revoking twice keeps the first time."""
        rec = self.get(kid)
        if rec is None or (team is not None and rec.team != team):
            return None
        if rec.revoked_at is not None:
            return rec
        with translate("key store"):
            digest = self.r.hget(INDEX, kid)
            pipe = self.r.pipeline(transaction=True)
            if digest is None:  # a bootstrap key: its revocation is recorded in Redis
                entry = next(e for e in self._env.values() if e.id == kid)
                digest = entry.digest
                pipe.hset(P + f"apikey:{digest}", mapping={
                    "id": kid, "team": entry.team, "scopes": ",".join(_sorted_scopes(entry.scopes)),
                    "name": "IDFORGE_API_KEYS", "source": "env"})
                pipe.hset(INDEX, kid, digest)
            pipe.hsetnx(P + f"apikey:{digest}", "revoked_at", now_iso("seconds"))
            pipe.hget(P + f"apikey:{digest}", "revoked_at")
            revoked_at = pipe.execute()[-1]
        return KeyRecord(rec.id, rec.team, rec.scopes, rec.name, rec.created_at, rec.source, revoked_at)


def _record(raw: dict[str, str]) -> KeyRecord:
    source: Literal["redis", "env"] = "env" if raw.get("source") == "env" else "redis"
    return KeyRecord(raw["id"], raw["team"], tuple(filter(None, raw.get("scopes", "").split(","))),
                     raw.get("name", ""), raw.get("created_at") or None, source,
                     raw.get("revoked_at") or None)


def _env_record(e: KeyEntry) -> KeyRecord:
    return KeyRecord(e.id, e.team, _sorted_scopes(e.scopes), "IDFORGE_API_KEYS", None, "env")
