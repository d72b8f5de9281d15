"""Theorem 4.1 and the supplement's measurements: risks and the exact threshold, the toy example, curvature
(eq. 2), the factor matrix of Assumption 4.2, ambiguous pairs (Definition 4.3), Assumption 4.4 rates, the
Monte-Carlo check with real MLPs and the diagnostics of Tables 4-8.

Importing this package does not import torch; the torch-based names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from igat_core.theory.risks import (
    PAPER_THRESHOLD,
    THRESHOLD,
    ensemble_risk,
    risk_gap,
    single_risk,
    threshold_from_cubic,
    threshold_summary,
)
from igat_core.theory.toy import ToyExample

_LAZY = {
    "ensemble_diagnostics": "igat_core.theory.diagnostics",
    "diagnostics_table": "igat_core.theory.diagnostics",
    "score_diagnostics": "igat_core.theory.diagnostics",
    "plot_diagnostics": "igat_core.theory.plots",
    "plot_risks": "igat_core.theory.plots",
    "ambiguous_pairs": "igat_core.theory.pairs",
    "estimate_constants": "igat_core.theory.pairs",
    "PairConstants": "igat_core.theory.pairs",
    "pointwise_curvature": "igat_core.theory.curvature",
    "factor_norms": "igat_core.theory.factor",
    "MonteCarloConfig": "igat_core.theory.montecarlo",
    "run_montecarlo": "igat_core.theory.montecarlo",
    "write_montecarlo": "igat_core.theory.montecarlo",
}

__all__ = ["PAPER_THRESHOLD", "THRESHOLD", "ToyExample", "ensemble_risk", "risk_gap", "single_risk",
           "threshold_from_cubic", "threshold_summary", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'igat_core.theory' has no attribute {name!r}")
