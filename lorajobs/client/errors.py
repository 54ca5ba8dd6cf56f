"""SDK exceptions, mirroring the API's error shape `{"error": {code, message, param}}`.

    LorajobsError
    ├── APIConnectionError        could not reach the server (after retries)
    ├── ChecksumError             a download's sha256 did not match the server's manifest
    ├── UnsafePathError           a server-supplied file name would land outside the target
    └── APIError                  the server answered with an error; `.status`, `.code`, `.param`
        ├── AuthenticationError   401 / 403
        ├── NotFoundError         404
        ├── ConflictError         409 (e.g. cancelling a finished job)
        ├── PayloadTooLargeError  413
        ├── InvalidRequestError   400 / 422; `.errors` lists per-line/per-field problems
        ├── RateLimitError        429
        └── ServerError           5xx (after retries)
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "LorajobsError",
    "APIConnectionError",
    "ChecksumError",
    "UnsafePathError",
    "APIError",
    "AuthenticationError",
    "NotFoundError",
    "ConflictError",
    "PayloadTooLargeError",
    "InvalidRequestError",
    "RateLimitError",
    "ServerError",
    "raise_for_response",
]


class LorajobsError(Exception):
    """Base of every SDK error."""


class APIConnectionError(LorajobsError):
    pass


class ChecksumError(LorajobsError):
    pass


class UnsafePathError(LorajobsError):
    """A download refused before writing anything: an artifact name from the server is
    absolute, climbs with `..`, or goes through a symlink, so `out / name` would escape `out`."""


class APIError(LorajobsError):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        self.status, self.code, self.message, self.param = status, code, message, param
        self.errors = errors or []
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message, the field when the message does not name it, and the first detail."""
        text = self.message
        if self.param and self.param not in text:
            text += f" (field: {self.param})"
        if self.errors:
            first = self.errors[0]
            loc = f"line {first.get('line')}" if first.get("line") else first.get("field", "")
            detail = f"{loc}: {first.get('message')}"
            more = f" (+{len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            if detail not in text:
                text += f": {detail}{more}"
        return text


class AuthenticationError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class PayloadTooLargeError(APIError):
    pass


class InvalidRequestError(APIError):
    pass


class RateLimitError(APIError):
    pass


class ServerError(APIError):
    pass


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: AuthenticationError,
    404: NotFoundError, 409: ConflictError, 413: PayloadTooLargeError,
    422: InvalidRequestError, 429: RateLimitError,
}


def raise_for_response(response: httpx.Response) -> None:
    """Raise the APIError subclass for an error response; return for 2xx/3xx."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"code": "http_error", "message": response.text[:200] or response.reason_phrase}
    cls = _BY_STATUS.get(response.status_code,
                         ServerError if response.status_code >= 500 else APIError)
    errors = body.get("errors") or err.get("errors") if isinstance(body, dict) else None
    raise cls(response.status_code, str(err.get("code", "error")), str(err.get("message", "")),
              err.get("param"), errors)
