"""results.json: its one builder, for a whole run (`igat run`, the Ray runner) and for `igat eval`.

A results record holds the evaluation (accuracy per model, combiner and attack), the comparisons of one target
model against every other (`improvement_over`: Table 2's relative improvement; `gain_points`: the difference in
points; `improvement`: Table 2 against the reference), the attack cost, the diagnostics, the sanity checks, the
phases' timing, the alpha/beta search, the artifacts and where it ran. When an ensemble-aware attack (MORA, the
member-logit surrogates) ran, `adaptive_verdict` names for each model and combiner the strongest attack and how
many points it lies below each of the paper's attacks (PGD, AutoAttack) that ran; without one there is no adaptive
evaluation to judge, and the key is absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from igat_core.evaluate import ENSEMBLE_AWARE, PAPER_ATTACKS, UNIONS, point_differences, relative_improvement
from igat_core.runtime import runtime_record


def evaluation_section(evaluation: Mapping[str, Any], eps: float) -> dict:
    """results.json's `evaluation`: eps, the examples, accuracy[model][combiner][attack] and the eps sweep."""
    section = {"eps": eps, "n_examples": evaluation["n_examples"], **evaluation["accuracy"]}
    if evaluation.get("eps_sweep"):
        section["eps_sweep"] = evaluation["eps_sweep"]
    return section


def adaptive_verdict(accuracy: Mapping[str, Any]) -> dict:
    """{model: {combiner: {strongest, accuracy, below: {paper attack: points}}}}; empty when no ensemble-aware
    attack ran."""
    attacked = {m: {c: {a: v for a, v in acc.items() if a not in ("natural", *UNIONS)} for c, acc in by_c.items()}
                for m, by_c in accuracy.items()}
    if not any(a in ENSEMBLE_AWARE for by_c in attacked.values() for acc in by_c.values() for a in acc):
        return {}
    return {m: {c: _verdict(acc) for c, acc in by_c.items() if acc} for m, by_c in attacked.items()}


def _verdict(acc: Mapping[str, float]) -> dict:
    strongest = min(acc, key=acc.__getitem__)
    return {"strongest": strongest, "accuracy": acc[strongest],
            "below": {a: acc[a] - acc[strongest] for a in PAPER_ATTACKS if a in acc}}


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
    verdict = adaptive_verdict(evaluation["accuracy"])
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
        **({"adaptive_verdict": verdict} if verdict else {}),
        "timing": timing,
        "tune": tune,
        "artifacts": artifacts,
        "device": str(device),
        "torch": torch.__version__,
        "runtime": runtime_record(device),
    }
