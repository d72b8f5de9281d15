"""`igat study`: a study's planned experiments run one after another in this process, each in its own run
directory under DIR/runs/ (igat_core.rundir.study_run_dir), then the study's results.json and report.md in DIR.

An experiment with `base_of` loads the base ensemble its base experiment pretrained (`base.checkpoint`), method
state included, and the standard transfer source it trained (`eval.transfer_from`) when it shares it. A rerun
resumes: study.json must hold the same plan, each Runner skips its finished phases, and runs that failed are tried
again. A run that raises is recorded as failed and the study goes on.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from igat_core.rundir import RESULTS_FILE, STUDY_FILE, RunLog, read_json, study_run_dir, write_json_atomic
from igat_core.study_report import write_study_report
from igat_core.study_results import RunOutcome, study_record
from igat_core.study_spec import (PlannedExperiment, StudySpec, plan_record, plan_study, shared_checkpoints,
                                  with_checkpoints)


def check_same_plan(study: StudySpec, plan: list[PlannedExperiment], out: Path) -> None:
    """Write study.json into a new study directory; refuse one that holds a different study."""
    record = json.loads(json.dumps(plan_record(study, plan)))
    found = read_json(out / STUDY_FILE)
    if found is not None and found != record:
        raise RuntimeError(f"{out} holds a different study; use another --out directory")
    if found is None:
        write_json_atomic(out / STUDY_FILE, record)


SHARED_TITLES = {"base.checkpoint": "pretrained base", "eval.transfer_from": "transfer source"}


def run_planned(planned: PlannedExperiment, out: Path, *, progress: bool) -> RunOutcome:
    """Run one planned experiment (resuming it); any exception becomes a failed outcome."""
    from igat_core.runner import run_experiment

    run_dir = study_run_dir(out, planned.name)
    shared = shared_checkpoints(planned, study_run_dir(out, planned.base_of)) if planned.base_of else {}
    missing = [f"{SHARED_TITLES[field]} {path}" for field, path in shared.items() if not path.is_file()]
    if missing:
        return RunOutcome.failure(f"its base experiment {planned.base_of} left no {', '.join(missing)}")
    spec = with_checkpoints(planned.spec, {field: path.resolve() for field, path in shared.items()})
    try:
        return RunOutcome.of_results(run_experiment(spec, run_dir, progress=progress))
    except Exception as exc:  # noqa: BLE001 - one run's failure is recorded and the study goes on
        error = f"{type(exc).__name__}: {exc}"
        if run_dir.is_dir():
            RunLog(run_dir).event("run", "failed", error, traceback=traceback.format_exc())
        return RunOutcome.failure(error)


def run_study(study: StudySpec, out: str | Path, *, progress: bool = True,
              echo: Callable[[str], None] = print) -> dict:
    """Every planned experiment in plan order, then the study's results.json and report.md; returns the record."""
    out = Path(out)
    plan = plan_study(study)
    out.mkdir(parents=True, exist_ok=True)
    check_same_plan(study, plan, out)
    outcomes: dict[str, RunOutcome] = {}
    for i, planned in enumerate(plan, 1):
        started = time.perf_counter()
        outcomes[planned.name] = outcome = run_planned(planned, out, progress=progress)
        shown = outcome.status if outcome.succeeded else f"{outcome.status}: {outcome.error}"
        echo(f"[{i}/{len(plan)}] {planned.name}: {shown} ({time.perf_counter() - started:.1f}s)")
    record = study_record(study, plan, outcomes)
    write_json_atomic(out / RESULTS_FILE, record)
    write_study_report(record, out)
    return record
