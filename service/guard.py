"""The ASGI middleware every HTTP request passes first: the token, then the body's size, before the app reads it.

A request that needs the token (``service.auth.needs_token``) and lacks it is answered 401/503 without a byte of
its body being received. A body announced larger than ``IGAT_MAX_BODY_BYTES`` is refused with 413 at once; one
sent without Content-Length (chunked) is counted while the app receives it and refused with 413 the moment it
passes the limit, so at most the limit is ever held in memory.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Refusal, needs_token, token_refusal
from service.settings import Settings


def too_large(limit: int) -> Refusal:
    return Refusal(413, f"the request body is larger than {limit} bytes, the server's limit (IGAT_MAX_BODY_BYTES)")


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await respond(send, refusal)
            return
        limit = self.settings.max_body_bytes
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, too_large(limit).detail)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except HTTPException as exc:  # raised by counted_receive outside the app's own error handling
            if started or exc.status_code != 413:
                raise
            await respond(send, too_large(limit))

    def refusal(self, scope: Scope, headers: Headers) -> Refusal | None:
        if needs_token(self.settings, scope["method"], scope["path"]):
            refusal = token_refusal(self.settings, headers.get("authorization"))
            if refusal is not None:
                return refusal
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return too_large(self.settings.max_body_bytes)
        return None


async def respond(send: Send, refusal: Refusal) -> None:
    """A JSON ``{"detail": ...}`` answer, sent without receiving anything of the request."""
    body = json.dumps({"detail": refusal.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in refusal.headers.items()]
    await send({"type": "http.response.start", "status": refusal.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
