"""Credentials as IDFORGE_* settings spell them: API-key entries and their scopes, team names,
webhook signing secrets. A leaf: settings parse with these, and the API's key ring
(`app/api/auth.py`) and the webhook signer (`app/webhooks.py`) build on them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field

SCOPES: tuple[str, ...] = ("read", "submit", "admin")
# A scope and the scopes it brings with it.
IMPLIES: dict[str, frozenset[str]] = {"submit": frozenset({"read"})}
TEAM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)  # Standard Webhooks: at least 24 bytes, at most 64 (512 bits)


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


def parse_secret(value: str) -> bytes:
    """`whsec_<base64>` -> the HMAC key bytes; ValueError naming what is wrong."""
    if not value.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with '{SECRET_PREFIX}' (whsec_ + base64)")
    try:
        key = base64.b64decode(value.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as e:
        raise ValueError(f"the part of the webhook secret after '{SECRET_PREFIX}' is not base64: {e}") from e
    lo, hi = SECRET_BYTES
    if not lo <= len(key) <= hi:
        raise ValueError(f"a webhook secret must decode to {lo}..{hi} bytes, not {len(key)}")
    return key


def parse_secrets(value: str) -> list[bytes]:
    """Space-separated secrets (a rotation: the current one first) -> their keys."""
    return [parse_secret(v) for v in value.split()]


def new_secret(n_bytes: int = 32) -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(n_bytes)).decode()
