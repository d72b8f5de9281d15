"""Response bodies of the REST API (requests are `igat_core.spec.ExperimentSpec` and
`igat_core.study_spec.StudySpec` themselves). Stored JSON is served in `service.storable`'s form, so a row written
before that convention (a NaN in SQLite) is strict JSON too."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service import studies
from service.models import Artifact, Event, Experiment, Metric, Study
from service.storable import public_error, storable_json

Status = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class Links(BaseModel):
    self: str
    events: str
    metrics: str
    results: str
    artifacts: str
    cancel: str


class ExperimentOut(BaseModel):
    id: str
    name: str
    status: Status
    priority: int
    attempt: int = Field(description="starts so far; grows when a lost run is re-queued")
    error: str | None = None
    study_id: str | None = Field(None, description="the study this experiment belongs to")
    depends_on: str | None = Field(None, description="the experiment whose pretrained base this one loads; it is "
                                   "claimed only once that base is ready")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    links: Links

    @classmethod
    def of(cls, e: Experiment) -> ExperimentOut:
        return cls(
            id=e.id, name=e.name, status=e.status, priority=e.priority, attempt=e.attempt,  # type: ignore[arg-type]
            error=public_error(e.error),
            study_id=e.study_id, depends_on=e.depends_on, created_at=e.created_at, started_at=e.started_at,
            finished_at=e.finished_at, updated_at=e.updated_at, links=_links(e.id),
        )


class ExperimentDetail(ExperimentOut):
    spec: dict[str, Any] = Field(description="the validated ExperimentSpec, defaults filled in")

    @classmethod
    def of(cls, e: Experiment) -> ExperimentDetail:
        return cls(**ExperimentOut.of(e).model_dump(), spec=storable_json(e.spec))


class ExperimentPage(BaseModel):
    items: list[ExperimentOut]
    total: int
    limit: int
    offset: int


class EventOut(BaseModel):
    seq: int = Field(description="1, 2, ... per experiment; the SSE id")
    time: datetime
    phase: str | None
    kind: str = Field(description="status | started | finished | failed | epoch | progress | waiting | message | ... "
                      "(service/README.md lists every kind and its data)")
    message: str
    data: dict[str, Any] | None = None

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(seq=e.seq, time=e.time, phase=e.phase, kind=e.kind, message=e.message,
                   data=storable_json(e.data) if e.data is not None else None)


class MetricOut(BaseModel):
    phase: str
    epoch: int
    values: dict[str, Any]
    updated_at: datetime

    @classmethod
    def of(cls, m: Metric) -> MetricOut:
        return cls(phase=m.phase, epoch=m.epoch, values=storable_json(m.values), updated_at=m.updated_at)


class MetricPage(BaseModel):
    items: list[MetricOut]
    total: int
    limit: int
    offset: int


class ArtifactOut(BaseModel):
    path: str
    size: int
    url: str

    @classmethod
    def of(cls, experiment_id: str, a: Artifact | tuple[str, int]) -> ArtifactOut:
        path, size = (a.path, a.size) if isinstance(a, Artifact) else a
        return cls(path=path, size=size, url=f"/results/{experiment_id}/artifacts/{path}")


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class StudyLinks(BaseModel):
    self: str
    results: str
    cancel: str


class StudyOut(BaseModel):
    id: str
    name: str
    status: Status = Field(description="queued | running | cancelling while runs are unfinished; then succeeded "
                           "(every run), cancelled (the study was cancelled) or failed")
    priority: int
    runs: int = Field(description="experiments in the study's plan")
    counts: dict[Status, int] = Field(description="runs per status")
    progress: float = Field(ge=0.0, le=1.0, description="the fraction of runs that have finished")
    cancel_requested_at: datetime | None = None
    created_at: datetime
    updated_at: datetime
    links: StudyLinks

    @classmethod
    def of(cls, s: Study, experiments: list[Experiment]) -> StudyOut:
        return cls(
            id=s.id, name=s.name, status=studies.study_status(s, experiments), priority=s.priority,  # type: ignore[arg-type]
            runs=len(experiments), counts=studies.status_counts(experiments),  # type: ignore[arg-type]
            progress=studies.progress(experiments), cancel_requested_at=s.cancel_requested_at,
            created_at=s.created_at, updated_at=s.updated_at,
            links=StudyLinks(self=f"/studies/{s.id}", results=f"/studies/{s.id}/results",
                             cancel=f"/studies/{s.id}/cancel"),
        )


class StudyRunOut(BaseModel):
    id: str
    name: str
    arm: str
    variant: str | None = None
    point: dict[str, Any] = Field(description="the grid point: field path -> value")
    status: Status
    attempt: int
    base_of: str | None = Field(None, description="the planned experiment (by name) whose pretrained base it loads")
    depends_on: str | None = Field(None, description="that experiment's id")
    base_ready: bool = Field(description="this run's own pretrained base is finished (its dependents may start)")
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    links: Links

    @classmethod
    def of(cls, e: Experiment, planned: dict[str, Any]) -> StudyRunOut:
        return cls(
            id=e.id, name=e.name, arm=planned.get("arm", ""), variant=planned.get("variant"),
            point=planned.get("point") or {}, status=e.status, attempt=e.attempt,  # type: ignore[arg-type]
            base_of=planned.get("base_of"), depends_on=e.depends_on, base_ready=e.base_ready_at is not None,
            error=public_error(e.error), started_at=e.started_at, finished_at=e.finished_at, links=_links(e.id),
        )


class StudyDetail(StudyOut):
    spec: dict[str, Any] = Field(description="the validated StudySpec, defaults filled in")
    experiments: list[StudyRunOut] = Field(description="the study's runs in plan order")

    @classmethod
    def of(cls, s: Study, experiments: list[Experiment]) -> StudyDetail:
        plan = {row["name"]: row for row in s.plan}
        return cls(**StudyOut.of(s, experiments).model_dump(), spec=s.spec,
                   experiments=[StudyRunOut.of(e, plan.get(e.name, {})) for e in experiments])


class StudyPage(BaseModel):
    items: list[StudyOut]
    total: int
    limit: int
    offset: int


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]


class ErrorOut(BaseModel):
    detail: str


class Problem(BaseModel):
    loc: list[str | int] = Field(description="where: 'body', 'query', 'path' or 'header', then the field path")
    field: str = Field(description="the field path, dotted (body fields without the 'body.' prefix)")
    msg: str
    type: str


class InvalidOut(BaseModel):
    """A 422: the request's first problems (``service.app.MAX_REPORTED_PROBLEMS``), or one reason."""

    detail: list[Problem] | str
    message: str | None = Field(None, description="the listed problems in one line")
    omitted: int = Field(0, ge=0, description="problems found beyond those listed")


def _links(experiment_id: str) -> Links:
    base = f"/experiments/{experiment_id}"
    return Links(
        self=base, events=f"{base}/events", metrics=f"{base}/metrics", results=f"/results/{experiment_id}",
        artifacts=f"/results/{experiment_id}/artifacts", cancel=f"{base}/cancel",
    )
