"""igat_core: ensembles, iGAT (NeurIPS 2023) and their evaluation. Importing this package does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from igat_core.ensemble import Ensemble, load_ensemble

__all__ = ["Ensemble", "load_ensemble"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from igat_core import ensemble

        return getattr(ensemble, name)
    raise AttributeError(f"module 'igat_core' has no attribute {name!r}")
