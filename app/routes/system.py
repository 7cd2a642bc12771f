"""Liveness, readiness and the model registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app import __version__, catalog
from app.deps import Svc, Team
from app.errors import ServiceError

router = APIRouter(tags=["system"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/readyz", summary="Readiness: Redis, storage and the broker answer")
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


@router.get("/v1/models", summary="The model registry and what workers report about it")
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
