"""The service's exceptions: raised by the shared package, mapped to HTTP only in `api.errors`.

    ServiceError            base; `.code`, `.message`, `.param`
    ├── NotFound            no such object, or it belongs to another tenant   -> 404
    ├── Conflict            illegal state change (e.g. cancel a finished job)  -> 409
    │   └── IllegalTransition
    ├── InvalidRequest      a field's value is wrong                           -> 422
    ├── LimitExceeded       a quota is reached                                 -> 429
    ├── PayloadTooLarge     an upload or body over the limit                   -> 413
    ├── Unauthorized        missing, unknown or revoked key                    -> 401
    │   └── Forbidden       a valid key without the right (admin only)         -> 403
    └── StorageUnavailable  the object store is unreachable or failing         -> 503
                            (botocore's errors never leave lorajobs.core.s3store)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ServiceError",
    "NotFound",
    "Conflict",
    "IllegalTransition",
    "InvalidRequest",
    "LimitExceeded",
    "PayloadTooLarge",
    "Unauthorized",
    "Forbidden",
    "StorageUnavailable",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class ServiceError(Exception):
    code = "service_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code:
            self.code = code
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, **self.details}


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


class IllegalTransition(Conflict):
    code = "illegal_transition"


class InvalidRequest(ServiceError):
    code = "invalid_request"


class LimitExceeded(ServiceError):
    code = "limit_exceeded"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(Unauthorized):
    code = "forbidden"


class StorageUnavailable(ServiceError):
    """The artifact store failed (down, timing out, refusing): the client may retry later."""

    code = "storage_unavailable"


class UpstreamUnavailable(ServiceError):
    """A serving target's vLLM servers did not answer (down, refusing): 502, retry later."""

    code = "serving_unavailable"


class UpstreamTimeout(UpstreamUnavailable):
    """A serving target's server took a request but sent nothing back in time: 504."""

    code = "serving_timeout"
