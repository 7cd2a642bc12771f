"""Liveness, readiness, Prometheus metrics, the model registry, the team's quota and API keys."""

from __future__ import annotations

import hmac
import logging
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from app import __version__, catalog, telemetry
from app.api import limits, metrics
from app.api.auth import KEY_NAME_MAX
from app.api.deps import Admin, Svc, Team
from app.api.openapi import Health, ModelList, Readiness, problems
from app.api.problems import field_errors
from app.errors import InvalidRequest, NotFound, ServiceError, Unauthorized

log = logging.getLogger("idforge.api")

router = APIRouter(tags=["system"])


@router.get("/healthz", summary="Liveness", responses={200: {"model": Health}})
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/readyz", summary="Readiness: Redis, storage and the broker answer",
            responses={200: {"model": Readiness}, 503: {"model": Readiness, "description": "Not ready"}})
async def readyz(svc: Svc) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, probe in (("redis", svc.store.ping), ("storage", svc.storage.ping),
                        ("broker", svc.queue.ping)):
        try:
            await run_in_threadpool(probe)
            checks[name] = "ok"
        except ServiceError as e:
            checks[name] = e.detail
        except Exception as e:  # a probe must never turn readiness into a 500
            checks[name] = f"{type(e).__name__}: {e}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics: jobs by status, stage durations, images, "
            "queues, worker heartbeats", response_class=Response,
            responses={200: {"content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}},
                             "description": "The Prometheus text exposition format"},
                       **problems(401)})
def prometheus_metrics(request: Request, svc: Svc) -> Response:
    token = svc.settings.metrics_token.get_secret_value()
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("GET /metrics needs 'Authorization: Bearer <IDFORGE_METRICS_TOKEN>'",
                               headers={"WWW-Authenticate": "Bearer"})
    try:
        queues: dict[str, int] | None = svc.queue.queue_lengths()
    except Exception as e:  # the broker being down is a metric, not a failed scrape
        log.warning("metrics: queue lengths unavailable: %s", e)
        queues = None
    teams = {k.team for k in request.app.state.keyring.records()}  # revoked keys' teams too
    snap = telemetry.Telemetry(svc.store.r).snapshot(svc.store, teams, queues)
    return Response(metrics.render(snap), media_type=metrics.CONTENT_TYPE)


@router.get("/v1/models", summary="The model registry and what workers report about it",
            responses={200: {"model": ModelList}})
def models(svc: Svc, team: Team) -> dict[str, Any]:
    reported = svc.store.model_statuses()
    out = []
    for name, e in sorted(catalog.CATALOG.items()):
        r = reported.get(name)
        out.append({
            "name": name,
            "kind": e.kind,
            "family": e.family,
            "conditioning": e.conditioning,
            "embedding_dim": e.embedding_dim,
            "tiny": e.tiny,
            "description": e.description,
            # None until a worker has checked the weights; then whether they are present and
            # match their pinned sha256.
            "available": None if r is None else bool(r["ok"]),
            "reason": None if r is None else r.get("reason"),
            "sha256": None if r is None else r.get("sha256"),
            "checked_by": None if r is None else r.get("worker"),
            "checked_at": None if r is None else r.get("at"),
        })
    return {"models": out}


# ---- the team's quotas and its API keys (app.api.limits, app.api.auth) --------------------------------

class NewKey(BaseModel):
    """Body of POST /v1/keys."""

    model_config = ConfigDict(extra="forbid")

    scopes: list[Literal["read", "submit", "admin"]] = Field(..., min_length=1)  # submit implies read
    name: str = Field("", max_length=KEY_NAME_MAX)  # what the key is for, shown in listings


@router.get("/v1/quota", summary="The team's quotas and rate limit, and what it uses of them")
def quota(svc: Svc, team: Team) -> dict[str, Any]:
    return limits.usage(svc.store, svc.settings, team)


@router.post("/v1/keys", status_code=201, summary="Make an API key for the caller's team (admin scope); "
             "the key is in this response only",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": NewKey.model_json_schema()}}}})
async def create_key(request: Request, admin: Admin) -> JSONResponse:
    body = await limits.read_body(request, 4096)
    try:
        new = NewKey.model_validate_json(body or b"{}")
    except ValidationError as e:
        errors = field_errors(e)
        raise InvalidRequest("; ".join(f"{x['field']}: {x['message']}" for x in errors),
                             errors=errors) from e
    try:
        key, rec = await run_in_threadpool(request.app.state.keyring.create, admin.team, new.scopes,
                                           new.name)
    except ValueError as e:
        raise InvalidRequest(str(e), errors=[{"field": "name", "message": str(e)}]) from e
    return JSONResponse({**rec.public(), "key": key}, status_code=201,
                        headers={"Cache-Control": "no-store"})


@router.get("/v1/keys", summary="The team's API keys, revoked ones included (admin scope)")
def list_keys(request: Request, admin: Admin) -> dict[str, Any]:
    return {"keys": [r.public() for r in request.app.state.keyring.records(admin.team)]}


@router.delete("/v1/keys/{key_id}", summary="Revoke one of the team's API keys (admin scope)")
def revoke_key(key_id: str, request: Request, admin: Admin) -> dict[str, Any]:
    rec = request.app.state.keyring.revoke(key_id, team=admin.team)
    if rec is None:
        raise NotFound(f"no key {key_id}")
    return rec.public()  # type: ignore[no-any-return]
