"""Liveness, readiness, Prometheus metrics, the model registry and the team's quota (its API keys:
`app.api.routes.keys`)."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app import __version__, catalog, telemetry
from app.api import limits, metrics
from app.api.deps import Svc, Team
from app.api.openapi import Backlog, Health, ModelList, Readiness, problems
from app.errors import QueueUnavailable, ServiceError, Unauthorized

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
    _check_metrics_token(request, svc, "GET /metrics")
    queues = _queue_lengths(svc)
    try:
        backlog = svc.scheduler.backlog()
    except ServiceError as e:
        log.warning("metrics: the scheduler's backlog unavailable: %s", e.detail)
        backlog = None
    teams = {k.team for k in request.app.state.keyring.records()}  # revoked keys' teams too
    snap = telemetry.Telemetry(svc.store.r).snapshot(svc.store, teams, queues, backlog)
    return Response(metrics.render(snap), media_type=metrics.CONTENT_TYPE)


@router.get("/backlog", summary="GPU work waiting, for autoscalers (KEDA's metrics-api trigger)",
            responses={200: {"model": Backlog}, **problems(401, 503)})
def backlog(request: Request, svc: Svc) -> dict[str, Any]:
    """Shards the scheduler holds plus tasks in the `gpu` queue: the work that waits for a GPU.
    Guarded like /metrics (IDFORGE_METRICS_TOKEN)."""
    _check_metrics_token(request, svc, "GET /backlog")
    queues = _queue_lengths(svc)
    if queues is None:  # 503: no guess to scale on
        raise QueueUnavailable("the broker did not answer the queue-length query")
    b = svc.scheduler.backlog()
    return {"gpu": {"held": b.held_total, "queued": queues.get("gpu", 0),
                    "waiting": b.held_total + queues.get("gpu", 0), "in_flight": b.in_flight}}


def _check_metrics_token(request: Request, svc: Svc, what: str) -> None:
    token = svc.settings.metrics_token.get_secret_value()
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized(f"{what} needs 'Authorization: Bearer <IDFORGE_METRICS_TOKEN>'",
                               headers={"WWW-Authenticate": "Bearer"})


def _queue_lengths(svc: Svc) -> dict[str, int] | None:
    try:
        return svc.queue.queue_lengths()
    except Exception as e:  # noqa: BLE001 - kombu raises many types; the broker being down is a metric
        log.warning("metrics: queue lengths unavailable: %s", e)
        return None


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


# ---- the team's quotas (app.api.limits) --------------------------------------------------------

@router.get("/v1/quota", summary="The team's quotas and rate limit, and what it uses of them")
def quota(svc: Svc, team: Team) -> dict[str, Any]:
    return limits.usage(svc.store, svc.settings, team)
