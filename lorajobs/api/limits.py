"""Request body limits, enforced before and while a body arrives (OWASP API4).

A declared `Content-Length` over the limit is refused before one byte is read; a body without
one (chunked) is counted as it streams and refused the moment it passes the limit, so nothing
is ever buffered past the cap. Upload paths get `max_upload_bytes` (+ multipart framing);
every other body gets `max_request_bytes`.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorajobs.api.errors import error_body
from lorajobs.service.settings import Settings

__all__ = ["BodyLimitMiddleware", "UPLOAD_PATHS", "MULTIPART_OVERHEAD"]

UPLOAD_PATHS = frozenset({"/v1/datasets", "/openai/v1/files"})
# Boundaries, part headers and small form fields around the file; the file itself is capped
# exactly by the dataset service.
MULTIPART_OVERHEAD = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        if path.rstrip("/") in UPLOAD_PATHS:
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        return self.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # fastapi.HTTPException passes through FastAPI's body parsing unchanged
                    # and reaches our handler as a 413 in the error shape.
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(error_body("payload_too_large", f"request body exceeds {limit} bytes"),
                        status_code=413, headers={"Connection": "close"})
