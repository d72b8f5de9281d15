"""Bearer-token authentication.

Which requests need the token: every mutation, and every read unless ``IGAT_OPEN_READS`` is true (the
local-development default); ``/healthz``, the API documentation and the web UI's own files (``/ui``, which hold
no data: its pages send the token the user gives them with each request) never do. ``service.guard`` checks it for
every request before any of its body is read; ``require_token`` repeats it on each mutating route, and ``bearer``
puts the scheme into the OpenAPI document.

No token configured on the server: requests that need one are refused with 503 (fail closed) and a message
naming IGAT_API_TOKEN. Missing, malformed or wrong token: 401 with ``WWW-Authenticate: Bearer``. The comparison
is constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.settings import Settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Paths a deployment still answers without a token: liveness and the API's own description.
OPEN_PATHS = frozenset({"/", "/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
#: The web UI's static files (service/ui/), served under this prefix.
UI_PREFIX = "/ui"
CHALLENGE = {"WWW-Authenticate": "Bearer"}

bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <IGAT_API_TOKEN>`: needed by every mutation, and by every read unless the "
    "server runs with IGAT_OPEN_READS=true (local development)",
)


@dataclass(frozen=True)
class Refusal:
    status_code: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


def needs_token(settings: Settings, method: str, path: str) -> bool:
    if method.upper() not in SAFE_METHODS:
        return True
    if settings.open_reads or path in OPEN_PATHS:
        return False
    return path != UI_PREFIX and not path.startswith(UI_PREFIX + "/")


def token_refusal(settings: Settings, authorization: str | None) -> Refusal | None:
    """Why a request carrying this Authorization header may not proceed, or None when the token is right."""
    expected = settings.api_token.get_secret_value() if settings.api_token is not None else ""
    if not expected:
        return Refusal(status.HTTP_503_SERVICE_UNAVAILABLE, "mutations (and reads, unless IGAT_OPEN_READS) are "
                       "disabled: the server has no API token configured (set IGAT_API_TOKEN and restart it)")
    if not authorization:
        return Refusal(status.HTTP_401_UNAUTHORIZED, "missing 'Authorization: Bearer <token>' header", CHALLENGE)
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return Refusal(status.HTTP_401_UNAUTHORIZED, "the Authorization header must be 'Bearer <token>'", CHALLENGE)
    if not hmac.compare_digest(token.strip().encode("utf-8"), expected.encode("utf-8")):
        return Refusal(status.HTTP_401_UNAUTHORIZED, "invalid API token", CHALLENGE)
    return None


def require_token(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None
) -> None:
    settings: Settings = request.app.state.settings
    refusal = token_refusal(settings, request.headers.get("authorization"))
    if refusal is not None:
        raise HTTPException(refusal.status_code, refusal.detail, headers=refusal.headers or None)

