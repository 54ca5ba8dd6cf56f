"""The one place exceptions become HTTP: `{"error": {"code", "message", "param"}}` + a status.

    ServiceError (lorajobs.core.errors)   -> its status (404, 409, 413, 422, 429, 401, 403;
                                             503 + Retry-After for StorageUnavailable)
    LoraCoreError reaching the edge          -> 422 if the user's fault, else 500
    RequestValidationError                   -> 422, `errors: [{field, message, type}]` for
                                                every bad field, `param` = the first one
    HTTPException (unknown route, 405 ...)   -> its status, same shape
    anything else                            -> 500 internal_error; the traceback goes to the
                                                log, never to the client
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from lora_core.errors import LoraCoreError
from lorajobs.core.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    StorageUnavailable,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = ["install_error_handlers", "error_body", "error_response", "status_for",
           "document_error_responses", "ErrorResponse"]

log = logging.getLogger(__name__)

# Most specific first: Forbidden is an Unauthorized, IllegalTransition a Conflict.
_STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (Forbidden, 403),
    (Unauthorized, 401),
    (NotFound, 404),
    (Conflict, 409),
    (PayloadTooLarge, 413),
    (InvalidRequest, 422),
    (LimitExceeded, 429),
    (StorageUnavailable, 503),
    (UpstreamTimeout, 504),
    (UpstreamUnavailable, 502),
)
# A store outage is usually seconds (a restart, a failover): the client's retry policy waits.
STORAGE_RETRY_AFTER_S = 5
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
               415: "unsupported_media_type", 416: "range_not_satisfiable",
               429: "limit_exceeded"}


def status_for(exc: ServiceError) -> int:
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 400)


def error_body(code: str, message: str, param: str | None = None,
               **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}, **extra}


def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status = status_for(exc)
    details = dict(exc.details)
    # A rejected dataset lists its bad lines beside the error, not inside it.
    errors = details.pop("errors", None)
    body = error_body(exc.code, exc.message, exc.param, **({"errors": errors} if errors else {}))
    body["error"].update(details)
    headers = ({"WWW-Authenticate": "Bearer"} if status == 401
               else {"Retry-After": str(STORAGE_RETRY_AFTER_S)} if status == 503 else None)
    if status == 503:
        log.warning("%s", exc.message)
    return JSONResponse(body, status_code=status, headers=headers)


def _lora_core_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LoraCoreError)
    if not exc.user_fault:
        log.error("lora_core error reached the API", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal error"), status_code=500)
    errors = getattr(exc, "errors", None)  # the subclasses that collect several problems
    extra = {"errors": errors} if errors else {}
    return JSONResponse(error_body(exc.code, exc.message, exc.param, **extra), status_code=422)


def _field_name(loc: tuple[Any, ...]) -> str:
    """("body", "lora", "r") -> "lora.r"; ("body", "x", 0) -> "x[0]"; ("query", "n") -> "n"."""
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "cookie") else loc
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or (str(loc[0]) if loc else "body")


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        field = _field_name(loc)
        if err.get("type") == "extra_forbidden":
            message = "unknown field (not accepted here)"
        else:
            message = str(err.get("msg", "invalid value"))
        errors.append({"field": field, "message": message, "type": err.get("type")})
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    param = errors[0]["field"] if errors else None
    return JSONResponse(error_body("invalid_request", summary, param, errors=errors),
                        status_code=422)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return JSONResponse(error_body(code, message), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def _data_error(request: Request, exc: Exception) -> JSONResponse:
    """A client value the database cannot hold (PostgreSQL: a NUL byte in text, a number out
    of its column's range) that validation let through: the request is wrong, not the server."""
    log.info("refused %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(error_body("invalid_request", "a value in the request cannot be stored "
                                   "(NUL byte, or a number out of range)"), status_code=422)


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal_error", "internal error; see the server log"),
                        status_code=500)


# Most specific first (error_response takes the first match; Starlette, the nearest class).
_HANDLERS: tuple[tuple[type[Exception], Callable[[Request, Exception], JSONResponse]], ...] = (
    (ServiceError, _service_error),
    (LoraCoreError, _lora_core_error),
    (RequestValidationError, _validation_error),
    (StarletteHTTPException, _http_error),
    (DataError, _data_error),
    (Exception, _internal_error),
)


def install_error_handlers(app: FastAPI) -> None:
    for cls, handler in _HANDLERS:
        app.add_exception_handler(cls, handler)


def error_response(scope: Scope, exc: Exception) -> JSONResponse:
    """The response the installed handlers give `exc`, for middleware that answers before
    the app (outside FastAPI's exception handling, where an exception would be a bare 500)."""
    handler = next(h for cls, h in _HANDLERS if isinstance(exc, cls))
    return handler(Request(scope), exc)


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """The one error shape: `{"error": {code, message, param}}` (+ `errors` for 422s)."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "malformed request body (/openai: also invalid parameters, as OpenAI answers)",
    401: "missing, invalid or revoked API key",
    408: "the request body did not arrive in time (body_timeout_seconds)",
    403: "the key lacks the admin right",
    404: "no such object for this tenant (other tenants' objects included), or unknown cursor",
    409: "the object's state forbids it (e.g. cancel a finished job), or the name is taken",
    413: "request body or upload over the limit", 422: "invalid parameters or body",
    429: "a per-tenant quota is reached",
    503: "the object store is unreachable or failing (storage_unavailable); retry after "
         "Retry-After seconds",
}
_API_PREFIXES = ("/v1/", "/openai/")
_REF = "#/components/schemas/"


def _depends_on(dependant: Any, call: Any) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def _error_codes(route: APIRoute) -> list[int]:
    from lorajobs.api.deps import get_admin, get_store

    methods = route.methods or set()  # typed Optional; APIRoute always fills it
    codes = [401, 404, 422]
    if _depends_on(route.dependant, get_admin):
        codes.append(403)
    if methods & {"POST", "PUT", "PATCH"}:
        codes += [400, 408, 413]
    elif route.path_format.startswith("/openai/"):
        codes.append(400)  # OpenAI's own status for invalid parameters
    if methods & {"POST", "DELETE"}:
        codes.append(409)  # DELETE: a dataset in use, a job not finished
        if "POST" in methods and route.path.rstrip("/").endswith("/jobs"):
            codes.append(429)
    if _depends_on(route.dependant, get_store):
        codes.append(503)  # the object store is down (an S3 store; never the local one)
    return codes


def _api_routes(routes: Any) -> Iterator[APIRoute]:
    """Every APIRoute, descending into included routers (FastAPI >= 0.165 keeps them nested)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (inner := getattr(route, "original_router", None)) is not None:
            yield from _api_routes(inner.routes)


def document_error_responses(app: FastAPI) -> None:
    """List, on every authenticated route, the error statuses our middleware, auth and error
    handlers can answer with, so the OpenAPI document describes every response a client can
    get (schemathesis checks exactly that). Wraps `app.openapi`; call after the routers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        error_schema = ErrorResponse.model_json_schema(ref_template=_REF + "{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(error_schema.pop("$defs", {}))
        components["ErrorResponse"] = error_schema
        content = {"application/json": {"schema": {"$ref": _REF + "ErrorResponse"}}}
        for route in _api_routes(app.routes):
            if not route.path_format.startswith(_API_PREFIXES):
                continue
            for method in route.methods or ():
                operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                if operation is None:
                    continue
                for code in _error_codes(route):
                    operation["responses"].setdefault(str(code), {
                        "description": _DESCRIPTIONS[code], "content": content})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
