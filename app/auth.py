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
(app.limits): the script reads the key's record and runs the bucket.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import redis

from app.errors import Forbidden, JobStoreUnavailable, Unauthorized
from app.limits import TAKE_TOKEN_LUA, rate_limited

SCOPES: tuple[str, ...] = ("read", "submit", "admin")
# A scope and the scopes it brings with it.
IMPLIES: dict[str, frozenset[str]] = {"submit": frozenset({"read"})}
TEAM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KEY_NAME_MAX = 64

P = "idf:"
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


def key_digest(key: str) -> str:
    """sha256 of the key, hex: what is stored, and what `team:sha256:<hex>` entries give."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(digest: str) -> str:
    """The key's public id (in listings, for revocation): a prefix of its digest."""
    return "key_" + digest[:16]


def new_key() -> str:
    return "idf_" + secrets.token_urlsafe(32)


def parse_scopes(names: Collection[str]) -> frozenset[str]:
    """Scope names as given -> the set; ValueError naming an unknown or missing one."""
    got = frozenset(n.strip() for n in names if n.strip())
    unknown = sorted(got - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}: scopes are {', '.join(SCOPES)}")
    if not got:
        raise ValueError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return got


def effective_scopes(scopes: Collection[str]) -> frozenset[str]:
    """The scopes with those they imply (submit -> read)."""
    out = set(scopes)
    for s in scopes:
        out |= IMPLIES.get(s, frozenset())
    return frozenset(out)


def check_team(team: str) -> str:
    if not TEAM_PATTERN.fullmatch(team):
        raise ValueError(f"team {team!r} must be 1-64 letters, digits, '.', '_' or '-', starting with "
                         "a letter or digit")
    return team


@dataclass(frozen=True)
class KeyEntry:
    """A bootstrap key from IDFORGE_API_KEYS."""

    team: str
    digest: str  # sha256 hex of the key
    scopes: frozenset[str]
    plaintext: str | None = field(default=None, repr=False)  # None for `sha256:` entries

    @property
    def id(self) -> str:
        return key_id(self.digest)


def parse_key_entries(text: str) -> list[KeyEntry]:
    """IDFORGE_API_KEYS -> entries (format in app/settings.py). Errors name the entry by position,
    never its key."""
    entries: list[KeyEntry] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(filter(None, (p.strip() for p in text.split(","))), start=1):
        where = f"IDFORGE_API_KEYS entry {n}"
        parts = [p.strip() for p in raw.split(":")]
        plaintext: str | None = None
        if len(parts) >= 3 and parts[1] == "sha256":
            digest, rest = parts[2].lower(), parts[3:]
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{where}: a sha256 digest is 64 hex digits")
        elif len(parts) >= 2 and parts[1]:
            plaintext, rest = parts[1], parts[2:]
            digest = key_digest(plaintext)
        else:
            raise ValueError(f"{where}: expected 'team:key', 'team:key:scopes' or "
                             "'team:sha256:<hex>[:scopes]'")
        if len(rest) > 1:
            raise ValueError(f"{where}: too many ':' (a plaintext key cannot contain ':')")
        try:
            team = check_team(parts[0])
            scopes = parse_scopes(rest[0].split("+")) if rest else frozenset(SCOPES)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if digest in seen:
            raise ValueError(f"{where}: the same key is already entry {seen[digest]}")
        seen[digest] = n
        entries.append(KeyEntry(team, digest, scopes, plaintext))
    return entries


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@contextmanager
def _translate() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise JobStoreUnavailable(f"key store unreachable: {e}") from e


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
        with _translate():
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
        rec = KeyRecord(key_id(digest), team, _sorted_scopes(granted), name, _now(), "redis")
        with _translate():
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(P + f"apikey:{digest}", mapping={
                "id": rec.id, "team": team, "scopes": ",".join(rec.scopes), "name": name,
                "created_at": rec.created_at, "source": "redis"})
            pipe.hset(INDEX, rec.id, digest)
            pipe.execute()
        return plaintext, rec

    def records(self, team: str | None = None) -> list[KeyRecord]:
        """Every key (of `team`), revoked ones included, oldest first; bootstrap ones first."""
        with _translate():
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
        with _translate():
            digest = self.r.hget(INDEX, kid)
            pipe = self.r.pipeline(transaction=True)
            if digest is None:  # a bootstrap key: its revocation is recorded in Redis
                entry = next(e for e in self._env.values() if e.id == kid)
                digest = entry.digest
                pipe.hset(P + f"apikey:{digest}", mapping={
                    "id": kid, "team": entry.team, "scopes": ",".join(_sorted_scopes(entry.scopes)),
                    "name": "IDFORGE_API_KEYS", "source": "env"})
                pipe.hset(INDEX, kid, digest)
            pipe.hsetnx(P + f"apikey:{digest}", "revoked_at", _now())
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
