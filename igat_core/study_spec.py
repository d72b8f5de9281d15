"""StudySpec: one YAML for a reproducible study, and its plan, the ordered experiments it expands into.

A study is a base experiment (`experiment`, an ExperimentSpec mapping), optional named `variants` (each a set of
overrides, e.g. one per base method), a `grid` over dotted field paths (cartesian product, e.g. `seed`,
`igat.beta`), named `arms` applied on top of every grid point (the ablation of Table 3: they may change only
`igat.*` and `controls`, so they share the pretrained base), and the `tables` to build. An override `path: value`
replaces what the experiment holds at `path` (a mapping value replaces the whole section).

`plan_study` is pure and torch-free, so the service expands a study the same way `igat study` does: every planned
experiment has a stable name, its ExperimentSpec, and `base_of`, the experiment whose pretrained base it loads
(None: it trains its own). Experiments share a base exactly when their specs agree after removing the fields that
act after pretraining (`SHARED_BASE_EXCLUDED`), the resources that change the pretraining's arithmetic
(`SHARED_BASE_RESOURCES`) kept; the first of each group in plan order trains it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from igat_core.rundir import TRANSFER_SOURCE, model_checkpoint
from igat_core.spec import STANDARD_TRANSFER_SOURCE, ExperimentSpec, SpecError, validation_problems

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
TableName = Literal["table1", "table2", "table3"]
SEED_AXIS = "seed"
DEFAULT_ARM = "igat"
ARM_SECTIONS = ("igat", "controls")
SHARED_BASE_EXCLUDED = frozenset({"name", "igat", "controls", "eval", "tune", "resources"})
#: The `resources` that change a pretraining's arithmetic, so that bases trained with other values are not shared.
SHARED_BASE_RESOURCES = ("threads", "channels_last", "precision")
MAX_EXPERIMENTS = 2000
MAX_PROBLEMS = 20
MAX_ENTRIES = 256
MAX_DEPTH = 16

Name = Annotated[str, Field(min_length=1, max_length=48, pattern=NAME_PATTERN)]
FieldPath = Annotated[str, Field(min_length=1, max_length=256)]
Overrides = Annotated[dict[FieldPath, Any], Field(max_length=MAX_ENTRIES)]


def non_finite_problems(value: Any, path: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(field path, reason) for every NaN or infinite number inside `value`, and for nesting deeper than MAX_DEPTH
    (what the study's free-form fields hold becomes spec values only after expansion)."""
    where = path or "(root)"
    if isinstance(value, float) and not math.isfinite(value):
        return [(where, f"must be a finite number, got {value}")]
    if isinstance(value, dict | list) and depth >= MAX_DEPTH:
        return [(where, f"nested deeper than {MAX_DEPTH} levels")]
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return []
    return [problem for sub, v in items for problem in non_finite_problems(v, sub, depth + 1)][:MAX_PROBLEMS]


class StudyProblems(ValueError):
    """Problems found after the study's shape validated, each with the field path it concerns."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))


class StudySpecError(SpecError):
    """A study that cannot be planned; `problems` lists (field path, reason) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        super().__init__(source, problems)
        lines = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        self.args = (f"invalid study spec {source}:\n{lines}",)


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    description: str = Field("", max_length=4096)
    experiment: dict[str, Any] = Field(default_factory=dict, description="the base ExperimentSpec of every run")
    variants: dict[Name, Overrides] = Field(default_factory=dict, max_length=MAX_ENTRIES,
                                            description="named override sets, one grid axis (e.g. one per base "
                                            "method with its params and training)")
    grid: dict[FieldPath, Annotated[list[Any], Field(min_length=1, max_length=MAX_EXPERIMENTS)]] = Field(
        default_factory=dict, max_length=MAX_ENTRIES,
        description="dotted field path -> values; the cartesian product of all axes")
    arms: dict[Name, Overrides] = Field(default_factory=lambda: {DEFAULT_ARM: {}}, min_length=1,
                                        max_length=MAX_ENTRIES,
                                        description="named igat.* / controls overrides on every grid point")
    reference_arm: Name = Field(DEFAULT_ARM, description="the arm the others are compared with (Table 3)")
    tables: list[TableName] = Field(default_factory=lambda: ["table1", "table2"], max_length=3)

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        problems = non_finite_problems(data) if isinstance(data, dict) else []
        if problems:
            raise StudyProblems(problems)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        problems = study_problems(self)
        if problems:
            raise StudyProblems(problems)
        return self


# ---------------------------------------------------------------------------------------- field paths


def path_problem(path: str) -> str | None:
    """Why `path` names no field of ExperimentSpec (None when it does; any key inside a mapping field such as
    base.params is accepted)."""
    parts = path.split(".")
    model: type[BaseModel] | None = ExperimentSpec
    for i, part in enumerate(parts):
        if model is None:
            return None
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the experiment spec"
            return f"no field {part!r} in {where}; known: {', '.join(fields)}"
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif get_origin(annotation) is dict:
            model = None
        elif i < len(parts) - 1:
            return f"{'.'.join(parts[: i + 1])} is a value, not a section"
    return None


def set_path(data: dict, path: str, value: Any) -> None:
    """data[a][b][c] = value for path `a.b.c`, creating the sections on the way."""
    *sections, leaf = path.split(".")
    for name in sections:
        if not isinstance(data.get(name), dict):
            data[name] = {}
        data = data[name]
    data[leaf] = copy.deepcopy(value)


def _overlaps(path: str, loc: str) -> bool:
    return path == loc or loc.startswith(path + ".") or path.startswith(loc + ".")


# ------------------------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class Override:
    """One `path: value` of a variant, a grid value or an arm; `source` is the study field that set it."""

    source: str
    path: str
    value: Any
    index: int = 0


@dataclass(frozen=True)
class Cell:
    """One experiment of the study before validation: its name, where it sits, and the overrides that make it."""

    name: str
    variant: str | None
    point: dict[str, Any]
    arm: str
    overrides: tuple[Override, ...]


def _variant_overrides(study: StudySpec) -> list[tuple[str | None, tuple[Override, ...]]]:
    if not study.variants:
        return [(None, ())]
    return [(name, tuple(Override(f"variants.{name}.{p}", p, v) for p, v in values.items()))
            for name, values in study.variants.items()]


def _grid_overrides(study: StudySpec) -> list[tuple[Override, ...]]:
    axes = [[Override(f"grid.{path}[{i}]", path, v, i) for i, v in enumerate(values)]
            for path, values in study.grid.items()]
    return list(itertools.product(*axes))


def _arm_overrides(study: StudySpec, arm: str) -> tuple[Override, ...]:
    return tuple(Override(f"arms.{arm}.{p}", p, v) for p, v in study.arms[arm].items())


def _slug(value: Any, index: int) -> str:
    if isinstance(value, dict | list):
        return str(index)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(value))


def _point_label(point: tuple[Override, ...]) -> list[str]:
    """`leaf` + value for each grid axis: seed0, rulehard, beta0.5 (index for a mapping or list value)."""
    return [f"{o.path.split('.')[-1]}{_slug(o.value, o.index)}" for o in point]


def cells(study: StudySpec) -> Iterator[Cell]:
    """Every experiment of the study in plan order: variants, then grid points (axes in the order written), then
    arms."""
    for variant, variant_overrides in _variant_overrides(study):
        for point in _grid_overrides(study):
            for arm in study.arms:
                name = "-".join([study.name, *([variant] if variant else []), *_point_label(point), arm])
                yield Cell(name, variant, {o.path: o.value for o in point}, arm,
                           (*variant_overrides, *point, *_arm_overrides(study, arm)))


def experiment_data(study: StudySpec, cell: Cell) -> dict:
    """The ExperimentSpec mapping of `cell`: the study's experiment with the cell's overrides, named after it."""
    data = copy.deepcopy(study.experiment)
    for override in cell.overrides:
        set_path(data, override.path, override.value)
    data["name"] = cell.name
    return data


# ------------------------------------------------------------------------------------------- validation


def _attributed(exc: ValidationError, overrides: tuple[Override, ...], fallback: str) -> list[tuple[str, str]]:
    """The problems of one expanded spec, each charged to the last override that touched its field."""
    problems = []
    for loc, reason in validation_problems(exc):
        source = next((o for o in reversed(overrides) if _overlaps(o.path, loc)), None)
        if source is None:
            problems.append((fallback, reason if loc == "(root)" else f"{loc}: {reason}"))
        else:
            problems.append((source.source, reason if loc == source.path else f"{loc}: {reason}"))
    return problems


def _spec_problems(data: dict, overrides: tuple[Override, ...], fallback: str) -> list[tuple[str, str]]:
    try:
        ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        return _attributed(exc, overrides, fallback)
    return []


def _shape_problems(study: StudySpec) -> list[tuple[str, str]]:
    """Paths that name no field, arms that act before pretraining, repeated grid values, the reference arm."""
    problems = []
    for source, path in [*((f"variants.{v}.{p}", p) for v, o in study.variants.items() for p in o),
                         *((f"grid.{p}", p) for p in study.grid),
                         *((f"arms.{a}.{p}", p) for a, o in study.arms.items() for p in o)]:
        reason = "the study names each experiment" if path == "name" else path_problem(path)
        if reason:
            problems.append((source, reason))
    for arm, overrides in study.arms.items():
        problems += [(f"arms.{arm}.{p}", "an arm may change only igat.* and controls (settings after pretraining), "
                      "so that all arms of a grid point share one pretrained base") for p in overrides
                     if p.split(".")[0] not in ARM_SECTIONS]
    for path, values in study.grid.items():
        dumped = [json.dumps(v, sort_keys=True) for v in values]
        problems += [(f"grid.{path}[{i}]", f"repeats {values[i]!r}") for i, d in enumerate(dumped)
                     if d in dumped[:i]]
    return problems + _arm_problems(study)


def _arm_problems(study: StudySpec) -> list[tuple[str, str]]:
    if study.reference_arm not in study.arms:
        return [("reference_arm", f"{study.reference_arm!r} is not an arm; arms: {', '.join(study.arms)}")]
    if "table3" in study.tables and len(study.arms) < 2:
        return [("tables", f"table3 compares arms with the reference arm {study.reference_arm!r}: add another arm")]
    return []


def _cell_problems(study: StudySpec) -> list[tuple[str, str]]:
    """Every expanded experiment validates and has a name of its own. A problem no override explains is named
    after the first experiment that has it."""
    problems, names, unexplained = [], set(), set()
    for cell in cells(study):
        if cell.name in names:
            problems.append(("grid", f"two experiments would both be named {cell.name!r}"))
        names.add(cell.name)
        fallback = f"experiments.{cell.name}"
        for path, reason in _spec_problems(experiment_data(study, cell), cell.overrides, fallback):
            if path != fallback or reason not in unexplained:
                problems.append((path, reason))
            if path == fallback:
                unexplained.add(reason)
    return problems


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(problems))[:MAX_PROBLEMS]


def study_count(study: StudySpec) -> int:
    count = max(1, len(study.variants)) * len(study.arms)
    for values in study.grid.values():
        count *= len(values)
    return count


def _experiment_problems(study: StudySpec) -> list[tuple[str, str]]:
    try:
        ExperimentSpec.model_validate(study.experiment)
    except ValidationError as exc:
        return [("experiment" if loc == "(root)" else f"experiment.{loc}", reason)
                for loc, reason in validation_problems(exc)]
    return []


def study_problems(study: StudySpec) -> list[tuple[str, str]]:
    """(field path, reason) for everything wrong with a study whose shape validated; empty when it plans."""
    problems = _experiment_problems(study) or _shape_problems(study)
    if not problems and study_count(study) > MAX_EXPERIMENTS:
        problems = [("grid", f"expands to {study_count(study)} experiments; at most {MAX_EXPERIMENTS}")]
    return _unique(problems or _cell_problems(study))


# --------------------------------------------------------------------------------------------- reading


def parse_study(data: Any, source: str = "<study>") -> StudySpec:
    if not isinstance(data, dict):
        raise StudySpecError(source, [("(root)", "expected a mapping of study fields")])
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        raise StudySpecError(source, _study_problems(exc)) from None


def _study_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for error, (loc, reason) in zip(exc.errors(), validation_problems(exc)):
        found = (error.get("ctx") or {}).get("error")
        problems += found.problems if isinstance(found, StudyProblems) else [(loc, reason)]
    return problems


def load_study(path: str | Path) -> StudySpec:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise StudySpecError(str(path), [("(file)", exc.strerror or str(exc))]) from None
    except yaml.YAMLError as exc:
        raise StudySpecError(str(path), [("(yaml)", str(exc).replace("\n", " "))]) from None
    return parse_study(data, str(path))


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class PlannedExperiment:
    """One experiment of a study: its stable name, its spec, its arm, variant and grid point, and `base_of`, the
    experiment whose pretrained base it loads (None: it trains its own); `shares_transfer_source`: it also loads
    the transfer attack's standard source that `base_of` trains (both say `eval.transfer_from: standard`)."""

    name: str
    spec: ExperimentSpec
    arm: str
    variant: str | None = None
    point: Mapping[str, Any] = field(default_factory=dict)
    base_of: str | None = None
    shares_transfer_source: bool = False

    @property
    def pairing(self) -> str:
        """The grid point without the arm: the runs of one pairing are compared with each other (Tables 2, 3)."""
        return json.dumps([self.variant, sorted(self.point.items())], sort_keys=True, default=str)

    @property
    def setting(self) -> str:
        """The variant and the grid point without the seed: the runs averaged over seeds in one row."""
        rest = [f"{path}={json.dumps(v, sort_keys=True)}" for path, v in self.point.items() if path != SEED_AXIS]
        return ", ".join([*([self.variant] if self.variant else []), *rest])

    def record(self) -> dict:
        return {"name": self.name, "arm": self.arm, "variant": self.variant, "point": dict(self.point),
                "base_of": self.base_of, "spec": self.spec.model_dump(mode="json")}


def shared_base_key(spec: ExperimentSpec) -> str:
    """What the pretrained base depends on: the spec without the settings that act after pretraining, with the
    resources that change its arithmetic."""
    key = spec.model_dump(mode="json", exclude=set(SHARED_BASE_EXCLUDED))
    key["resources"] = {name: getattr(spec.resources, name) for name in SHARED_BASE_RESOURCES}
    return json.dumps(key, sort_keys=True)


def plan_study(study: StudySpec) -> list[PlannedExperiment]:
    """The study's experiments in a deterministic order; the first of each shared-base group trains the base and
    the others name it in `base_of` (none when the spec already loads a `base.checkpoint`), and share its standard
    transfer source when both train one (it depends on the same data, ensemble, base.train and seed)."""
    planned: list[PlannedExperiment] = []
    trainers: dict[str, PlannedExperiment] = {}
    for cell in cells(study):
        spec = ExperimentSpec.model_validate(experiment_data(study, cell))
        key = shared_base_key(spec)
        trainer = None if spec.base.checkpoint else trainers.get(key)
        shares = trainer is not None and _trains_transfer_source(spec) and _trains_transfer_source(trainer.spec)
        planned.append(PlannedExperiment(cell.name, spec, cell.arm, cell.variant, cell.point,
                                         trainer.name if trainer else None, shares))
        trainers.setdefault(key, planned[-1])
    return planned


def _trains_transfer_source(spec: ExperimentSpec) -> bool:
    return spec.eval.transfer_from == STANDARD_TRANSFER_SOURCE


def plan_record(study: StudySpec, plan: list[PlannedExperiment]) -> dict:
    """study.json: the study as written and its plan."""
    return {"name": study.name, "study": study.model_dump(mode="json"),
            "experiments": [p.record() for p in plan]}


def shared_checkpoints(planned: PlannedExperiment, base_run_dir: Path) -> dict[str, Path]:
    """What `planned` loads from its base experiment's run directory, by spec field: the pretrained base ensemble
    (which carries the method's state, e.g. CLDL's label-confusion model) and the shared transfer source."""
    if planned.base_of is None:
        return {}
    found = {"base.checkpoint": base_run_dir / model_checkpoint("base")}
    if planned.shares_transfer_source:
        found["eval.transfer_from"] = base_run_dir / model_checkpoint(TRANSFER_SOURCE)
    return found


def with_checkpoints(spec: ExperimentSpec, checkpoints: Mapping[str, Path | str]) -> ExperimentSpec:
    """`spec` with each `section.field` of `checkpoints` set to its path."""
    data = spec.model_dump(mode="json")
    for path, checkpoint in checkpoints.items():
        section, name = path.split(".")
        data[section][name] = str(checkpoint)
    return ExperimentSpec.model_validate(data)
