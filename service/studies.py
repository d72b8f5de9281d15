"""Studies on the service: the request hash of a submission, a study's status and progress from its experiments,
and its results (`igat_core.study_results.study_record` over the runs' results.json and their status).

Torch-free (the study modules of igat_core are). The database side is `service.store` (`create_study`,
`claim_next`'s dependency rule, `fail_blocked_dependents`); the routes are in `service.api`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from igat_core import rundir
from igat_core.spec import ExperimentSpec
from igat_core.study_results import RunOutcome, study_record
from igat_core.study_spec import PlannedExperiment, StudySpec
from service.models import (
    ACTIVE,
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    TERMINAL,
    Experiment,
    Study,
)
from service.storable import public_error


def request_hash(study: StudySpec, plan: Sequence[PlannedExperiment], priority: int) -> str:
    """The submission's identity: the study, its plan's order (keys are sorted here, but the order of the arms
    says which arm trains the shared base) and the priority."""
    canonical = json.dumps({"study": study.model_dump(mode="json"), "plan": [p.name for p in plan],
                            "priority": priority}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def status_counts(experiments: Sequence[Experiment]) -> dict[str, int]:
    """How many of the experiments are in each status (every status listed, zeros included)."""
    counts = dict.fromkeys(STATUSES, 0)
    for experiment in experiments:
        counts[experiment.status] += 1
    return counts


def study_status(study: Study, experiments: Sequence[Experiment]) -> str:
    """queued (nothing started yet), running, cancelling (a cancel is on its way), then succeeded (every run),
    cancelled (the study was cancelled) or failed (some run failed or was cancelled on its own)."""
    statuses = [e.status for e in experiments]
    if any(s not in TERMINAL for s in statuses):
        if study.cancel_requested_at is not None:
            return CANCELLING
        started = any(s in ACTIVE or s in TERMINAL for s in statuses) or any(e.attempt for e in experiments)
        return RUNNING if started else QUEUED
    if all(s == SUCCEEDED for s in statuses):
        return SUCCEEDED
    return CANCELLED if study.cancel_requested_at is not None else FAILED


def progress(experiments: Sequence[Experiment]) -> float:
    """The fraction of the study's runs that have finished (succeeded, failed or cancelled)."""
    if not experiments:
        return 1.0
    return sum(e.status in TERMINAL for e in experiments) / len(experiments)


def planned(study: Study, experiments: Sequence[Experiment]) -> list[PlannedExperiment]:
    """The study's plan as it was submitted (study.plan), each with the spec its experiment runs."""
    specs = {e.name: e.spec for e in experiments}
    return [PlannedExperiment(row["name"], ExperimentSpec.model_validate(specs[row["name"]]), row["arm"],
                              row["variant"], row["point"], row["base_of"])
            for row in study.plan if row["name"] in specs]


def outcome(experiment: Experiment, run_dir: Path) -> RunOutcome:
    """The experiment's RunOutcome: its results.json once succeeded, else its status and error."""
    if experiment.status == SUCCEEDED:
        results = rundir.read_results(run_dir)
        if results is not None:
            return RunOutcome.of_results(results)
        return RunOutcome.failure(f"succeeded, but its {rundir.RESULTS_FILE} is missing")
    if experiment.status in (FAILED, CANCELLED):
        return RunOutcome.failure(public_error(experiment.error) or experiment.status, status=experiment.status)
    return RunOutcome(experiment.status)


def results(study: Study, experiments: Sequence[Experiment], artifact_root: Path) -> dict[str, Any]:
    """The study's results.json, as `igat study` writes it, plus the study's id: pending runs counted as pending."""
    outcomes = {e.name: outcome(e, _run_dir(e, artifact_root)) for e in experiments}
    # the stored spec was validated when it was submitted; study_record reads only its name, description,
    # reference arm and tables, so it is not validated again (a later release must still read old studies)
    spec = StudySpec.model_construct(**study.spec)
    return {"id": study.id, **study_record(spec, planned(study, experiments), outcomes)}


def _run_dir(experiment: Experiment, artifact_root: Path) -> Path:
    return Path(experiment.run_dir) if experiment.run_dir else rundir.run_dir_of(artifact_root, experiment.id)

