"""Job routes: submit, read, list, cancel, events, artifacts."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import Services, Submitter, Svc, Team
from app.api.limits import create_job, read_body, refund
from app.api.openapi import Artifacts, Job, JobEvents, JobList, problems
from app.api.problems import field_errors
from app.api.views import job_view
from app.errors import (
    BadRequest,
    Conflict,
    InvalidSpec,
    NotFound,
    ServiceError,
    UnsupportedMediaType,
)
from app.jobstore import (
    EVENT_CURSOR_MAX_LENGTH,
    EVENT_CURSOR_PATTERN,
    TERMINAL,
    UINT64,
    check_event_cursor,
)
from app.layout import JobKeys
from app.queue import SAMPLE_IDENTITIES
from app.spec import JobSpec, SpecError, check_available, check_limits, check_models
from app.webhooks import check_spec_webhook, notify

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Event cursors are checked by `check_event_cursor` (its message is readable; the pattern that
# says the same, for the OpenAPI document, is 900 characters long).
# Last-Event-ID: an event id as the stream sent it (or `-`); empty is the same as absent.
LAST_EVENT_ID_PATTERN = rf"^(?:-|{UINT64}-{UINT64})?$"


def _last_event_id(v: str) -> str:
    return check_event_cursor(v) if v else v

StatusFilter = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]


def _integral_as_int(v: Any) -> Any:
    """JSON numbers as JSON Schema reads them: 2.0 is the integer 2."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _integral_as_int(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_integral_as_int(x) for x in v]
    return v


def _lone_surrogate(v: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path to the first string (or object key) holding a lone UTF-16 surrogate (JSON's
    `"\\ud800"` escape parses to one; it is not a Unicode character and cannot be written back as
    UTF-8), or None."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(v, dict):
        for k, x in v.items():
            here = (*path, k)
            if (got := _lone_surrogate(k, here)) is not None or (got := _lone_surrogate(x, here)) is not None:
                return got
    elif isinstance(v, list):
        for i, x in enumerate(v):
            if (got := _lone_surrogate(x, (*path, str(i)))) is not None:
                return got
    return None


MAX_JSON_DEPTH = 32  # a job spec nests 4 levels; deeper bodies are refused before anything walks them


def _too_deep(v: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest more than `limit` levels (iteratively: no recursion)."""
    stack = [(v, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > limit:
                return True
            stack.extend((y, depth + 1) for y in (x.values() if isinstance(x, dict) else x))
    return False


def parse_spec(body: bytes, svc: Services) -> JobSpec:
    """Bytes -> a spec that can run, or a 4xx naming the field."""
    too_deep = BadRequest(f"request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels",
                          code="malformed_json")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}", code="malformed_json") from e
    except RecursionError as e:  # the parser's own limit, far below the body size limit
        raise too_deep from e
    if _too_deep(data):
        raise too_deep
    if not isinstance(data, dict):
        raise InvalidSpec("the job spec must be a JSON object",
                          errors=[{"field": "(body)", "message": "expected an object"}])
    bad = _lone_surrogate(data)
    if bad is not None:  # refused before it is stored: the job could never be shown again
        field = ".".join(p.encode("utf-8", "backslashreplace").decode() for p in bad) or "(body)"
        message = "a string holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape that is not " \
                  "half of a pair), which is not a Unicode character"
        raise InvalidSpec(f"{field}: {message}", errors=[{"field": field, "message": message,
                                                          "type": "invalid_unicode"}])
    try:
        # Strict: a value of the wrong JSON type ("5", true for a number) is refused, not coerced.
        spec = JobSpec.model_validate(_integral_as_int(data), strict=True)
    except ValidationError as e:
        errors = field_errors(e)
        raise InvalidSpec("; ".join(f"{x['field']}: {x['message']}" for x in errors),
                          errors=errors) from e
    s = svc.settings
    try:
        check_models(spec)
        check_limits(spec, max_identities=s.max_identities,
                     max_images_per_identity=s.max_images_per_identity,
                     max_total_images=s.max_total_images)
        check_available(spec, svc.store.model_statuses())
        check_spec_webhook(spec, allow_private=s.webhook_allow_private)
    except SpecError as e:
        raise InvalidSpec(f"{e.field}: {e.message}", code=e.code,
                          errors=[{"field": e.field, "message": e.message, "type": e.code}]) from e
    return spec


def _job_response(job: dict[str, Any], svc: Services, status_code: int = 200,
                  headers: dict[str, str] | None = None) -> JSONResponse:
    view = job_view(job, svc.settings.public_url.rstrip("/"))
    h = dict(headers or {})
    if not view["terminal"]:
        h["Retry-After"] = str(svc.settings.poll_interval_s)
    return JSONResponse(view, status_code=status_code, headers=h)


def _owned(svc: Services, team: str, job_id: str) -> dict[str, Any]:
    job = svc.store.read(job_id) if job_id.isalnum() else None
    if job is None or job["owner"] != team:  # another team's job does not exist for you
        raise NotFound(f"no job {job_id}")
    return job


def _submit(svc: Services, team: str, spec: JobSpec, idem_key: str | None) -> JSONResponse:
    normalized = spec.normalized()
    h = spec.spec_hash()
    admitted = create_job(svc.store, svc.settings, team, normalized, h, identities=spec.identities,
                          images=spec.identities * spec.images_per_identity,
                          idempotency_key=idem_key, body_hash=h)  # 429/403 over the team's quotas
    made = admitted.made
    if not made.created:
        if made.body_hash != h:
            raise InvalidSpec("this Idempotency-Key was used with a different body",
                              code="idempotency_key_reused",
                              errors=[{"field": "Idempotency-Key", "message": "reused with a "
                                       "different body", "type": "idempotency_key_reused"}])
        if made.pending:
            raise Conflict("a request with this Idempotency-Key is still being processed",
                           code="idempotency_key_in_flight", headers={"Retry-After": "1"})
        job = svc.store.get(made.job_id)
        if job is None:
            raise Conflict("the job of this Idempotency-Key no longer exists")
        loc = f"{svc.settings.public_url.rstrip('/')}/v1/jobs/{made.job_id}"
        return _job_response(job, svc, 202, {"Location": loc, "Idempotent-Replayed": "true"})
    try:
        svc.queue.send(SAMPLE_IDENTITIES, made.job_id)
    except ServiceError as e:
        svc.store.transition(made.job_id, "failed",
                             error={"code": e.code, "message": f"could not enqueue: {e.detail}"})
        if idem_key:
            svc.store.forget_idempotency(team, idem_key)
        refund(svc.store, team, admitted)
        raise
    if idem_key:
        svc.store.confirm_idempotency(team, idem_key, made.job_id, h)
    job = svc.store.get(made.job_id)
    assert job is not None
    loc = f"{svc.settings.public_url.rstrip('/')}/v1/jobs/{made.job_id}"
    return _job_response(job, svc, 202, {"Location": loc})


@router.post("", status_code=202, summary="Submit a dataset-generation job",
             responses={202: {"model": Job, "description": "The job, new or (same Idempotency-Key and body) "
                              "the earlier one", "headers": {"Location": {"schema": {"type": "string"}}}},
                        **problems(400, 409, 413, 415)},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": JobSpec.model_json_schema(
                     ref_template="#/components/schemas/{model}")}}}})
async def submit_job(request: Request, svc: Svc, team: Submitter,
                     idempotency_key: Annotated[str | None, Header(max_length=255)] = None
                     ) -> JSONResponse:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"send the job spec as application/json, not {ctype}")
    body = await read_body(request, svc.settings.max_body_bytes)
    spec = parse_spec(body, svc)
    return await run_in_threadpool(_submit, svc, team, spec, idempotency_key)


@router.get("", summary="The team's jobs, newest first", responses={200: {"model": JobList}})
def list_jobs(svc: Svc, team: Team, status: StatusFilter | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z0-9]+$")] = None
              ) -> dict[str, Any]:
    jobs, nxt = svc.store.list_jobs(team, status=status, limit=limit, after=after)
    base = svc.settings.public_url.rstrip("/")
    return {"jobs": [job_view(j, base) for j in jobs], "has_more": nxt is not None, "next": nxt}


@router.get("/{job_id}", summary="A job: status, stage, progress, result or error",
            responses={200: {"model": Job, "headers": {"ETag": {"schema": {"type": "string"}}}},
                       304: {"description": "Not modified (If-None-Match matched the ETag)"}})
def get_job(job_id: str, request: Request, svc: Svc, team: Team) -> Response:
    job = _owned(svc, team, job_id)
    resp = _job_response(job, svc)
    etag = '"' + hashlib.sha256(resp.body).hexdigest()[:32] + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    resp.headers["ETag"] = etag
    return resp


@router.post("/{job_id}/cancel", summary="Cancel a job (idempotent)",
             responses={200: {"model": Job, "description": "The job, ended"},
                        202: {"model": Job, "description": "The job, canceling until its workers stop"}})
def cancel_job(job_id: str, svc: Svc, team: Submitter) -> JSONResponse:
    _owned(svc, team, job_id)
    if svc.store.request_cancel(job_id) == "canceled":  # a queued job: no worker will see it
        notify(svc.store, svc.queue, job_id, "canceled", {"status": "canceled"})  # at most once
    job = svc.store.get(job_id)
    assert job is not None
    return _job_response(job, svc, 202 if job["status"] == "canceling" else 200)


@router.get("/{job_id}/events", summary="The job's event log; text/event-stream when asked",
            responses={200: {"model": JobEvents, "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
def job_events(job_id: str, request: Request, svc: Svc, team: Team,
               after: Annotated[str, Query(
                   max_length=EVENT_CURSOR_MAX_LENGTH,
                   json_schema_extra={"pattern": EVENT_CURSOR_PATTERN},
                   description="Events after this one: `-` (from the first) or an event id "
                               "`<ms>-<seq>` (each a decimal number below 2**64, no leading "
                               "zeros); `next` of the previous page"),
                   AfterValidator(check_event_cursor)] = "-",
               limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
               last_event_id: Annotated[str, Header(
                   max_length=EVENT_CURSOR_MAX_LENGTH,
                   json_schema_extra={"pattern": LAST_EVENT_ID_PATTERN},
                   description="text/event-stream: resume after this event id (what an "
                               "EventSource sends when it reconnects); takes the place of `after`. "
                               "Empty is the same as absent"),
                   AfterValidator(_last_event_id)] = "") -> Response:
    _owned(svc, team, job_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        events = svc.store.events(job_id, after=after, limit=limit)
        return JSONResponse({"events": events, "next": events[-1]["id"] if events else after})
    last = last_event_id or after
    return StreamingResponse(_sse(svc, job_id, last), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _sse(svc: Services, job_id: str, after: str, max_s: float = 3600) -> Iterator[str]:
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        events = svc.store.events(job_id, after=after, block_ms=1000)
        for e in events:
            after = e["id"]
            yield f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n"
        if not events:
            if svc.store.status(job_id) in TERMINAL:
                return
            yield ": keep-alive\n\n"


@router.get("/{job_id}/artifacts", summary="The manifest, with presigned download URLs",
            responses={200: {"model": Artifacts}, **problems(409)})
def job_artifacts(job_id: str, svc: Svc, team: Team,
                  limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                  after: Annotated[str | None, Query(max_length=256)] = None) -> dict[str, Any]:
    job = _owned(svc, team, job_id)
    if job["status"] != "succeeded":
        raise Conflict(f"job {job_id} is {job['status']}; artifacts exist once it has succeeded",
                       code="job_not_succeeded")
    keys = JobKeys.for_job(svc.settings.s3_prefix, job_id)
    manifest = json.loads(svc.storage.get_bytes(keys.manifest))
    ttl = svc.settings.presign_expiry_s
    files = manifest.get("files", [])
    start = 0
    if after is not None:
        start = next((i + 1 for i, f in enumerate(files) if f["path"] == after), len(files))
    page = files[start:start + limit]
    more = start + limit < len(files)
    return {
        "job_id": job_id,
        "expires_in": ttl,
        "manifest_url": svc.storage.presign_get(keys.manifest, ttl),
        "manifest": {k: v for k, v in manifest.items() if k != "files"},
        "files": [{**f, "url": svc.storage.presign_get(keys.key(f["path"]), ttl)}
                  for f in page],
        "has_more": more,
        "next": page[-1]["path"] if more and page else None,
        # The dataset's other objects: WebDataset tars, RecordIO files, the Parquet index, identities.
        "objects": [{"path": path, **meta, "url": svc.storage.presign_get(keys.key(path), ttl)}
                    for path, meta in sorted(manifest.get("outputs", {}).items())],
        "report": _report_urls(svc, keys, ttl),
    }


def _report_urls(svc: Services, keys: JobKeys, ttl: int) -> dict[str, Any] | None:
    """Presigned URLs of the quality report's objects that exist (`report/report.html`,
    `report/report.json`, `report/plots/*`), or None when the job has no report."""
    names = {keys.relative(k).removeprefix("report/") for k in svc.storage.list_keys(keys.report())}
    if not names & {"report.html", "report.json"}:
        return None

    def url(name: str) -> str | None:
        return svc.storage.presign_get(keys.report(name), ttl) if name in names else None

    plots = sorted(n for n in names if n.startswith("plots/") and n.count("/") == 1)
    return {"html": url("report.html"), "json": url("report.json"),
            "plots": {n.removeprefix("plots/"): url(n) for n in plots}}
