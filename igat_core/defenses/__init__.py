"""Base ensemble defenses by name, one module each, behind `BaseMethod`."""

from __future__ import annotations

from typing import Any

from igat_core.defenses.base import BaseMethod, LossOutput
from igat_core.defenses.pgd_at import PgdAT
from igat_core.defenses.plain import Plain

DEFENSES: dict[str, type[BaseMethod]] = {"plain": Plain, "pgd_at": PgdAT}


def build_method(name: str, params: dict[str, Any] | None = None) -> BaseMethod:
    if name not in DEFENSES:
        raise ValueError(f"unknown base method {name!r}; known: {', '.join(sorted(DEFENSES))}")
    try:
        return DEFENSES[name](**(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters for base method {name!r}: {exc}") from None


__all__ = ["DEFENSES", "BaseMethod", "LossOutput", "PgdAT", "Plain", "build_method"]
