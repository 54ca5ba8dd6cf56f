"""`/ui`: the dashboard, one bundled HTML file (no CDN: the service runs offline).

The page itself is public (it holds no data); every call it makes carries the API key the user
enters, which it keeps in the browser's localStorage.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter(tags=["ui"], include_in_schema=False)


@cache
def _page() -> str:
    return resources.files("lorajobs.api").joinpath("static/dashboard.html").read_text("utf-8")


@router.get("/ui")
def dashboard() -> HTMLResponse:
    """The dashboard page."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


@router.get("/")
def root() -> RedirectResponse:
    """The root sends people to the dashboard."""
    return RedirectResponse("/ui")
