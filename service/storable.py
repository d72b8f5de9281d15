"""The one convention for values a run produces (events, metrics, errors) on their way into the database and out
through the API: every such write and response passes through `storable_json` / `storable_text`, and every public
error field through `one_line`.

A run may write anything into its events.jsonl and metrics.jsonl; PostgreSQL refuses some of it (a ``NaN`` in a JSON
column, a NUL character in a text column), no database driver can encode a lone surrogate, and a strict JSON
response cannot carry a non-finite number. So, losslessly and visibly:

- a non-finite float becomes the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (JavaScript's names, and
  pydantic's ``ser_json_inf_nan="strings"``);
- a character no text column can hold (NUL, U+0000, and the lone surrogates U+D800..U+DFFF) becomes its JSON escape
  written out as text: NUL is stored as the six characters ``\\u0000``;
- a value nested deeper than `MAX_DEPTH` levels becomes ``{"_invalid": "<reason>"}``, and a value JSON has no type
  for becomes its ``repr``, as text.

Both functions are total (they never raise), so ingestion cannot stop on a value. A string that already held the
text ``\\u0000``, or the string ``"NaN"``, reads back the same as an encoded one: the price of staying readable.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_DEPTH = 64
INVALID_KEY = "_invalid"
MAX_REASON = 500

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_WHITESPACE = re.compile(r"\s+")
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_NAMED_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def storable_text(text: str) -> str:
    """`text` with NUL and lone surrogates written as their ``\\uXXXX`` escapes."""
    return _UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def storable_float(value: float) -> float | str:
    """A finite float as is; NaN and the infinities as ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else _NON_FINITE[value]


def stored_number(value: Any) -> float | None:
    """A number as `storable_float` stored it (the names of the non-finite floats read back); None for any other
    value (a bool, text, a list)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value in _NAMED_FLOATS:
        return _NAMED_FLOATS[value]
    return None


def storable_json(value: Any, depth: int = 0) -> Any:
    """A copy of the JSON-like `value` that every backend's JSON column and a strict JSON response accept."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return storable_float(value)
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict | list | tuple) and depth >= MAX_DEPTH:
        return {INVALID_KEY: f"nested deeper than {MAX_DEPTH} levels; not stored"}
    if isinstance(value, dict):
        return {storable_text(str(k)): storable_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(v, depth + 1) for v in value]
    return storable_text(repr(value))


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """`text` as one storable line of at most `limit` characters (whitespace runs, newlines included, become one
    space): the form of every public error field."""
    line = _WHITESPACE.sub(" ", storable_text(text)).strip()
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def public_error(error: str | None) -> str | None:
    """A stored ``error`` as the API shows it: its first line (rows written before errors were kept to one line hold
    the run's error output, a traceback, below it)."""
    if error is None:
        return None
    lines = error.strip().splitlines()
    return one_line(lines[0]) if lines else ""
