"""Request bodies, read as bytes on the event loop and decoded and validated in the route's worker thread.

FastAPI would decode and validate a body parameter on the event loop before the route runs; a large spec then
holds up every other request (``/healthz`` included). Routes instead take ``RawBody`` (the bytes, at most
IGAT_MAX_BODY_BYTES: ``service.guard``) and, being plain ``def`` routes that FastAPI runs in its threadpool, call
``json_body`` there (``spec_body`` for the spec submissions, which may also be the YAML that `igat run` reads).
Problems become the usual 422 (``RequestValidationError``), each naming its field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import yaml
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

#: Containers inside containers a body may hold; a spec needs about five.
MAX_JSON_DEPTH = 32
#: Content types a spec may be sent as instead of JSON: the YAML that `igat run` and `igat study` read.
YAML_MEDIA_TYPE = "application/yaml"
YAML_TYPES = frozenset({YAML_MEDIA_TYPE, "application/x-yaml", "text/yaml", "text/x-yaml"})
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
    return shallow(value, path)


def shallow(value: Any, path: list[str | int] | None) -> Any:
    """``value``, or a 422 naming ``path``, where it lies deeper than MAX_JSON_DEPTH."""
    if path is not None:
        raise invalid(tuple(path), f"nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays", "too_deep")
    return value


class _PlainYaml(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: `*name` can make a small document expand exponentially."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not accepted here: write the value out",
                                       problem_mark=self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what was being parsed and what went wrong, each with its line and column."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    context = f"{exc.context}{_where(exc.context_mark)}: " if exc.context else ""
    return f"{context}{exc.problem}{_where(exc.problem_mark)}"


def yaml_body(raw: bytes) -> Any:
    """The decoded YAML body, or a 422: not YAML (naming the line and column), not UTF-8, an alias, or too deep."""
    try:
        text = raw.decode("utf-8")
        value = yaml.load(text, Loader=_PlainYaml) if text.strip() else None
    except UnicodeDecodeError as exc:
        raise invalid((), f"not valid UTF-8: {exc}", "yaml_invalid") from None
    except RecursionError:
        return shallow(None, [])
    except yaml.YAMLError as exc:
        raise invalid((), f"not valid YAML: {yaml_problem(exc)}", "yaml_invalid") from None
    if value is None:
        raise invalid((), "a YAML body is required", "missing")
    return shallow(value, deep_path(value))


def spec_body(raw: bytes, content_type: str | None) -> Any:
    """A spec submission's decoded body: YAML when its Content-Type is one of YAML_TYPES, else JSON."""
    media = (content_type or "").split(";")[0].strip().lower()
    return yaml_body(raw) if media in YAML_TYPES else json_body(raw)


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
