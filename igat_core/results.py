"""results.json: its one builder, for a whole run (`igat run`, the Ray runner) and for `igat eval`.

A results record holds the evaluation (accuracy per model, combiner and attack), the comparisons of one target
model against every other (`improvement_over`: Table 2's relative improvement; `gain_points`: the difference in
points; `improvement`: Table 2 against the reference), the attack cost, the diagnostics, the sanity checks, the
phases' timing, the alpha/beta search, the artifacts and where it ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from igat_core.evaluate import point_differences, relative_improvement
from igat_core.runtime import runtime_record


def evaluation_section(evaluation: Mapping[str, Any], eps: float) -> dict:
    """results.json's `evaluation`: eps, the examples, accuracy[model][combiner][attack] and the eps sweep."""
    section = {"eps": eps, "n_examples": evaluation["n_examples"], **evaluation["accuracy"]}
    if evaluation.get("eps_sweep"):
        section["eps_sweep"] = evaluation["eps_sweep"]
    return section


def comparisons(accuracy: Mapping[str, Any], target: str) -> tuple[dict, dict]:
    """(relative improvement, gain in points) of `target` over every other model; empty without `target`."""
    references = [m for m in accuracy if m != target] if target in accuracy else []
    return ({m: relative_improvement(accuracy[m], accuracy[target]) for m in references},
            {m: point_differences(accuracy[m], accuracy[target]) for m in references})


def results_record(evaluation: Mapping[str, Any], *, name: str, spec: dict, eps: float, timing: dict[str, float],
                   artifacts: dict[str, str], device: torch.device, reference: str = "base", target: str = "igat",
                   tune: dict | None = None, provenance: Mapping[str, Any] | None = None) -> dict:
    """results.json from an evaluation record (`evaluate.evaluation_record`, plus `diagnostics`): `target`
    compared with every other model, `improvement` against `reference`."""
    improvement_over, gain_points = comparisons(evaluation["accuracy"], target)
    return {
        "name": name,
        **(provenance or {}),
        "spec": spec,
        "evaluation": evaluation_section(evaluation, eps),
        "improvement": improvement_over.get(reference, {}),
        "improvement_over": improvement_over,
        "gain_points": gain_points,
        "attack_cost": evaluation.get("cost", {}),
        "diagnostics": evaluation.get("diagnostics", {}),
        "sanity": evaluation["sanity"],
        "timing": timing,
        "tune": tune,
        "artifacts": artifacts,
        "device": str(device),
        "torch": torch.__version__,
        "runtime": runtime_record(device),
    }
