"""The team's API keys (admin scope): make, list, revoke (app.api.auth's KeyRing)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from app.api import limits
from app.api.auth import KEY_NAME_MAX
from app.api.deps import Admin
from app.api.problems import field_errors
from app.errors import InvalidRequest, NotFound

router = APIRouter(tags=["system"])


class NewKey(BaseModel):
    """Body of POST /v1/keys."""

    model_config = ConfigDict(extra="forbid")

    scopes: list[Literal["read", "submit", "admin"]] = Field(..., min_length=1)  # submit implies read
    name: str = Field("", max_length=KEY_NAME_MAX)  # what the key is for, shown in listings


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
