"""The services a request needs, built once in the lifespan, and the auth dependencies: a route
names the scope it needs (`Team` = read, `Submitter` = submit, `Admin` = admin)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.api.auth import Principal
from app.errors import Unauthorized
from app.jobstore import JobStore
from app.lifecycle import Lifecycle
from app.queue import TaskQueue
from app.scheduler import Scheduler
from app.settings import Settings
from app.storage import Storage


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    queue: TaskQueue
    scheduler: Scheduler  # read and canceled here; the workers release
    lifecycle: Lifecycle  # deletion requests and reuse lookups; the workers delete and sweep


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def current_principal(request: Request) -> Principal:
    """The request's key (401 when missing, unknown or revoked; 429 over its rate limit): one Redis
    round trip, in the thread pool."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send 'Authorization: Bearer <api key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    return request.app.state.keyring.authenticate(token.strip())  # type: ignore[no-any-return]


def scoped(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency: the request's principal, 403 `insufficient_scope` unless it has `scope`."""
    async def check(p: Principal = Depends(current_principal)) -> Principal:  # noqa: B008
        p.require(scope)
        return p
    return check


def _team(scope: str) -> Callable[[Principal], Awaitable[str]]:
    async def team(p: Principal = Depends(scoped(scope))) -> str:  # noqa: B008
        return p.team
    return team


Svc = Annotated[Services, Depends(services)]
# The caller's team, for routes that read (GET): needs the `read` scope (or `submit`).
Team = Annotated[str, Depends(_team("read"))]
# The caller's team, for routes that submit or cancel jobs: needs the `submit` scope.
Submitter = Annotated[str, Depends(_team("submit"))]
# The caller's key, for key management: needs the `admin` scope.
Admin = Annotated[Principal, Depends(scoped("admin"))]
