"""Base ensemble defenses by name, one module each, behind `BaseMethod`."""

from __future__ import annotations

import inspect
from typing import Any

from igat_core.defenses.adp import ADP
from igat_core.defenses.base import BaseMethod, LossOutput
from igat_core.defenses.cldl import CLDL
from igat_core.defenses.dverge import DVERGE
from igat_core.defenses.gal import GAL
from igat_core.defenses.pgd_at import PgdAT
from igat_core.defenses.plain import Plain
from igat_core.defenses.soe import SoE
from igat_core.defenses.trs import TRS

DEFENSES: dict[str, type[BaseMethod]] = {
    "plain": Plain,
    "pgd_at": PgdAT,
    "adp": ADP,
    "gal": GAL,
    "dverge": DVERGE,
    "trs": TRS,
    "soe": SoE,
    "cldl": CLDL,
}


def method_parameters(name: str) -> list[str]:
    """The constructor parameters a base method accepts through `base.params`."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(DEFENSES[name].__init__).parameters.values()
            if p.name != "self" and p.kind in named]


def build_method(name: str, params: dict[str, Any] | None = None) -> BaseMethod:
    if name not in DEFENSES:
        raise ValueError(f"unknown base method {name!r}; known: {', '.join(sorted(DEFENSES))}")
    params = dict(params or {})
    known = method_parameters(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} for base method {name!r}; "
                         f"known: {', '.join(known) or '(none)'}")
    try:
        return DEFENSES[name](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for base method {name!r}: {exc}") from None


__all__ = ["ADP", "CLDL", "DEFENSES", "DVERGE", "GAL", "TRS", "BaseMethod", "LossOutput", "PgdAT", "Plain", "SoE",
           "build_method", "method_parameters"]
