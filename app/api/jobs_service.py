"""The logic the job routes call: parse a spec, submit a job (quota, idempotency, enqueue and its
compensation), find a team's job, cancel it, list its artifacts.

Functions here return plain data or raise `app.errors` ServiceErrors; the routes
(`app.api.routes.jobs`) build the responses and their headers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from app import dataset_index, estimates, extension, layout, preview
from app.api.deps import Services
from app.api.limits import admit
from app.api.problems import field_errors
from app.errors import BadRequest, Conflict, Gone, InvalidRequest, InvalidSpec, NotFound, ServiceError
from app.jobstore import TERMINAL
from app.layout import JobKeys
from app.queue import DELETE_JOB, FINISH_CANCEL, SAMPLE_IDENTITIES
from app.spec import (
    JOB_ID_PATTERN,
    JobSpec,
    SpecError,
    check_available,
    check_limits,
    check_models,
    current_defaults,
    spec_hash,
)
from app.webhooks import check_spec_webhook, notify

log = logging.getLogger("idforge.api")

# ---- the job spec: request bytes -> a spec that can run -------------------------------------------


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


def parse_spec(body: bytes, svc: Services, team: str) -> JobSpec:
    """Bytes -> a spec that can run, or a 4xx naming the field. A spec that `extends` one of the
    team's jobs is resolved against it first (`app.extension`)."""
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
    previewed = None
    if data.get("from_preview") is not None:  # the preview's spec, resolved (it has any extends in it)
        previewed = _preview_of(svc, team, data["from_preview"])
        data = preview.resolve(data, previewed)
    elif data.get("extends") is not None:
        data = _extended(svc, team, data)
    try:
        # Strict: a value of the wrong JSON type ("5", true for a number) is refused, not coerced.
        spec = JobSpec.model_validate(_integral_as_int(data), strict=True)
    except ValidationError as e:
        errors = field_errors(e)
        raise InvalidSpec("; ".join(f"{x['field']}: {x['message']}" for x in errors),
                          errors=errors) from e
    spec = current_defaults(spec)
    if previewed is not None:
        try:
            preview.check_same_data(spec.normalized(), previewed)
        except preview.PreviewError as e:
            raise _invalid_preview(e.field, e.message) from e
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


def _invalid_preview(field: str, why: str) -> InvalidSpec:
    return InvalidSpec(f"{field}: {why}", code="invalid_preview",
                       errors=[{"field": field, "message": why, "type": "invalid_preview"}])


def _invalid_extension(field: str, why: str) -> InvalidSpec:
    return InvalidSpec(f"{field}: {why}", code="invalid_extension",
                       errors=[{"field": field, "message": why, "type": "invalid_extension"}])


def _succeeded_job(svc: Services, team: str, job_id: Any, field: str,
                   refuse: Callable[[str, str], InvalidSpec]) -> dict[str, Any]:
    """The record of `job_id`, one of the team's succeeded jobs whose data is there; else
    `refuse(field, why)` is raised."""
    if not isinstance(job_id, str) or not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise refuse(field, f"expected a job id (j and 22 hex digits), got {job_id!r}")
    job = svc.store.get(job_id)
    if job is None or job["owner"] != team:
        raise refuse(field, f"no job {job_id} of your team")
    if job.get("deletion_requested_at"):
        raise refuse(field, f"job {job_id} was deleted")
    if job["status"] != "succeeded":
        raise refuse(field, f"job {job_id} is {job['status']}; only a succeeded job can be used here")
    return job


def _preview_of(svc: Services, team: str, given: Any) -> dict[str, Any]:
    """The job record `from_preview` names (its id, or an object with `job`): one of the team's
    succeeded previews whose data is there; else a 422 naming `from_preview`."""
    job_id = given.get("job") if isinstance(given, dict) else given
    job = _succeeded_job(svc, team, job_id, "from_preview", _invalid_preview)
    if not (job.get("spec") or {}).get("preview"):
        raise _invalid_preview("from_preview", f"job {job_id} is not a preview (its spec has no `preview`)")
    return job


def _extended(svc: Services, team: str, data: dict[str, Any]) -> dict[str, Any]:
    """The request resolved against the job it `extends` (`app.extension.resolve`), or a 422 naming
    `extends` when that is not one of the team's succeeded jobs with its data."""
    job = _succeeded_job(svc, team, data["extends"], "extends", _invalid_extension)
    if (job.get("spec") or {}).get("preview"):
        raise _invalid_extension("extends", f"job {job['id']} is a preview (it rendered "
                                 f"{job['spec']['preview']['identities']} of its identities); extend the job "
                                 "made from it (from_preview)")
    try:
        return extension.resolve(data, job)
    except extension.ExtensionError as e:
        raise _invalid_extension(e.field, e.message) from e


# ---- submit, find, cancel -------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    """What `submit` did: the job record, and whether it is an Idempotency-Key replay (the earlier
    request's job, counted nothing, enqueued nothing) or a reuse (an earlier identical job of the
    team, answered instead of a new render: counted nothing, enqueued nothing)."""

    job: dict[str, Any]
    replayed: bool
    reused: bool = False


def body_hash(spec: JobSpec) -> str:
    """What an Idempotency-Key compares: the normalised spec and the fields that are not part of
    the spec's hash because they change no byte of the data (priority, retention, reuse)."""
    h = spec.spec_hash()
    extra = {k: v for k, v in (("priority", spec.priority), ("retention_days", spec.retention_days),
                               ("reuse", None if spec.reuse == "never" else spec.reuse)) if v is not None}
    return spec_hash({"spec": h, **extra}) if extra else h


def check_exclusions(svc: Services, team: str, spec: JobSpec) -> None:
    """The jobs `sampler.exclude` names: each the team's own, succeeded, not deleted, with the same
    generator and embedder (their identities live in this job's space); else a 422 naming the
    entry. Reference-set names are the workers' to check (they hold the files)."""
    for k, name in enumerate(spec.sampler.exclude):
        if not re.fullmatch(JOB_ID_PATTERN, name):
            continue
        field = f"sampler.exclude.{k}"
        job = svc.store.get(name)
        why = None
        if job is None or job["owner"] != team:
            why = f"no job {name} of your team"
        elif job.get("deletion_requested_at"):
            why = f"job {name} was deleted"
        elif job["status"] != "succeeded":
            why = f"job {name} is {job['status']}; only a succeeded job's identities can be excluded"
        else:
            theirs = job["spec"].get("models") or {}
            if (theirs.get("generator"), theirs.get("embedder")) != (spec.models.generator, spec.models.embedder):
                why = (f"job {name}'s identities are {theirs.get('generator')} / {theirs.get('embedder')} "
                       f"ones; this job's are {spec.models.generator} / {spec.models.embedder}")
        if why:
            raise InvalidSpec(f"{field}: {why}", code="invalid_exclusion",
                              errors=[{"field": field, "message": why, "type": "invalid_exclusion"}])


def priority_for(svc: Services, team: str, spec: JobSpec) -> tuple[str, str | None]:
    """The priority the job runs at, and why it differs from what it asked for (None when not):
    the spec's, else the team's default; `interactive` past the team's interactive cap runs as
    `batch` (the cap counts the images of the team's live interactive jobs, this one included)."""
    asked = spec.priority or svc.settings.team_priority(team)
    cap = svc.settings.interactive_cap(team)
    if asked != "interactive" or not cap:
        return asked, None
    images = spec.images_to_render
    held = svc.store.interactive_images(team)
    if held + images <= cap:
        return asked, None
    return "batch", (f"runs as batch: the team's interactive jobs would hold {held + images:,} images, "
                     f"over its cap of {cap:,} (IDFORGE_MAX_INTERACTIVE_IMAGES or its "
                     "IDFORGE_TEAM_SCHEDULING entry)")


def estimate(svc: Services, team: str, spec: JobSpec) -> dict[str, Any]:
    """A dry run: the normalised spec, the priority it would run at and what it would cost, from
    the workers' throughput table (`app.estimates`). Creates nothing and counts against no quota."""
    check_exclusions(svc, team, spec)
    priority, note = priority_for(svc, team, spec)
    return {"dry_run": True, "spec": spec.normalized(), "spec_hash": spec.spec_hash(),
            "priority": priority, "priority_note": note,
            "shards": len(spec.shard_plan(svc.settings.shard_identities)),
            "estimate": estimates.estimate(spec, estimates.Throughput(svc.store.r).table())}


def submit(svc: Services, team: str, spec: JobSpec, idem_key: str | None) -> Submitted:
    """Create the job within the team's quotas (429/403 over them), answer an Idempotency-Key
    replay, enqueue the job's first task. When the enqueue fails the job is failed, the
    Idempotency-Key forgotten and the images given back, and the enqueue's error is raised."""
    check_exclusions(svc, team, spec)
    normalized = spec.normalized()
    h, body, dataset = spec.spec_hash(), body_hash(spec), spec.dataset_hash()
    not_reused = None
    if spec.reuse == "if_identical":
        earlier, not_reused = reusable(svc, team, spec, dataset)
        if earlier is not None:
            return Submitted(earlier, replayed=False, reused=True)
    admitted = admit(svc.store, svc.settings, team, normalized, h, identities=spec.identities,
                     images=spec.images_to_render,
                     idempotency_key=idem_key, body_hash=body,  # 429/403 over the team's quotas
                     retention_s=svc.settings.retention_s(team, spec.retention_days), dataset_hash=dataset)
    made = admitted.made
    if not made.created:
        if made.body_hash != body:
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
        return Submitted(job, replayed=True)
    priority, note = priority_for(svc, team, spec)
    svc.store.set_priority(made.job_id, priority, spec.priority, note)
    if note:
        svc.store.add_event(made.job_id, "priority", priority=priority, note=note)
    if not_reused:
        svc.store.add_event(made.job_id, "reuse", reused=False, note=not_reused)
    svc.store.stage_queued(made.job_id, "sampling_identities")
    try:
        svc.queue.send(SAMPLE_IDENTITIES, made.job_id)
    except ServiceError as e:
        svc.store.transition(made.job_id, "failed",
                             error={"code": e.code, "message": f"could not enqueue: {e.detail}"})
        if idem_key:
            svc.store.forget_idempotency(team, idem_key)
        if admitted.images:  # the images of a job that was not enqueued after all
            svc.store.refund_images(team, admitted.images, admitted.day)
        raise
    if idem_key:
        svc.store.confirm_idempotency(team, idem_key, made.job_id, body)
    job = svc.store.get(made.job_id)
    assert job is not None
    return Submitted(job, replayed=False)


def reusable(svc: Services, team: str, spec: JobSpec, dataset: str) -> tuple[dict[str, Any] | None, str | None]:
    """The team's latest succeeded job with the same dataset (`JobSpec.dataset_hash`), when its data
    is all still there and it would come out the same today: its manifest exists, no deletion was
    asked for, and its models' weight pins and shard plan are today's. Else (None, why not) — the
    reason goes into the new job's events; (None, None) when the team has no such job."""
    job_id = svc.lifecycle.reusable(team, dataset)
    job = svc.store.get(job_id) if job_id else None
    if job is None or job["owner"] != team or job["status"] != "succeeded":
        return None, None
    if job.get("deletion_requested_at"):
        return None, f"job {job_id} has the same dataset, but its deletion was requested"
    try:
        manifest = json.loads(svc.storage.get_bytes(JobKeys.for_job(svc.settings.s3_prefix, job["id"]).manifest))
    except (ServiceError, ValueError) as e:
        return None, f"job {job_id} has the same dataset, but its manifest cannot be read: {e}"
    statuses = svc.store.model_statuses()
    for role, pinned in sorted((manifest.get("models") or {}).items()):
        now = statuses.get(pinned.get("name", ""))
        if now is None or not now.get("ok") or now.get("sha256") != pinned.get("sha256"):
            return None, (f"job {job_id} has the same dataset, but the {role} {pinned.get('name')}'s "
                          "weights are not pinned as they were then")
    plan = (manifest.get("plan") or {}).get("shard_identities")
    if plan is not None and plan != svc.settings.shard_identities:
        return None, (f"job {job_id} has the same dataset, but it was rendered {plan} identities a shard "
                      f"and shards are {svc.settings.shard_identities} now (a latent generator's bytes "
                      "depend on it)")
    return job, None


def owned(svc: Services, team: str, job_id: str) -> dict[str, Any]:
    """The job, or 404 when there is none or it is another team's."""
    job = svc.store.read(job_id) if job_id.isalnum() else None
    if job is None or job["owner"] != team:  # another team's job does not exist for you
        raise NotFound(f"no job {job_id}")
    return job


def cancel(svc: Services, team: str, job_id: str) -> dict[str, Any]:
    """Cancel the team's job (idempotent) and return it: ended, or canceling until its workers stop.
    Its held shards are dropped from the schedule; when none of them is running, nothing would see
    the cancel, so a `finish_cancel` task (cpu queue) ends it."""
    owned(svc, team, job_id)
    status = svc.store.request_cancel(job_id)
    if status == "canceled":  # a queued job: no worker will see it
        notify(svc.store, svc.queue, job_id, "canceled", {"status": "canceled"})  # at most once
    elif status == "canceling":
        there, in_flight, _ = svc.scheduler.forget(job_id)
        if there and not in_flight:
            svc.queue.send(FINISH_CANCEL, job_id)
    job = svc.store.get(job_id)
    assert job is not None
    return job


MAX_METADATA_FILTERS = 32  # as many as a spec's metadata holds
MAX_METADATA_KEY_CHARS = 256
MAX_METADATA_VALUE_CHARS = 1024
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def rfc3339(name: str, value: str | None) -> float | None:
    """An RFC 3339 date-time (with its offset) as epoch seconds, or a 422 naming `query.<name>`.
    A leap second counts as the second before it; years before 1 (0000) as the epoch's start."""
    if value is None:
        return None
    m = _RFC3339.fullmatch(value)
    why = "expected an RFC 3339 date-time with an offset, e.g. 2026-12-01T00:00:00Z"
    if m is not None:
        if m.group(1) == "0000":
            return 0.0
        text = value[:17] + ("59" if m.group(6) == "60" else m.group(6)) + value[19:]
        try:
            return datetime.fromisoformat(text.upper().replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError) as e:
            why = f"not a date-time: {e}"
    raise InvalidRequest(f"query.{name}: {why}", errors=[{"field": f"query.{name}", "message": why,
                                                          "type": "invalid_datetime"}])


def metadata_filter(params: list[tuple[str, str]]) -> dict[str, str]:
    """The list's metadata filters from its query (`metadata[KEY]=VALUE`, OpenAPI's deepObject
    style), or a 422 naming the parameter: a `metadata` without a key, a key given twice with two
    values, too many or too long."""
    out: dict[str, str] = {}
    for name, value in params:
        if not name.startswith("metadata"):
            continue
        field = f"query.{name}"
        if not (name.startswith("metadata[") and name.endswith("]")):
            raise InvalidRequest(f"{field}: filter on metadata as metadata[KEY]=VALUE",
                                 errors=[{"field": field, "message": "expected metadata[KEY]=VALUE",
                                          "type": "invalid_filter"}])
        key = name[len("metadata["):-1]
        why = (f"a key longer than {MAX_METADATA_KEY_CHARS} characters" if len(key) > MAX_METADATA_KEY_CHARS
               else f"a value longer than {MAX_METADATA_VALUE_CHARS} characters"
               if len(value) > MAX_METADATA_VALUE_CHARS
               else f"given twice with different values ({out[key]!r}, {value!r})"
               if out.get(key, value) != value else None)
        if why:
            raise InvalidRequest(f"{field}: {why}", errors=[{"field": field, "message": why,
                                                             "type": "invalid_filter"}])
        out[key] = value
    if len(out) > MAX_METADATA_FILTERS:
        why = f"{len(out)} metadata filters; at most {MAX_METADATA_FILTERS}"
        raise InvalidRequest(f"query.metadata: {why}", errors=[{"field": "query.metadata", "message": why,
                                                               "type": "invalid_filter"}])
    return out


def delete(svc: Services, team: str, job_id: str) -> dict[str, Any]:
    """Delete every stored object of the team's job (idempotent) and return it: a live job is
    canceled first; the workers delete (`idforge.delete_job`), manifest first, and set `deleted_at`.
    The record stays as a tombstone. When the task cannot be sent now the request still stands:
    the workers' sweep sends it (`app/lifecycle.py`)."""
    job = owned(svc, team, job_id)
    if job["status"] not in TERMINAL:
        cancel(svc, team, job_id)
    if svc.lifecycle.request_delete(job_id) != "deleted":
        try:
            svc.queue.send(DELETE_JOB, job_id)
        except ServiceError as e:
            log.warning("job %s: deletion requested, its task not sent (the sweep sends it): %s", job_id, e)
    done = svc.store.get(job_id)
    assert done is not None
    return done


def placement(svc: Services, job: dict[str, Any]) -> dict[str, Any] | None:
    """Where a live job stands: a queued one, its place in the gpu queue; a rendering one, its
    shards' place in the schedule (`Scheduler.place`). None for an ended job, or when neither
    says anything (sampling, finalizing)."""
    if job["status"] in TERMINAL:
        return None
    if job["status"] == "queued":
        try:
            return {"queue_position": svc.queue.position("gpu", SAMPLE_IDENTITIES, job["id"]),
                    "priority": job.get("priority")}
        except ServiceError:
            return None
    return svc.scheduler.place(job["id"])


# ---- artifacts ------------------------------------------------------------------------------------


FOOTERS: dataset_index.JobCache[tuple[int, Any]] = dataset_index.JobCache(64)  # index (size, footer) by (job, sha256)
SHARD_OBJECTS: dataset_index.JobCache[dict[int, list[dict[str, Any]]]] = dataset_index.JobCache(64)  # by (job, sha256)
_LOCATION_COLUMNS = ("tar", "member", "tar_offset", "record_id", "record_offset")


def _bad_cursor(e: ValueError) -> InvalidRequest:
    return InvalidRequest(f"query.after: {e}", errors=[{"field": "query.after", "message": str(e),
                                                        "type": "invalid_cursor"}])


def artifacts(svc: Services, team: str, job_id: str, *, limit: int, after: str | None) -> dict[str, Any]:
    """A page of the succeeded job's images with presigned URLs, its other objects and its report
    (409 `job_not_succeeded` before it has succeeded). The images come from the Parquet index, a row
    group or two a page (`app.dataset_index`); an old manifest's inline `files` page the same way.
    `after` is the `next` of the previous page; any other value is a 422 naming it."""
    job = owned(svc, team, job_id)
    if job.get("deletion_requested_at"):
        raise Gone(f"job {job_id}'s data was deleted ({job.get('deletion_reason') or 'requested'} at "
                   f"{job['deletion_requested_at']}); its record stays", code="job_deleted")
    if job["status"] != "succeeded":
        raise Conflict(f"job {job_id} is {job['status']}; artifacts exist once it has succeeded",
                       code="job_not_succeeded")
    keys = JobKeys.for_job(svc.settings.s3_prefix, job_id)
    manifest = json.loads(svc.storage.get_bytes(keys.manifest))
    ttl = svc.settings.presign_expiry_s
    inline = dataset_index.inline_files(manifest)
    if inline is not None:
        rows, nxt = _inline_page(job_id, inline, limit, after)
    else:
        rows, nxt = _index_page(svc, keys, job_id, manifest, limit, after)
    return {
        "job_id": job_id,
        "expires_in": ttl,
        "manifest_url": svc.storage.presign_get(keys.manifest, ttl),
        "manifest": {k: v for k, v in manifest.items() if k != "files"},
        "files": [_file_entry(svc, keys, row, ttl) for row in rows],
        "has_more": nxt is not None,
        "next": nxt,
        # The dataset's other objects: RecordIO files, the Parquet index, the identities, and the
        # WebDataset tars of the shards this page's images are in.
        "objects": [{"path": path, **meta, "url": svc.storage.presign_get(keys.key(path), ttl)}
                    for path, meta in _page_objects(svc, keys, job_id, manifest, rows)],
        "report": _report_urls(svc, keys, ttl),
    }


def _page_objects(svc: Services, keys: JobKeys, job_id: str, manifest: dict[str, Any],
                  rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The job-level objects the manifest lists, and the shard objects (`layout.OBJECTS`) of the
    shards `rows` are in, by path. An older manifest lists every object itself."""
    objects = dict(manifest.get("outputs", {}))
    table = objects.get(layout.OBJECTS)
    if table is not None and table.get("rows"):
        cache_key = (job_id, str(table.get("sha256")))
        by_shard = SHARD_OBJECTS.get(cache_key)
        if by_shard is None:
            try:
                by_shard = dataset_index.parse_objects(svc.storage.get_bytes(keys.key(layout.OBJECTS)))
            except ValueError as e:
                raise ServiceError(f"job {job_id}: its {layout.OBJECTS} cannot be read: {e}") from e
            SHARD_OBJECTS.put(cache_key, by_shard)
        for shard in sorted({r["shard"] for r in rows if r.get("shard") is not None}):
            for obj in by_shard.get(shard, []):
                objects[obj["path"]] = {"size": obj["size"], "sha256": obj["sha256"], "shard": shard}
    return sorted(objects.items())


def _file_entry(svc: Services, keys: JobKeys, row: dict[str, Any], ttl: int) -> dict[str, Any]:
    """An image of the listing: its index row and a URL. A loose file's URL is the file's; an image
    inside a tar or train.rec has its container's URL (and, in a tar, `range`: its bytes there)."""
    entry = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items() if k != "filtered"}
    if entry.get("label") is None:  # an index written before labels could be offset: the identity
        entry["label"] = entry.get("identity")
    for k in _LOCATION_COLUMNS:
        if entry.get(k) is None:
            entry.pop(k, None)
    entry["name"] = dataset_index.image_name(row)
    if row.get("path"):
        entry["url"] = svc.storage.presign_get(keys.key(row["path"]), ttl)
    else:
        container, start, length = dataset_index.image_location(row)
        entry["url"] = svc.storage.presign_get(keys.key(container), ttl)
        if length is not None:
            entry["range"] = f"bytes={start}-{start + length - 1}"
    return entry


def _inline_page(job_id: str, files: list[dict[str, Any]], limit: int,
                 after: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of an old manifest's inline `files` (the cursor's row = the position in the list; the
    old cursors, a file's path, are still taken)."""
    tag = f"{job_id}|manifest-files"
    start = 0
    if after is not None:
        try:
            rg, start = dataset_index.decode_cursor(tag, after)
            if rg != 0 or not 0 < start < len(files):
                raise dataset_index.CursorError("the cursor is past the end of this listing")
        except dataset_index.CursorError as e:
            start = next((i + 1 for i, f in enumerate(files) if f.get("path") == after), -1)
            if start < 0:
                raise _bad_cursor(e) from e
    page = files[start:start + limit]
    more = start + limit < len(files)
    return page, dataset_index.encode_cursor(tag, 0, start + limit) if more else None


def _index_file(svc: Services, keys: JobKeys, job_id: str, manifest: dict[str, Any]
                ) -> tuple[dataset_index.IndexFile, str]:
    """The job's index opened by ranged reads (its footer cached per job and index digest)."""
    pinned = manifest.get("index") or {}
    listed = manifest.get("outputs", {}).get(layout.INDEX, {})
    sha = str(pinned.get("sha256") or listed.get("sha256") or "")
    key = keys.key(layout.INDEX)

    def read(start: int, length: int) -> bytes:
        return svc.storage.get_range(key, start, length)

    cached = FOOTERS.get((job_id, sha))
    if cached is not None:
        return dataset_index.IndexFile(read, cached[0], cached[1]), sha
    size = pinned.get("size") or listed.get("size") or svc.storage.size(key)
    try:
        f = dataset_index.IndexFile(read, int(size))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ServiceError(f"job {job_id}: its index cannot be read: {e}") from e
    FOOTERS.put((job_id, sha), (int(size), f.metadata))
    return f, sha


def _index_page(svc: Services, keys: JobKeys, job_id: str, manifest: dict[str, Any], limit: int,
                after: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the index's kept images from the cursor's (row group, row): reads the row groups
    the page spans, each in one ranged read."""
    f, sha = _index_file(svc, keys, job_id, manifest)
    tag = f"{job_id}|{sha}"
    rg, row = 0, 0
    if after is not None:
        try:
            rg, row = dataset_index.decode_cursor(tag, after)
        except dataset_index.CursorError as e:
            raise _bad_cursor(e) from e
        if not (rg < f.row_groups and row < f.rows_in(rg)):
            raise _bad_cursor(ValueError("the cursor is past the end of this listing"))
    page: list[dict[str, Any]] = []
    more = False
    while rg < f.row_groups:
        rows = f.read_row_group(rg)
        while row < len(rows):
            if rows[row].get("filtered"):
                row += 1
                continue
            if len(page) == limit:
                more = True
                break
            page.append(rows[row])
            row += 1
        if more:
            break
        rg, row = rg + 1, 0
        if len(page) == limit:  # full at a row group's end: more if another row group follows
            more = rg < f.row_groups
            break
    return page, dataset_index.encode_cursor(tag, rg, row) if more else None


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
