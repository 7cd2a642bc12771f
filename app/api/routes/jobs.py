"""Job routes: submit, read, list, cancel, events, artifacts. They parse the request and shape the
response; the logic they call is `app.api.jobs_service`."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from app.api import jobs_service
from app.api.deps import Services, Submitter, Svc, Team
from app.api.limits import read_body
from app.api.openapi import Artifacts, Estimate, Job, JobEvents, JobList, problems
from app.api.views import job_view
from app.errors import UnsupportedMediaType
from app.jobstore import (
    EVENT_CURSOR_MAX_LENGTH,
    EVENT_CURSOR_PATTERN,
    TERMINAL,
    UINT64,
    check_event_cursor,
)
from app.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Event cursors are checked by `check_event_cursor` (its message is readable; the pattern that
# says the same, for the OpenAPI document, is 900 characters long).
# Last-Event-ID: an event id as the stream sent it (or `-`); empty is the same as absent.
LAST_EVENT_ID_PATTERN = rf"^(?:-|{UINT64}-{UINT64})?$"


def _last_event_id(v: str) -> str:
    return check_event_cursor(v) if v else v

StatusFilter = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]


def _job_response(job: dict[str, Any], svc: Services, status_code: int = 200,
                  headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The job's view, with `extra` fields that are not None (`schedule`, `reused`)."""
    view = job_view(job, svc.settings.public_url.rstrip("/"))
    view.update({k: v for k, v in extra.items() if v is not None})
    h = dict(headers or {})
    if not view["terminal"]:
        h["Retry-After"] = str(svc.settings.poll_interval_s)
    return JSONResponse(view, status_code=status_code, headers=h)


def _created(job: dict[str, Any], svc: Services, replayed: bool) -> JSONResponse:
    """202 with the job's Location (and `Idempotent-Replayed` for a replay)."""
    headers = {"Location": f"{svc.settings.public_url.rstrip('/')}/v1/jobs/{job['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return _job_response(job, svc, 202, headers)


@router.post("", status_code=202, summary="Submit a dataset-generation job",
             responses={202: {"model": Job, "description": "The job, new or (same Idempotency-Key and body) "
                              "the earlier one", "headers": {"Location": {"schema": {"type": "string"}}}},
                        200: {"model": Estimate | Job, "description": "dry_run=true: the estimate, no job was "
                              "made; or reuse=if_identical: the team's earlier identical job (`reused`: "
                              "true), nothing rendered or counted"},
                        **problems(400, 409, 413, 415)},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": JobSpec.model_json_schema(
                     ref_template="#/components/schemas/{model}")}}}})
async def submit_job(request: Request, svc: Svc, team: Submitter,
                     idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
                     dry_run: Annotated[bool, Query(description="validate and estimate only: 200 with "
                                                    "images, stored bytes and GPU-seconds; no job")] = False,
                     ) -> JSONResponse:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"send the job spec as application/json, not {ctype}")
    body = await read_body(request, svc.settings.max_body_bytes)
    spec = jobs_service.parse_spec(body, svc, team)
    if dry_run:
        return JSONResponse(await run_in_threadpool(jobs_service.estimate, svc, team, spec))
    done = await run_in_threadpool(jobs_service.submit, svc, team, spec, idempotency_key)
    if done.reused:  # the team's earlier identical job: 200, it is not a new one
        location = f"{svc.settings.public_url.rstrip('/')}/v1/jobs/{done.job['id']}"
        return _job_response(done.job, svc, 200, {"Location": location}, reused=True)
    return _created(done.job, svc, done.replayed)


@router.get("", summary="The team's jobs, newest first", responses={200: {"model": JobList}, **problems(422)},
            openapi_extra={"parameters": [{
                "name": "metadata", "in": "query", "style": "deepObject", "explode": True,
                "schema": {"type": "object", "maxProperties": jobs_service.MAX_METADATA_FILTERS,
                           "propertyNames": {"maxLength": jobs_service.MAX_METADATA_KEY_CHARS},
                           "additionalProperties": {"type": "string",
                                                    "maxLength": jobs_service.MAX_METADATA_VALUE_CHARS}},
                "description": "jobs whose spec.metadata has these values: `metadata[commit]=abc123` "
                               "(several: all must match)"}]})
def list_jobs(request: Request, svc: Svc, team: Team, status: StatusFilter | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z0-9]+$")] = None,
              created_after: Annotated[str | None, Query(
                  max_length=64, json_schema_extra={"format": "date-time"},
                  description="jobs created at or after this time (RFC 3339, with its offset)")] = None,
              created_before: Annotated[str | None, Query(
                  max_length=64, json_schema_extra={"format": "date-time"},
                  description="jobs created before this time (RFC 3339, with its offset)")] = None,
              ) -> dict[str, Any]:
    metadata = jobs_service.metadata_filter(request.query_params.multi_items())
    jobs, nxt = svc.store.list_jobs(
        team, status=status, limit=limit, after=after, metadata=metadata,
        created_after=jobs_service.rfc3339("created_after", created_after),
        created_before=jobs_service.rfc3339("created_before", created_before))
    base = svc.settings.public_url.rstrip("/")
    return {"jobs": [job_view(j, base) for j in jobs], "has_more": nxt is not None, "next": nxt}


@router.get("/{job_id}", summary="A job: status, stage, progress, result or error",
            responses={200: {"model": Job, "headers": {"ETag": {"schema": {"type": "string"}}}},
                       304: {"description": "Not modified (If-None-Match matched the ETag)"}})
def get_job(job_id: str, request: Request, svc: Svc, team: Team) -> Response:
    job = jobs_service.owned(svc, team, job_id)
    resp = _job_response(job, svc, schedule=jobs_service.placement(svc, job))
    etag = '"' + hashlib.sha256(resp.body).hexdigest()[:32] + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    resp.headers["ETag"] = etag
    return resp


@router.post("/{job_id}/cancel", summary="Cancel a job (idempotent)",
             responses={200: {"model": Job, "description": "The job, ended"},
                        202: {"model": Job, "description": "The job, canceling until its workers stop"}})
def cancel_job(job_id: str, svc: Svc, team: Submitter) -> JSONResponse:
    job = jobs_service.cancel(svc, team, job_id)
    return _job_response(job, svc, 202 if job["status"] == "canceling" else 200)


@router.delete("/{job_id}", summary="Delete every stored object of a job (idempotent); the record stays",
               responses={200: {"model": Job, "description": "The job, its data deleted (`deleted_at`)"},
                          202: {"model": Job, "description": "The job, its data being deleted (canceled first "
                                "if it was live); poll until `deleted_at` is set"}})
def delete_job(job_id: str, svc: Svc, team: Submitter) -> JSONResponse:
    job = jobs_service.delete(svc, team, job_id)
    return _job_response(job, svc, 200 if job.get("deleted_at") else 202)


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
    jobs_service.owned(svc, team, job_id)
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
            responses={200: {"model": Artifacts}, **problems(409, 410, 422)})
def job_artifacts(job_id: str, svc: Svc, team: Team,
                  limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                  after: Annotated[str | None, Query(
                      max_length=256, description="the `next` of the previous page (an opaque cursor "
                      "into the job's Parquet index); anything else is a 422 naming `query.after`")] = None
                  ) -> dict[str, Any]:
    return jobs_service.artifacts(svc, team, job_id, limit=limit, after=after)
