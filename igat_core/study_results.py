"""A study's results.json: its runs and the paper's Tables 1-3 over seeds, built from the plan and each run's
outcome (its results.json, or its status and error). Torch-free, so the service builds it too.

- Table 1: per setting (variant and grid point without the seed) of the reference arm, model, combiner and attack:
  mean, sample std and n of the accuracy over seeds. Its last attacks per combiner are the runs' unions:
  `union_standard` (correct under natural and every attack but the ensemble-aware ones; only runs in which an
  ensemble-aware attack ran have it) and `union` (correct under natural and every attack that ran: the worst case).
- Table 2: per setting, combiner and attack: iGAT's relative improvement over the base ((igat - base) / base x 100,
  mean and std over seeds), and the paired differences igat - base and igat - each control with their 95 % t
  interval, paired by grid point (the base and the controls of a grid point may come from any of its arms).
- Table 3: per setting, arm, combiner and natural / PGD: the iGAT model of the arm over seeds, and the paired
  difference arm - reference arm with its interval.

A run that did not succeed is never dropped silently: every row counts it (`failed`, `pending`) and names it;
a succeeded run without the row's number is named in `missing_runs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from igat_core.spec import AttackName, Combiner, ExperimentSpec
from igat_core.stats import paired_difference, summarize
from igat_core.study_spec import PlannedExperiment, StudySpec

SUCCEEDED = "succeeded"
FAILED = "failed"
PENDING = "pending"
UNFINISHED_STATUSES = frozenset({PENDING, "queued", "running", "cancelling"})
MODEL_ORDER = ("base", "continued", "global_at", "igat")
COMBINER_ORDER: tuple[str, ...] = get_args(Combiner)
UNION_ORDER = ("union_standard", "union")
ATTACK_ORDER: tuple[str, ...] = (*get_args(AttackName), *UNION_ORDER)
TABLE3_ATTACKS = ("natural", "pgd")
TARGET_MODEL = "igat"


@dataclass(frozen=True)
class RunOutcome:
    """How one planned experiment ended: succeeded with its results.json, or a status (failed, cancelled, pending)
    with the error."""

    status: str
    results: Mapping[str, Any] | None = None
    error: str | None = None

    @classmethod
    def of_results(cls, results: Mapping[str, Any]) -> RunOutcome:
        return cls(SUCCEEDED, results)

    @classmethod
    def failure(cls, error: str, status: str = FAILED) -> RunOutcome:
        return cls(status, None, error)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED and self.results is not None


NOT_RUN = RunOutcome(PENDING)


@dataclass(frozen=True)
class Sample:
    """One seed's numbers: the runs they come from, their status, and accuracy[model][combiner][attack] (None
    unless the runs succeeded)."""

    runs: tuple[str, ...]
    status: str
    accuracy: Mapping[str, Any] | None

    def value(self, model: str, combiner: str, attack: str) -> float | None:
        return ((self.accuracy or {}).get(model) or {}).get(combiner, {}).get(attack)


def run_accuracy(outcome: RunOutcome) -> dict[str, Any] | None:
    if not outcome.succeeded:
        return None
    evaluation = outcome.results.get("evaluation", {})
    return {m: v for m, v in evaluation.items() if m in MODEL_ORDER and isinstance(v, dict)}


def run_sample(planned: PlannedExperiment, outcomes: Mapping[str, RunOutcome]) -> Sample:
    outcome = outcomes.get(planned.name, NOT_RUN)
    return Sample((planned.name,), outcome.status, run_accuracy(outcome))


def point_sample(runs: Sequence[PlannedExperiment], outcomes: Mapping[str, RunOutcome], reference_arm: str) -> Sample:
    """The reference arm's run of one grid point, with the models it lacks (controls trained in another arm of the
    point) taken from the point's other succeeded runs."""
    ordered = sorted(runs, key=lambda p: p.arm != reference_arm)
    first = run_sample(ordered[0], outcomes)
    if first.accuracy is None:
        return first
    merged, used = dict(first.accuracy), list(first.runs)
    for other in (run_sample(p, outcomes) for p in ordered[1:]):
        extra = {m: v for m, v in (other.accuracy or {}).items() if m not in merged}
        merged.update(extra)
        used += list(other.runs) if extra else []
    return Sample(tuple(used), first.status, merged)


# ----------------------------------------------------------------------------------------------- accounting


def _excluded(samples: Sequence[Sample]) -> dict:
    """The runs of the samples that did not succeed: failed (or cancelled) and not yet finished."""
    samples = list({s.runs: s for s in samples if s.status != SUCCEEDED}.values())
    failed = [r for s in samples if s.status != SUCCEEDED and s.status not in UNFINISHED_STATUSES for r in s.runs]
    pending = [r for s in samples if s.status in UNFINISHED_STATUSES for r in s.runs]
    return {"failed": len(failed), "pending": len(pending), "failed_runs": failed, "pending_runs": pending}


def measure(samples: Sequence[Sample], value: Callable[[Sample], float | None]) -> dict:
    """Mean, std and n of `value` over the succeeded samples; the others counted and named."""
    done = [s for s in samples if s.status == SUCCEEDED]
    values = [(s, value(s)) for s in done]
    missing = [r for s, v in values if v is None for r in s.runs]
    return {**summarize([v for _, v in values if v is not None]).record(),
            **_excluded(samples), "missing_runs": missing}


def measure_pairs(pairs: Sequence[tuple[Sample, Sample]], value_a: Callable[[Sample], float | None],
                  value_b: Callable[[Sample], float | None]) -> dict:
    """The paired difference value_a - value_b with its t interval over the pairs where both succeeded."""
    done = [(a, b, value_a(a), value_b(b)) for a, b in pairs if a.status == b.status == SUCCEEDED]
    found = [(x, y) for _, _, x, y in done if x is not None and y is not None]
    missing = list(dict.fromkeys(r for a, b, x, y in done if x is None or y is None for r in (*a.runs, *b.runs)))
    difference = paired_difference([x for x, _ in found], [y for _, y in found])
    return {**difference.record(), **_excluded([s for pair in pairs for s in pair]), "missing_runs": missing}


# ------------------------------------------------------------------------------------------------- grouping


def expected_models(spec: ExperimentSpec) -> list[str]:
    """The models a run of `spec` evaluates: base, its controls, iGAT (as the Runner trains them)."""
    return [m for m in MODEL_ORDER if m == "base" or (spec.igat.enabled and (m == TARGET_MODEL or m in spec.controls))]


def grouped(plan: Sequence[PlannedExperiment], key: Callable[[PlannedExperiment], str]
            ) -> dict[str, list[PlannedExperiment]]:
    groups: dict[str, list[PlannedExperiment]] = {}
    for planned in plan:
        groups.setdefault(key(planned), []).append(planned)
    return groups


def table_cells(runs: Sequence[PlannedExperiment], samples: Sequence[Sample]) -> list[tuple[str, str, str]]:
    """(model, combiner, attack) of every number the runs' specs ask for or their results hold, in table order."""
    cells = {(m, c, a) for r in runs for m in expected_models(r.spec) for c in r.spec.eval.combiners
             for a in r.spec.eval.attacks}
    cells |= {(m, c, a) for s in samples for m, by_c in (s.accuracy or {}).items() for c, by_a in by_c.items()
              for a in by_a if c in COMBINER_ORDER and a in ATTACK_ORDER}
    return sorted(cells, key=lambda k: (MODEL_ORDER.index(k[0]), COMBINER_ORDER.index(k[1]),
                                        ATTACK_ORDER.index(k[2])))


def _label(planned: PlannedExperiment) -> dict:
    return {"setting": planned.setting, "method": planned.spec.base.method}


# ---------------------------------------------------------------------------------------------------- tables


def table1(plan: Sequence[PlannedExperiment], outcomes: Mapping[str, RunOutcome], reference_arm: str) -> list[dict]:
    """Rows of (setting, method, model, combiner, attack) over the seeds of the reference arm."""
    rows = []
    for runs in grouped([p for p in plan if p.arm == reference_arm], lambda p: p.setting).values():
        samples = [run_sample(r, outcomes) for r in runs]
        for model, combiner, attack in table_cells(runs, samples):
            rows.append({**_label(runs[0]), "model": model, "combiner": combiner, "attack": attack,
                         **measure(samples, lambda s, k=(model, combiner, attack): s.value(*k))})
    return rows


def _relative_improvement(sample: Sample, combiner: str, attack: str) -> float | None:
    base, target = sample.value("base", combiner, attack), sample.value(TARGET_MODEL, combiner, attack)
    if base is None or target is None or base == 0:
        return None
    # Table 2: (iGAT - original) / original x 100
    return 100.0 * (target - base) / base


def table2(plan: Sequence[PlannedExperiment], outcomes: Mapping[str, RunOutcome], reference_arm: str) -> dict:
    """iGAT's relative improvement over the base, and the paired differences igat - base and igat - control."""
    relative, paired = [], []
    for runs in grouped(plan, lambda p: p.setting).values():
        points = grouped(runs, lambda p: p.pairing).values()
        samples = [point_sample(point, outcomes, reference_arm) for point in points]
        cells = table_cells(runs, samples)
        references = [m for m in MODEL_ORDER if m != TARGET_MODEL and any(k[0] == m for k in cells)]
        for combiner, attack in dict.fromkeys((c, a) for m, c, a in cells if m == TARGET_MODEL):
            relative.append({**_label(runs[0]), "combiner": combiner, "attack": attack,
                             **measure(samples, lambda s, c=combiner, a=attack: _relative_improvement(s, c, a))})
            paired += [{**_label(runs[0]), "comparison": f"{TARGET_MODEL} - {m}", "combiner": combiner,
                        "attack": attack, **measure_pairs([(s, s) for s in samples],
                                                          lambda s, c=combiner, a=attack: s.value(TARGET_MODEL, c, a),
                                                          lambda s, c=combiner, a=attack, m=m: s.value(m, c, a))}
                       for m in references]
    return {"relative_improvement": relative, "paired": paired}


def table3(plan: Sequence[PlannedExperiment], outcomes: Mapping[str, RunOutcome], reference_arm: str) -> list[dict]:
    """Rows of (setting, arm, combiner, natural / PGD): the arm's iGAT model over seeds, and arm - reference."""
    rows = []
    for runs in grouped(plan, lambda p: p.setting).values():
        reference = {p.pairing: run_sample(p, outcomes) for p in runs if p.arm == reference_arm}
        for arm, arm_runs in grouped(runs, lambda p: p.arm).items():
            samples = [run_sample(r, outcomes) for r in arm_runs]
            pairs = [(s, reference[r.pairing]) for r, s in zip(arm_runs, samples) if r.pairing in reference]
            combiners = dict.fromkeys(c for r in arm_runs for c in r.spec.eval.combiners)
            for combiner in combiners:
                rows += [_table3_row(arm_runs[0], combiner, attack, samples, pairs, arm == reference_arm)
                         for attack in TABLE3_ATTACKS]
    return rows


def _table3_row(planned: PlannedExperiment, combiner: str, attack: str, samples: Sequence[Sample],
                pairs: Sequence[tuple[Sample, Sample]], is_reference: bool) -> dict:
    def value(s: Sample) -> float | None:
        return s.value(TARGET_MODEL, combiner, attack)

    return {**_label(planned), "arm": planned.arm, "combiner": combiner, "attack": attack,
            **measure(samples, value), "difference": None if is_reference else measure_pairs(pairs, value, value)}


# ------------------------------------------------------------------------------------------------ the record


def run_rows(plan: Sequence[PlannedExperiment], outcomes: Mapping[str, RunOutcome]) -> list[dict]:
    return [{"name": p.name, "arm": p.arm, "variant": p.variant, "point": dict(p.point), "base_of": p.base_of,
             "method": p.spec.base.method, "status": outcomes.get(p.name, NOT_RUN).status,
             "error": outcomes.get(p.name, NOT_RUN).error} for p in plan]


def study_record(study: StudySpec, plan: Sequence[PlannedExperiment], outcomes: Mapping[str, RunOutcome]) -> dict:
    """The study's results.json: its runs with their status, the counts, and the tables the study asks for."""
    runs = run_rows(plan, outcomes)
    statuses = [r["status"] for r in runs]
    counts = {"planned": len(runs), "succeeded": statuses.count(SUCCEEDED),
              "pending": sum(s in UNFINISHED_STATUSES for s in statuses)}
    counts["failed"] = counts["planned"] - counts["succeeded"] - counts["pending"]
    builders = {"table1": table1, "table2": table2, "table3": table3}
    return {"name": study.name, "kind": "study", "description": study.description,
            "reference_arm": study.reference_arm, "tables": list(study.tables), "counts": counts, "runs": runs,
            **{t: builders[t](plan, outcomes, study.reference_arm) for t in study.tables}}
