"""The OpenAPI document: response models of the JSON routes, and the error responses every route
shares.

Routes return `JSONResponse`s built by `app.api.views` (no validation on the hot path); the models here
document those bodies (`responses={200: {"model": Job}}` on a route). `install(app)` then rewrites
the generated document so that it says what the service does:

- every error (status >= 400) is `application/problem+json` with the `Problem` schema, including
  FastAPI's request-validation 422 (the handler in app.api.problems renders it as a problem);
- operations that need an API key declare the bearer scheme and their 401, 403 (scope) and 429
  (rate limit or quota); operations with a path parameter their 404; operations that reach Redis
  their 503; a `default` response covers any other error;
- the job spec's nested models, inlined as `$defs` in POST /v1/jobs' body, move to
  `components/schemas` where its `$ref`s point.
"""

from __future__ import annotations

from typing import Any

import fastapi.routing
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import compile_path

PROBLEM_JSON = "application/problem+json"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the offending field, e.g. `sampler.iterations`")
    message: str
    type: str | None = Field(None, description="machine-readable error type")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="URI of the problem type; ends with `code`")
    title: str
    status: int
    code: str = Field(description="stable machine-readable error code")
    detail: str = Field(description="what went wrong, naming the field or setting at fault")
    instance: str | None = Field(None, description="the request path")
    errors: list[FieldError] | None = Field(None, description="one entry per invalid field")


class StageProgress(BaseModel):
    done: int
    total: int
    unit: str | None = Field(description="what the stage counts (optimiser steps, gallery images...)")


class Progress(BaseModel):
    identities_done: int
    identities_total: int
    images_done: int
    images_total: int
    stage: StageProgress


class JobLinks(BaseModel):
    self: str
    events: str
    artifacts: str
    cancel: str
    delete: str = Field(description="DELETE it to remove every stored object of the job (docs/lifecycle.md)")


class Estimate(BaseModel):
    dry_run: bool
    spec: dict[str, Any] = Field(description="the normalised spec the job would run")
    spec_hash: str
    priority: str = Field(description="what it would run at")
    priority_note: str | None
    shards: int = Field(description="render shards it would be cut into")
    estimate: dict[str, Any] = Field(description="images, stored_bytes, gpu_seconds, their breakdown and "
                                     "source (measured by the workers, or the documented default)")


class StageClock(BaseModel):
    queued_at: str | None = None
    started_at: str | None = None


class Placement(BaseModel):
    queue_position: int | None = Field(None, description="a queued job: tasks ahead of its first in "
                                       "the gpu queue (null: more than a thousand, or not queued)")
    priority: str | None = None
    shards_held: int | None = Field(None, description="render shards not yet released")
    shards_in_flight: int | None = Field(None, description="render shards released and not finished")
    shards_ahead: int | None = Field(None, description="other jobs' shards released before its next one "
                                     "(null: more than 2,000)")
    next_start_in_s: float | None = Field(None, description="estimated seconds until its next shard starts")


class Job(BaseModel):
    """A job as the API shows it."""

    id: str
    status: str = Field(description="queued, running, canceling, succeeded, failed or canceled")
    stage: str | None = Field(description="sampling_identities, sampling_variations, rendering, evaluating "
                                          "or packaging, while running")
    progress: Progress
    created_at: str
    updated_at: str
    timestamps: dict[str, str] = Field(description="status -> when the job entered it")
    terminal: bool = Field(description="the status will not change again")
    spec: dict[str, Any] = Field(description="the normalised job spec: every default filled in")
    spec_hash: str
    result: dict[str, Any] | None = Field(description="once succeeded: manifest key, counts, quality summary")
    error: dict[str, Any] | None = Field(description="once failed: code, message and the stage")
    priority: str | None = Field(description="interactive or batch: what the job runs at (docs/scheduling.md)")
    priority_note: str | None = Field(description="why it runs at another priority than it asked for")
    stages: dict[str, StageClock] = Field(
        description="per stage: when its work was queued (or its shards held) and when a worker started it")
    schedule: Placement | None = Field(
        None, description="GET of one live job only: where it stands (queue position or its shards' place)")
    retention_days: float | None = Field(
        description="days its data is kept after the job ends (its own, else its team's default); null = "
        "until deleted")
    expires_at: str | None = Field(description="when its data is deleted (set when the job ends, with a retention)")
    deletion_requested_at: str | None = Field(
        description="when its deletion was requested (DELETE, or expiry); its artifacts are 410 Gone from then")
    deleted_at: str | None = Field(description="when every stored object of the job was gone; the record stays")
    reused: bool | None = Field(
        None, description="POST with reuse=if_identical only: true when this is an earlier identical job of the "
        "team, answered instead of a new render (200; nothing counted)")
    links: JobLinks


class JobList(BaseModel):
    jobs: list[Job]
    has_more: bool
    next: str | None = Field(description="pass as `after` for the next page")


class JobEvents(BaseModel):
    events: list[dict[str, str]] = Field(description="each with id, type, at and the event's fields")
    next: str = Field(description="pass as `after` to read on from here")


class Artifacts(BaseModel):
    job_id: str
    expires_in: int = Field(description="seconds the URLs stay valid")
    manifest_url: str
    manifest: dict[str, Any]
    files: list[dict[str, Any]] = Field(
        description="a page of the images, from the Parquet index in (identity, sample) order: name, path "
        "(null without imagefolder), tar + member + tar_offset and/or record_id + record_offset, identity, label "
        "(output.label_offset + identity), sample, seed, size, sha256, flags, url (the loose file, else its tar or train.rec; `range`: the "
        "image's bytes in its tar)")
    has_more: bool
    next: str | None = Field(description="cursor of the next page (pass it as `after`); null on the last")
    objects: list[dict[str, Any]] = Field(description="tars, RecordIO, the Parquet index, identities")
    report: dict[str, Any] | None = Field(description="html, json and plots URLs of the quality report")


class ModelInfo(BaseModel):
    name: str
    kind: str
    family: str
    conditioning: str | None
    embedding_dim: int | None
    tiny: bool
    description: str
    available: bool | None = Field(description="None until a worker has checked the weights")
    reason: str | None
    sha256: dict[str, str] | None
    checked_by: str | None
    checked_at: str | None


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str
    version: str


class GpuBacklog(BaseModel):
    held: int = Field(description="render shards the scheduler holds (not yet released)")
    queued: int = Field(description="tasks in the broker's gpu queue")
    waiting: int = Field(description="held + queued: the work that waits for a GPU")
    in_flight: int = Field(description="render shards released and not finished")


class Backlog(BaseModel):
    gpu: GpuBacklog


class Readiness(BaseModel):
    status: str = Field(description="ready or unavailable")
    checks: dict[str, str] = Field(description="backend -> 'ok' or what is wrong")


ERRORS = {
    400: "Bad request: the body is not JSON",
    401: "Missing, unknown or revoked API key",
    403: "The API key lacks the scope this operation needs, or the job is larger than the team's quota",
    404: "No such resource for this team",
    409: "Conflict with the resource's state",
    410: "The job's data was deleted (on request or by its retention); its record stays",
    413: "The request body is over the size limit",
    415: "Unsupported media type",
    422: "Invalid request: a parameter or the body does not validate; `errors` names each field",
    429: "Over the API key's rate limit or the team's quota; see Retry-After",
    503: "A backend (Redis, storage or the broker) is unavailable; retry later",
}


def problem(status: int | str, description: str | None = None) -> dict[str, Any]:
    """An OpenAPI response object for an error rendered as problem+json."""
    if description is None:
        description = "Any other error, as RFC 9457 problem details" if status == "default" \
            else ERRORS.get(int(status), "An error")
    return {"description": description, "content": {PROBLEM_JSON: {"schema": dict(PROBLEM_REF)}}}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for a route's own error codes (those not every route shares)."""
    return {c: problem(c) for c in codes}


def _uses(dependant: Any, calls: set[Any]) -> bool:
    return any(d.call in calls or _uses(d, calls) for d in dependant.dependencies)


def _needs_key(route: APIRoute) -> bool:
    from app.api.deps import current_principal

    return _uses(route.dependant, {current_principal})


def _needs_store(route: APIRoute) -> bool:
    from app.api.deps import services

    return _uses(route.dependant, {services})


def _api_routes(app: FastAPI) -> list[tuple[APIRoute, str, set[str]]]:
    """(route, its full path with converters, its methods) for every API route, routers' prefixes
    applied."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:  # older FastAPI copies included routes into app.routes, prefixed
        return [(r, r.path, set(r.methods or ())) for r in app.routes if isinstance(r, APIRoute)]
    return [(c.original_route, c.path, set(c.methods or ())) for c in contexts(app.routes)
            if isinstance(c.original_route, APIRoute)]


def allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method some API route serves at `path`."""
    return {m for _, template, methods in _api_routes(app) if compile_path(template)[0].match(path)
            for m in methods}


class AllowHeader:
    """ASGI middleware: a 405's Allow header lists every method the path supports, as RFC 9110 asks
    and the document says (Starlette names only those of the first route matching the path)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_allowed(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = allowed_methods(scope["app"], scope["path"])
                if methods:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                    message = {**message, "headers": [*headers, (b"allow", ", ".join(sorted(methods)).encode())]}
            await send(message)

        await self.app(scope, receive, send_allowed)


def _fix_errors(op: dict[str, Any]) -> None:
    """Errors are problems: replace FastAPI's placeholder content (and its 422 model)."""
    for code, resp in op["responses"].items():
        if code == "default" or int(code) < 400:
            continue
        content = resp.get("content") or {}
        schemas = [c.get("schema") for c in content.values()]
        placeholder = not content or all(
            not s or s.get("$ref", "").endswith("/HTTPValidationError") for s in schemas)
        if placeholder:
            resp["content"] = problem(int(code))["content"]
            if resp.get("description") in (None, "", "Validation Error", "Unsuccessful Response"):
                resp["description"] = ERRORS.get(int(code), "An error")


def _document(doc: dict[str, Any], app: FastAPI) -> None:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schemas["Problem"].pop("$defs", {}))
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    routes = {(m.lower(), path): r for r, path, methods in _api_routes(app) for m in methods}
    keyed = False
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            route = routes.get((method, path))
            responses = op.setdefault("responses", {})
            if route is not None and _needs_key(route):
                keyed = True
                op.setdefault("security", [{"bearer": []}])
                for code in (401, 403, 429):
                    responses.setdefault(str(code), problem(code))
            if "{" in path:
                responses.setdefault("404", problem(404))
            if route is not None and _needs_store(route):
                responses.setdefault("503", problem(503))
            responses.setdefault("default", problem("default"))
            _fix_errors(op)
            for content in op.get("requestBody", {}).get("content", {}).values():
                schemas.update(content.get("schema", {}).pop("$defs", {}))
    _link_jobs(doc)
    if keyed:
        doc["components"].setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer <key>`"}


def _link_jobs(doc: dict[str, Any]) -> None:
    """OpenAPI links from a submitted job to what can be done with it (clients and stateful tests
    follow them)."""
    paths = doc.get("paths", {})
    created = paths.get("/v1/jobs", {}).get("post", {}).get("responses", {}).get("202")
    if created is None:
        return
    for name, path, method in (("GetJob", "/v1/jobs/{job_id}", "get"),
                               ("CancelJob", "/v1/jobs/{job_id}/cancel", "post"),
                               ("JobEvents", "/v1/jobs/{job_id}/events", "get"),
                               ("JobArtifacts", "/v1/jobs/{job_id}/artifacts", "get")):
        op = paths.get(path, {}).get(method)
        if op is not None and "operationId" in op:
            created.setdefault("links", {})[name] = {
                "operationId": op["operationId"], "parameters": {"job_id": "$response.body#/id"}}


def install(app: FastAPI) -> None:
    """Generate `app`'s OpenAPI document once, as FastAPI does, then complete it (see the module)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            _document(doc, app)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
