"""The database schema (SQLAlchemy 2 typed ORM). The ``experiments`` table is also the queue; a study is a row of
``studies`` and the experiments its plan expands into (``study_id``, in plan order ``study_position``), some of them
waiting on another experiment's pretrained base (``depends_on``, ready once ``base_ready_at`` is set).

Change a model -> add an Alembic revision (``alembic -c service/alembic.ini revision --autogenerate``);
``tests/test_service_migrations.py`` fails when models and migrations drift.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from igat_core.rundir import EVENTS_FILE

QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

STATUSES = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({RUNNING, CANCELLING})

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores it naive; we put the UTC back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[dict[str, Any]]: JSON()}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, doc="the validated StudySpec, defaults filled in")
    plan: Mapped[list[dict[str, Any]]] = mapped_column(
        JSON, doc="the plan as submitted: name, arm, variant, point, base_of of each experiment, in plan order")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    cancel_requested_at: Mapped[datetime | None]
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), doc="its parent run in MLflow (service.tracking)")
    tracked_at: Mapped[datetime | None] = mapped_column(doc="when its MLflow run was ended")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0, doc="starts so far (a claim adds one)")
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))

    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    executor: Mapped[str | None] = mapped_column(String(32))
    executor_handle: Mapped[dict[str, Any] | None] = mapped_column(JSON, doc="executor-specific: pid, pgid, ...")
    run_dir: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)

    study_id: Mapped[str | None] = mapped_column(ForeignKey("studies.id"), index=True)
    study_position: Mapped[int | None] = mapped_column(Integer, doc="0, 1, ... in the study's plan order")
    depends_on: Mapped[str | None] = mapped_column(
        ForeignKey("experiments.id"), index=True, doc="the experiment whose pretrained base this one loads")
    base_ready_at: Mapped[datetime | None] = mapped_column(
        doc="when this run's pretrained base was finished (its pretrain phase ended); dependents wait for it")

    last_seq: Mapped[int] = mapped_column(Integer, default=0, doc="seq of the newest event (allocated on this row)")
    events_ingested: Mapped[int] = mapped_column(Integer, default=0, doc=f"lines of {EVENTS_FILE} already stored")
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), doc="its run in MLflow (service.tracking)")
    tracked_at: Mapped[datetime | None] = mapped_column(
        doc="when its MLflow run was ended: everything it produced is logged there")

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled')", name="status"
        ),
        Index("ix_experiments_queue", "status", "priority", "created_at"),
    )


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer, doc="1, 2, ... per experiment; the SSE id")
    time: Mapped[datetime] = mapped_column(default=utcnow)
    phase: Mapped[str | None] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32), doc="started | finished | epoch | progress | message | status | ...")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (UniqueConstraint("experiment_id", "seq"),)


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    phase: Mapped[str] = mapped_column(String(32))
    epoch: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (UniqueConstraint("experiment_id", "phase", "epoch"),)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024), doc="relative to the run directory, '/'-separated")
    size: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("experiment_id", "path"),)
