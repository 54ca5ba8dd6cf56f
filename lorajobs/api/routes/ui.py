"""`/ui`: the dashboard, one bundled HTML file (no CDN: the service runs offline).

The page itself is public (it holds no data); every call it makes carries the API key the user
enters, which it keeps in the browser's localStorage. A key reaches the page through its form
or the URL fragment (`/ui#key=lj_...`), which browsers never send to a server: never through
the query string, which access logs, proxies and browser histories keep. `/ui?key=...` is
refused (400) without echoing the key.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter(tags=["ui"], include_in_schema=False)

# The page is served with these: no Referer carries its URL anywhere, and it may not be
# framed (clickjacking of the key form).
_HEADERS = {"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}
# Query parameters refused on /ui: the names a key was (or would be) passed under.
_KEY_PARAMS = frozenset({"key", "api_key", "apikey", "token", "access_token"})
_KEY_IN_QUERY = """<!doctype html><html lang="en"><meta charset="utf-8"><title>lorajobs</title>
<body style="font: 15px system-ui, sans-serif; margin: 2rem; max-width: 44rem">
<h1>API keys do not go in the query string</h1>
<p>A key in <code>?key=</code> ends up in server and proxy logs and in the browser's history,
so this address is refused. Open <a href="/ui">/ui</a> and paste the key into the form, or use
<code>/ui#key=&lt;key&gt;</code>: the part after <code>#</code> never leaves the browser.</p>
<p>If this address was shared or logged elsewhere, revoke that key.</p>
</body></html>"""


@cache
def _page() -> str:
    return resources.files("lorajobs.api").joinpath("static/dashboard.html").read_text("utf-8")


@router.get("/ui")
def dashboard(request: Request) -> HTMLResponse:
    """The dashboard page; 400 for a key in the query string."""
    if any(name.lower() in _KEY_PARAMS for name in request.query_params):
        return HTMLResponse(_KEY_IN_QUERY, status_code=400, headers=_HEADERS)
    return HTMLResponse(_page(), headers=_HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    """The root sends people to the dashboard."""
    return RedirectResponse("/ui")
