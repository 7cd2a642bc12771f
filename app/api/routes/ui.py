"""The web page at `/ui`: the team's jobs, their progress and their quality reports.

The page holds no data and needs no key to fetch; its script asks for the team's API key, keeps it
in sessionStorage and reads everything from the JSON API. Its Content-Security-Policy allows only
the API's own origin, plus the origins that presigned report URLs point at (the S3 endpoint, or the
API's public URL for local storage), where the plots are loaded from.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.deps import Svc
from app.errors import NotFound
from app.storage import Storage

log = logging.getLogger("idforge.api")

router = APIRouter(tags=["ui"], include_in_schema=False)

# The page's assets (app/api/static, shipped as package data), by name: media type.
ASSETS = {"ui.html": "text/html; charset=utf-8", "ui.js": "text/javascript; charset=utf-8",
          "ui.css": "text/css; charset=utf-8"}


@cache
def asset(name: str) -> bytes:
    """One of the page's files, read once from the package."""
    if name not in ASSETS:
        raise NotFound(f"no UI asset {name}")
    return (resources.files("app.api") / "static" / name).read_bytes()


def origin(url: str) -> str | None:
    """`scheme://host[:port]` of an http(s) URL, else None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def image_origins(storage: Storage, public_url: str) -> list[str]:
    """Where the page's images come from: the origin of the storage's presigned URLs (signed for a
    throwaway key; signing is local, nothing is fetched) and the API's public URL."""
    try:
        signed = storage.presign_get("idforge-ui-probe", 60)
    except Exception as e:  # noqa: BLE001 - e.g. botocore's NoCredentialsError: the images could not load
        log.warning("cannot sign a storage URL for the UI's image origins: %s", e)
        signed = ""
    found: list[str] = []
    for o in (origin(signed), origin(public_url)):
        if o and o not in found:
            found.append(o)
    return found


def content_security_policy(img_origins: list[str]) -> str:
    """Everything from our own origin only; images also from the storage; no inline code, no
    frames, no form posts (the key form is handled by the script)."""
    img = " ".join(["'self'", *img_origins])
    return ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            f"img-src {img}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@router.get("/ui")
def ui_page(svc: Svc) -> Response:
    csp = content_security_policy(image_origins(svc.storage, svc.settings.public_url))
    return Response(asset("ui.html"), media_type=ASSETS["ui.html"], headers={
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    })


@router.get("/ui/{name}")
def ui_asset(name: str) -> Response:
    if name not in ("ui.js", "ui.css"):
        raise NotFound(f"no UI asset {name}")
    return Response(asset(name), media_type=ASSETS[name], headers={
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
