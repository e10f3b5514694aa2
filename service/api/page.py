"""The try-it page at ``GET /``: static HTML, CSS and JS shipped in the package, calling the service's own REST API.

A browser (``Accept: text/html``) gets the page; any other client gets a short JSON description of the service, so
``curl /`` stays useful. ``POST /`` is the Hugging Face API (``hf.py``), not this.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Request, Response

from service import __version__
from service.api.admission import State
from service.http.responses import json_response

router = APIRouter()

# The page's files by URL name; nothing outside this list is ever read from the package.
ASSETS = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
_NO_STORE = {"Cache-Control": "no-cache"}


def _asset(name: str) -> bytes:
    return (resources.files("service.api") / "static" / name).read_bytes()


def wants_html(accept: str) -> bool:
    """Browsers list text/html first; ``*/*`` alone (curl, most clients) is not a request for the page."""
    for part in accept.split(","):
        media_type = part.split(";", 1)[0].strip().lower()
        if media_type in ("text/html", "application/xhtml+xml"):
            return True
        if media_type == "application/json":
            return False
    return False


@router.get("/", summary="This service: the try-it page for browsers, a JSON description otherwise")
async def index(request: Request, state: State) -> Response:
    settings = state.settings
    if settings.ui and wants_html(request.headers.get("accept", "")):
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=_NO_STORE)
    body = {
        "service": "deit-serve",
        "version": __version__,
        "api_key_required": bool(settings.api_keys),
        "ui": settings.ui,
        "models": "/v1/models",
        "docs": "/docs",
    }
    return json_response(body)


@router.get("/ui/{name}", include_in_schema=False)
async def asset(state: State, name: str) -> Response:
    if not state.settings.ui or name not in ASSETS:
        raise HTTPException(404, "Not Found")
    return Response(_asset(name), media_type=ASSETS[name], headers=_NO_STORE)
