"""Bearer-key authentication: every request re-reads its key row, so a revocation bites at once.

The principal is the `ApiKey` row; its `tenant_id` scopes every query a route makes, and
`is_admin` gates the operator endpoints (model registration, creating other tenants).
"""

from __future__ import annotations

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from lorajobs.service import keys
from lorajobs.service.errors import Forbidden
from lorajobs.service.models import ApiKey

__all__ = ["bearer", "authenticate", "require_admin"]

# auto_error=False: a missing or malformed header must answer in our error shape (401), not
# FastAPI's default 403 {"detail": ...}.
bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer lj_...`")


def authenticate(session: Session, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
    """The live key row for the request's bearer token, or Unauthorized."""
    return keys.authenticate(session, credentials.credentials if credentials else None)


def require_admin(principal: ApiKey) -> ApiKey:
    if not principal.is_admin:
        raise Forbidden("this endpoint needs an admin key", param="Authorization")
    return principal
