"""Downloads for the local storage backend: the embedded default's presigned URLs."""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from app.api.deps import Svc
from app.api.openapi import problems
from app.errors import NotFound, Unauthorized
from app.storage import LocalStorage

router = APIRouter(tags=["files"])

OBJECT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"


@router.get("/v1/files/{key:path}", summary="Download an object by a signed URL (local storage)",
            response_class=FileResponse,
            responses={200: {"description": "The object's bytes, with its media type",
                             "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                       **problems(401)})
def download(key: str, svc: Svc, expires: Annotated[int, Query()],
             sig: Annotated[str, Query(max_length=128, pattern=r"^[0-9a-f]+$")]) -> FileResponse:
    storage = svc.storage
    if not isinstance(storage, LocalStorage):
        raise NotFound("downloads are served by the object store; use the presigned URL")
    if not storage.verify(key, expires, sig):
        raise Unauthorized("the download URL is invalid or has expired", code="bad_signature")
    try:
        path = storage._path(key)
    except ValueError as e:
        raise NotFound(f"no object {key}") from e
    if not path.is_file():
        raise NotFound(f"no object {key}")
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # Stored objects are data, never active content on the API's origin: a report page may show
    # its inline styles and data: images, nothing else (no script, no requests, sandboxed).
    headers = {"Content-Security-Policy": OBJECT_CSP, "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type=media, headers=headers)
