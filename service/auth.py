"""Bearer-token authentication for mutating routes.

No token configured on the server: mutations are refused with 503 (fail closed) and a message naming
IGAT_API_TOKEN. Missing, malformed or wrong token: 401 with ``WWW-Authenticate: Bearer``. The comparison is
constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Header, HTTPException, Request, status


def require_token(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    secret = request.app.state.settings.api_token
    expected = secret.get_secret_value() if secret is not None else ""
    if not expected:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "mutations are disabled: the server has no API token configured (set IGAT_API_TOKEN and restart it)",
        )
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing 'Authorization: Bearer <token>' header", headers=challenge
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "the Authorization header must be 'Bearer <token>'", headers=challenge
        )
    if not hmac.compare_digest(token.strip().encode("utf-8"), expected.encode("utf-8")):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API token", headers=challenge)
