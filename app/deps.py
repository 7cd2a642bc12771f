"""The services a request needs, built once in the lifespan, and the auth dependency."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.errors import Unauthorized
from app.queue import TaskQueue
from app.settings import Settings
from app.storage import Storage
from app.store import JobStore


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    queue: TaskQueue


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


class KeyRing:
    """API keys, compared as sha256 digests in constant time; a key belongs to one team."""

    def __init__(self, team_keys: dict[str, str]) -> None:
        self._digests = [(hashlib.sha256(k.encode()).digest(), t) for k, t in team_keys.items()]

    def team_for(self, key: str) -> str | None:
        d = hashlib.sha256(key.encode()).digest()
        team = None
        for digest, t in self._digests:
            if hmac.compare_digest(digest, d):
                team = t
        return team


def current_team(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send 'Authorization: Bearer <api key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    team = request.app.state.keyring.team_for(token.strip())
    if team is None:
        raise Unauthorized("the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    return team  # type: ignore[no-any-return]


Svc = Annotated[Services, Depends(services)]
Team = Annotated[str, Depends(current_team)]
