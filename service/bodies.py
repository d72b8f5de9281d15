"""JSON request bodies, read as bytes on the event loop and decoded and validated in the route's worker thread.

FastAPI would decode and validate a body parameter on the event loop before the route runs; a large spec then
holds up every other request (``/healthz`` included). Routes instead take ``RawBody`` (the bytes, at most
IGAT_MAX_BODY_BYTES: ``service.guard``) and, being plain ``def`` routes that FastAPI runs in its threadpool, call
``json_body`` there. Problems become the usual 422 (``RequestValidationError``), each naming its field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

#: Containers inside containers a body may hold; a spec needs about five.
MAX_JSON_DEPTH = 32
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')


async def _raw_body(request: Request) -> bytes:
    return await request.body()


RawBody = Annotated[bytes, Depends(_raw_body)]


def invalid(loc: tuple[str | int, ...], msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": kind}])


def json_body(raw: bytes) -> Any:
    """The decoded body, or a 422: not JSON, not UTF-8, or nested deeper than MAX_JSON_DEPTH (naming where)."""
    if not raw.strip():
        raise invalid((), "a JSON body is required", "missing")
    try:
        value = json.loads(raw)
    except RecursionError:
        value = None
        path = deep_path_in_text(raw.decode("utf-8", "replace"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid((), f"not valid JSON: {exc}", "json_invalid") from None
    else:
        path = deep_path(value)
    if path is not None:
        raise invalid(tuple(path), f"nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays", "too_deep")
    return value


def deep_path(value: Any, room: int = MAX_JSON_DEPTH) -> list[str | int] | None:
    """Where a container inside ``value`` lies past ``room`` levels (``value`` itself being the first)."""
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    if room == 0:
        return []
    for key, child in children:
        if isinstance(child, dict | list):
            found = deep_path(child, room - 1)
            if found is not None:
                return [key, *found]
    return None


def deep_path_in_text(text: str, limit: int = MAX_JSON_DEPTH) -> list[str | int] | None:
    """``deep_path`` for a document too deep for ``json.loads``, read token by token up to the offending level."""
    path: list[str | int] = []
    key: str | int = ""
    try:
        for match in _TOKENS.finditer(text):
            token = match.group()
            if token[0] == '"':
                key = json.loads(token)
            elif token == ":":
                path[-1] = key
            elif token == "," and isinstance(path[-1], int):
                path[-1] += 1
            elif token in "{[":
                if len(path) == limit:
                    return path
                path.append(0 if token == "[" else "")
            elif token in "}]":
                path.pop()
    except (IndexError, ValueError):
        pass
    return path[:limit] or None
