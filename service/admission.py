"""What the service admits beyond the spec's own validation: checkpoints only from allowed places, and ensembles
within the size limits. Applied when an experiment or a study is submitted; a refusal is a 422 naming the field.

`base.checkpoint` and `eval.transfer_from` (unless `standard`: the run trains that source) are each either
- an absolute path that, with symlinks and `..` resolved, lies inside an allowed root: the artifact root, the data
  root, or one of IGAT_CHECKPOINT_ROOTS. Raw paths into other experiments' run directories are allowed (they are
  inside the artifact root, where the study planner also points dependents at their base's checkpoint); or
- `experiment:<id>[/<model>]`, the saved ensemble `model` (default base) of another experiment, which must exist.

An accepted checkpoint is stored as its resolved absolute path, so the runner (whatever its working directory)
loads the very file that was checked. A path outside the roots is refused with the same reason whether or not a
file is there; only inside the roots does the reason say that a file is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from igat_core.rundir import model_checkpoint, run_dir_of
from igat_core.spec import (STANDARD_TRANSFER_SOURCE, CheckpointReference, ExperimentSpec, checkpoint_reference,
                            size_problems)
from igat_core.study_spec import MAX_PROBLEMS, PlannedExperiment, StudySpec, with_checkpoints
from service import store
from service.settings import Settings

CHECKPOINT_FIELD = "base.checkpoint"
TRANSFER_FIELD = "eval.transfer_from"
OUTSIDE_ROOTS = ("is not inside an allowed checkpoint root (the artifact root, the data root, IGAT_CHECKPOINT_ROOTS); "
                 "name another experiment's ensemble as experiment:<id>[/<model>]")


class Refused(ValueError):
    """A submission the service does not run; `problems` lists (field path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))


def allowed_roots(settings: Settings) -> list[Path]:
    roots = [settings.artifact_root, *([settings.data_root] if settings.data_root else []), *settings.checkpoint_roots]
    return [Path(root).resolve() for root in roots]


def inside_allowed_roots(path: Path, settings: Settings) -> bool:
    return any(path.is_relative_to(root) for root in allowed_roots(settings))


def _referenced(reference: CheckpointReference, settings: Settings, session: Session) -> Path:
    try:
        experiment = store.get_experiment(session, reference.experiment_id)
    except store.NotFound:
        raise ValueError(f"no experiment {reference.experiment_id}") from None
    run_dir = Path(experiment.run_dir) if experiment.run_dir else run_dir_of(settings.artifact_root, experiment.id)
    path = (run_dir / model_checkpoint(reference.model)).resolve()
    if not inside_allowed_roots(path, settings) or not path.is_file():
        raise ValueError(f"experiment {experiment.id} has no {reference.model} checkpoint (it is {experiment.status})")
    return path


def resolve_checkpoint(value: str, settings: Settings, session: Session) -> str:
    """The resolved absolute path of the checkpoint `value` names, or ValueError with a one-line reason."""
    reference = checkpoint_reference(value)
    if reference is not None:
        return str(_referenced(reference, settings, session))
    path = Path(value)
    if not path.is_absolute():
        raise ValueError("must be an absolute path or experiment:<id>[/<model>] (a relative path would depend on "
                         "the runner's working directory)")
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop; refused like any path outside the roots
        raise ValueError(OUTSIDE_ROOTS) from None
    if not inside_allowed_roots(resolved, settings):
        raise ValueError(OUTSIDE_ROOTS)
    if not resolved.is_file():
        raise ValueError("no checkpoint file at this path")
    return str(resolved)


def checkpoint_fields(spec: ExperimentSpec) -> dict[str, str]:
    """The checkpoints `spec` loads, by field: the base's, and the transfer attack's source unless the run trains
    it (`standard`)."""
    found = {CHECKPOINT_FIELD: spec.base.checkpoint, TRANSFER_FIELD: spec.eval.transfer_from}
    return {f: v for f, v in found.items() if v and not (f == TRANSFER_FIELD and v == STANDARD_TRANSFER_SOURCE)}


def _admitted_checkpoints(spec: ExperimentSpec, settings: Settings, session: Session,
                          problems: list[tuple[str, str]]) -> ExperimentSpec:
    """`spec` with every checkpoint resolved; each refused one appended to `problems` under its field."""
    resolved = {}
    for path, value in checkpoint_fields(spec).items():
        try:
            resolved[path] = resolve_checkpoint(value, settings, session)
        except ValueError as exc:
            problems.append((path, str(exc)))
    return with_checkpoints(spec, resolved)


def admit_experiment(spec: ExperimentSpec, settings: Settings, session: Session) -> ExperimentSpec:
    """`spec` as it will run (its checkpoints resolved), or Refused naming each problem's field."""
    problems = size_problems(spec, settings.size_limits)
    spec = _admitted_checkpoints(spec, settings, session, problems)
    if problems:
        raise Refused(problems)
    return spec


def _from_study_experiment(base: ExperimentSpec, planned: PlannedExperiment, problem: tuple[str, str],
                           base_sizes: set[tuple[str, str]]) -> bool:
    """Whether the study's own `experiment` already has `problem` (rather than a variant, grid value or arm)."""
    if problem[0] in (CHECKPOINT_FIELD, TRANSFER_FIELD):
        own = checkpoint_fields(base).get(problem[0])
        return own is not None and checkpoint_fields(planned.spec).get(problem[0]) == own
    return problem in base_sizes


def admit_plan(study: StudySpec, plan: Sequence[PlannedExperiment], settings: Settings,
               session: Session) -> list[PlannedExperiment]:
    """The plan as it will run (checkpoints resolved), or Refused naming each problem's field: under `experiment.`
    when the study's own experiment has it, else under `experiments.<name>.`."""
    base = ExperimentSpec.model_validate(study.experiment)  # StudySpec validated it
    base_sizes = set(size_problems(base, settings.size_limits))
    problems: list[tuple[str, str]] = []
    admitted = []
    for planned in plan:
        try:
            admitted.append(dataclasses.replace(planned, spec=admit_experiment(planned.spec, settings, session)))
        except Refused as exc:
            problems += [(f"experiment.{path}" if _from_study_experiment(base, planned, (path, reason), base_sizes)
                          else f"experiments.{planned.name}.{path}", reason) for path, reason in exc.problems]
    if problems:
        raise Refused(list(dict.fromkeys(problems))[:MAX_PROBLEMS])
    return admitted
