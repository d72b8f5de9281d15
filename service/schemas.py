"""Response bodies of the REST API (requests are `igat_core.spec.ExperimentSpec` itself)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.models import Artifact, Event, Experiment, Metric

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
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    links: Links

    @classmethod
    def of(cls, e: Experiment) -> ExperimentOut:
        return cls(
            id=e.id, name=e.name, status=e.status, priority=e.priority, attempt=e.attempt, error=e.error,  # type: ignore[arg-type]
            created_at=e.created_at, started_at=e.started_at, finished_at=e.finished_at, updated_at=e.updated_at,
            links=_links(e.id),
        )


class ExperimentDetail(ExperimentOut):
    spec: dict[str, Any] = Field(description="the validated ExperimentSpec, defaults filled in")

    @classmethod
    def of(cls, e: Experiment) -> ExperimentDetail:
        return cls(**ExperimentOut.of(e).model_dump(), spec=e.spec)


class ExperimentPage(BaseModel):
    items: list[ExperimentOut]
    total: int
    limit: int
    offset: int


class EventOut(BaseModel):
    seq: int = Field(description="1, 2, ... per experiment; the SSE id")
    time: datetime
    phase: str | None
    kind: str = Field(description="status | started | finished | epoch | message")
    message: str
    data: dict[str, Any] | None = None

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(seq=e.seq, time=e.time, phase=e.phase, kind=e.kind, message=e.message, data=e.data)


class MetricOut(BaseModel):
    phase: str
    epoch: int
    values: dict[str, Any]
    updated_at: datetime

    @classmethod
    def of(cls, m: Metric) -> MetricOut:
        return cls(phase=m.phase, epoch=m.epoch, values=m.values, updated_at=m.updated_at)


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


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]


class ErrorOut(BaseModel):
    detail: str


def _links(experiment_id: str) -> Links:
    base = f"/experiments/{experiment_id}"
    return Links(
        self=base, events=f"{base}/events", metrics=f"{base}/metrics", results=f"/results/{experiment_id}",
        artifacts=f"/results/{experiment_id}/artifacts", cancel=f"{base}/cancel",
    )
