"""Translate errors into RFC 9457 problem+json responses at the HTTP boundary."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import PROBLEM_BASE, ServiceError

log = logging.getLogger("idforge.api")
PROBLEM_JSON = "application/problem+json"


def problem_response(err: ServiceError, request: Request | None = None) -> JSONResponse:
    body = err.problem(instance=str(request.url.path) if request else None)
    return JSONResponse(body, status_code=err.status, headers=err.headers, media_type=PROBLEM_JSON)


def field_errors(exc: ValidationError | RequestValidationError, *, strip: int = 0) -> list[dict[str, Any]]:
    """pydantic errors as [{field: 'sampler.method', message, type}]; `strip` drops loc prefixes
    such as ('body',) or ('query',)."""
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"][strip:]]
        # Discriminated unions add the tag to the path ("sampler.hyperface.iterations"): drop it.
        out.append({"field": ".".join(loc) or "(body)", "message": e["msg"], "type": e["type"]})
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("service error on %s: %s", request.url.path, exc.detail)
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc)
        body = {
            "type": PROBLEM_BASE + "invalid_request",
            "title": "Invalid request",
            "status": 422,
            "code": "invalid_request",
            "detail": "; ".join(f"{e['field']}: {e['message']}" for e in errors),
            "instance": request.url.path,
            "errors": errors,
        }
        return JSONResponse(body, status_code=422, media_type=PROBLEM_JSON)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {
            "type": PROBLEM_BASE + code,
            "title": str(exc.detail),
            "status": exc.status_code,
            "code": code,
            "detail": str(exc.detail),
            "instance": request.url.path,
        }
        return JSONResponse(body, status_code=exc.status_code, media_type=PROBLEM_JSON,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        body = {
            "type": PROBLEM_BASE + "internal",
            "title": "Internal error",
            "status": 500,
            "code": "internal",
            "detail": "an unexpected error occurred; it has been logged",
            "instance": request.url.path,
        }
        return JSONResponse(body, status_code=500, media_type=PROBLEM_JSON)
