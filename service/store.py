"""Every database operation of the control plane: the queue, status transitions, events, metrics, artifacts.

The state machine (one function, `transition`, performs every status change)::

    queued ──► running ──► succeeded | failed | cancelled
       │          │  └───► queued        (re-queued: dispatcher lost, run resumes from its checkpoints)
       │          └──────► cancelling ──► cancelled   (or succeeded | failed when the run finished first)
       ├─────────────────► cancelled
       └─────────────────► failed        (its base experiment ended without a pretrained base)

Terminal states never change. Each transition is one conditional UPDATE (``WHERE status IN (sources)``), so
two writers racing on one row cannot both win, on SQLite or PostgreSQL; the loser gets `IllegalTransition`.
Each transition also appends a ``status`` event, whose sequence number is allocated on the experiment row
(``last_seq``), the same counter the dispatcher uses for the run's own events: the SSE stream of an
experiment is one gap-free sequence 1, 2, 3, ...

Studies: `create_study` queues a study's experiments in plan order in one transaction; an experiment that loads
another's pretrained base has ``depends_on``, and `claim_next` passes it over until that experiment's
``base_ready_at`` is set (its pretrain phase finished, `ingest_events`; or it succeeded, `transition`).
`fail_blocked_dependents` fails the queued ones whose base experiment ended without a base.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from igat_core.rundir import artifact_files, run_dir_of
from igat_core.spec import ResourcesSpec
from igat_core.study_spec import PlannedExperiment, shared_checkpoints, with_checkpoints
from service.models import (
    ACTIVE,
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Artifact,
    Event,
    Experiment,
    Metric,
    Study,
    new_id,
    utcnow,
)
from service.storable import one_line, storable_json, storable_text
from workers.executors.processes import alive

#: from-state -> the states it may move to. Terminal states have no way out.
ALLOWED: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, CANCELLING, QUEUED}),
    CANCELLING: frozenset({CANCELLED, SUCCEEDED, FAILED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

MAX_MESSAGE = 10_000
T = TypeVar("T")
#: the phase of a run that makes its base ensemble (the Runner's), whose end makes the experiment's base ready
PRETRAIN = "pretrain"


class NotFound(LookupError):
    what = "experiment"

    def __init__(self, experiment_id: str):
        self.experiment_id = experiment_id
        shown = experiment_id if len(experiment_id) <= 64 else experiment_id[:64] + "..."
        super().__init__(f"no {self.what} with id {shown!r}")


class StudyNotFound(NotFound):
    what = "study"


class IllegalTransition(RuntimeError):
    def __init__(self, experiment_id: str, current: str, target: str):
        self.experiment_id = experiment_id
        self.current = current
        self.target = target
        super().__init__(f"experiment {experiment_id} is {current}; it cannot become {target}")


class IdempotencyConflict(ValueError):
    def __init__(self, key: str, existing_id: str, what: str = "experiment"):
        self.key = key
        self.existing_id = existing_id
        super().__init__(f"Idempotency-Key {key!r} was already used for a different request ({what} {existing_id})")


class StudyFinished(RuntimeError):
    def __init__(self, study_id: str):
        self.study_id = study_id
        super().__init__(f"every experiment of study {study_id} has already finished; nothing to cancel")


def plausible_id(experiment_id: str) -> bool:
    """Ids are UUID strings; anything else (NUL bytes, kilobytes of junk) is unknown without asking the DB."""
    return 0 < len(experiment_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in experiment_id)


def _sources(target: str) -> set[str]:
    return {source for source, targets in ALLOWED.items() if target in targets}


def transition(
    session: Session,
    experiment_id: str,
    to: str,
    *,
    from_: Iterable[str] | None = None,
    message: str | None = None,
    **fields: Any,
) -> Experiment:
    """Move one experiment to status ``to`` (and set ``fields``), or raise.

    ``from_`` narrows the allowed source states (a compare-and-swap: ``claim`` passes ``[queued]``).
    Raises `NotFound` for an unknown id and `IllegalTransition` when the current status does not allow it.
    """
    if to not in ALLOWED:
        raise ValueError(f"unknown status {to!r}")
    if not plausible_id(experiment_id):
        raise NotFound(experiment_id)
    sources = _sources(to)
    if from_ is not None:
        sources &= set(from_)
    now = utcnow()
    values: dict[str, Any] = {"status": to, "updated_at": now, "last_seq": Experiment.last_seq + 1,
                              **_public_fields(fields)}
    if to in TERMINAL:
        values.setdefault("finished_at", now)
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    stmt = (
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status.in_(sorted(sources)))
        .values(**values)
        .returning(Experiment.last_seq)
        .execution_options(synchronize_session=False)
    )
    seq = session.execute(stmt).scalar_one_or_none() if sources else None
    if seq is None:
        current = session.scalar(select(Experiment.status).where(Experiment.id == experiment_id))
        if current is None:
            raise NotFound(experiment_id)
        raise IllegalTransition(experiment_id, current, to)
    if to == SUCCEEDED:
        mark_base_ready(session, experiment_id)
    session.add(event_row(experiment_id, seq, RunEvent(now, None, "status", message or f"status: {to}",
                                                      {"status": to})))
    session.flush()
    experiment = session.get(Experiment, experiment_id, populate_existing=True)
    assert experiment is not None
    return experiment


# ----------------------------------------------------------------------------------------------- submit / read


def _insert_once(session: Session, row: T, earlier: Callable[[], T | None] | None) -> tuple[T, bool]:
    """Insert `row`, or return the row an earlier request with the same idempotency key made (`earlier` finds
    it; also when that request committed between the look-up and the insert); (row, created)."""
    found = earlier() if earlier is not None else None
    if found is not None:
        return found, False
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        found = earlier() if earlier is not None else None
        if found is None:
            raise
        return found, False
    return row, True


def create_experiment(
    session: Session,
    *,
    spec: dict[str, Any],
    name: str,
    priority: int = 0,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[Experiment, bool]:
    """Insert a queued experiment; returns (experiment, created).

    With an idempotency key already used for the same ``request_hash`` the first experiment comes back with
    ``created=False``; for another hash, `IdempotencyConflict`.
    """
    experiment = _queued(name=name, spec=spec, priority=priority, now=utcnow(), idempotency_key=idempotency_key,
                         request_hash=request_hash)
    earlier = (lambda: _by_key(session, idempotency_key, request_hash)) if idempotency_key is not None else None
    experiment, created = _insert_once(session, experiment, earlier)
    if not created:
        return experiment, False
    _add_queued_event(session, experiment)
    session.flush()
    return experiment, True


def _queued(*, name: str, spec: dict[str, Any], priority: int, now: datetime, **fields: Any) -> Experiment:
    return Experiment(name=name, spec=spec, status=QUEUED, priority=priority, attempt=0, last_seq=1,
                      events_ingested=0, created_at=now, updated_at=now, **fields)


def _add_queued_event(session: Session, experiment: Experiment) -> None:
    session.add(Event(experiment_id=experiment.id, seq=1, time=experiment.created_at, kind="status",
                      message="status: queued", data={"status": QUEUED}))


def _by_key(session: Session, key: str, request_hash: str | None) -> Experiment | None:
    existing = session.scalar(select(Experiment).where(Experiment.idempotency_key == key))
    if existing is not None and existing.request_hash != request_hash:
        raise IdempotencyConflict(key, existing.id)
    return existing


def get_experiment(session: Session, experiment_id: str) -> Experiment:
    if not plausible_id(experiment_id):
        raise NotFound(experiment_id)
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise NotFound(experiment_id)
    return experiment


def list_experiments(
    session: Session, *, statuses: Sequence[str] = (), limit: int = 50, offset: int = 0
) -> tuple[list[Experiment], int]:
    query = select(Experiment)
    count = select(func.count()).select_from(Experiment)
    if statuses:
        query = query.where(Experiment.status.in_(statuses))
        count = count.where(Experiment.status.in_(statuses))
    total = session.scalar(count) or 0
    rows = session.scalars(
        query.order_by(Experiment.created_at.desc(), Experiment.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def events_after(session: Session, experiment_id: str, after_seq: int, limit: int = 500) -> list[Event]:
    rows = session.scalars(
        select(Event)
        .where(Event.experiment_id == experiment_id, Event.seq > after_seq)
        .order_by(Event.seq)
        .limit(limit)
    ).all()
    return list(rows)


def metrics_page(
    session: Session, experiment_id: str, *, phase: str | None = None, limit: int = 500, offset: int = 0
) -> tuple[list[Metric], int]:
    conditions: list[ColumnElement[bool]] = [Metric.experiment_id == experiment_id]
    if phase is not None:
        conditions.append(Metric.phase == phase)
    total = session.scalar(select(func.count()).select_from(Metric).where(*conditions)) or 0
    rows = session.scalars(select(Metric).where(*conditions).order_by(Metric.id).limit(limit).offset(offset)).all()
    return list(rows), total


def list_artifacts(session: Session, experiment_id: str) -> list[Artifact]:
    return list(
        session.scalars(select(Artifact).where(Artifact.experiment_id == experiment_id).order_by(Artifact.path))
    )


# ---------------------------------------------------------------------------------------------------- studies


def create_study(
    session: Session,
    *,
    spec: dict[str, Any],
    plan: Sequence[PlannedExperiment],
    artifact_root: Path,
    priority: int = 0,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[Study, bool]:
    """Insert a study and its experiments, queued in plan order; returns (study, created).

    An experiment whose plan names a `base_of` depends on that experiment and loads its pretrained base from the
    run directory the dispatcher gives it (``artifact_root`` must be the dispatcher's). Idempotency as in
    `create_experiment`.
    """
    now = utcnow()
    study = Study(id=new_id(), name=spec["name"], spec=spec, plan=[_plan_row(p) for p in plan], priority=priority,
                  idempotency_key=idempotency_key, request_hash=request_hash, created_at=now, updated_at=now)
    earlier = (lambda: _study_by_key(session, idempotency_key, request_hash)) if idempotency_key is not None else None
    study, created = _insert_once(session, study, earlier)
    if not created:
        return study, False
    experiments = _study_experiments(study, plan, Path(artifact_root).resolve(), now)
    session.add_all(experiments)
    session.flush()
    for experiment in experiments:
        _add_queued_event(session, experiment)
    session.flush()
    return study, True


def _plan_row(planned: PlannedExperiment) -> dict[str, Any]:
    return {"name": planned.name, "arm": planned.arm, "variant": planned.variant, "point": dict(planned.point),
            "base_of": planned.base_of}


def _study_experiments(study: Study, plan: Sequence[PlannedExperiment], artifact_root: Path,
                       now: datetime) -> list[Experiment]:
    ids = {planned.name: new_id() for planned in plan}
    experiments = []
    for position, planned in enumerate(plan):
        spec, depends_on = planned.spec, ids[planned.base_of] if planned.base_of else None
        if depends_on is not None:
            spec = with_checkpoints(spec, shared_checkpoints(planned, run_dir_of(artifact_root, depends_on)))
        experiments.append(_queued(name=planned.name, spec=spec.model_dump(mode="json"), priority=study.priority,
                                   now=now, id=ids[planned.name], study_id=study.id, study_position=position,
                                   depends_on=depends_on))
    return experiments


def _study_by_key(session: Session, key: str, request_hash: str | None) -> Study | None:
    existing = session.scalar(select(Study).where(Study.idempotency_key == key))
    if existing is not None and existing.request_hash != request_hash:
        raise IdempotencyConflict(key, existing.id, what="study")
    return existing


def get_study(session: Session, study_id: str) -> Study:
    if not plausible_id(study_id):
        raise StudyNotFound(study_id)
    study = session.get(Study, study_id)
    if study is None:
        raise StudyNotFound(study_id)
    return study


def list_studies(session: Session, *, limit: int = 50, offset: int = 0) -> tuple[list[Study], int]:
    total = session.scalar(select(func.count()).select_from(Study)) or 0
    rows = session.scalars(select(Study).order_by(Study.created_at.desc(), Study.id).limit(limit).offset(offset))
    return list(rows), total


def study_experiments(session: Session, study_ids: Sequence[str]) -> dict[str, list[Experiment]]:
    """The experiments of each study, in plan order."""
    found: dict[str, list[Experiment]] = {study_id: [] for study_id in study_ids}
    if not study_ids:
        return found
    rows = session.scalars(select(Experiment).where(Experiment.study_id.in_(list(study_ids)))
                           .order_by(Experiment.study_id, Experiment.study_position))
    for row in rows:
        found[row.study_id].append(row)  # type: ignore[index]
    return found


def request_study_cancel(session: Session, study_id: str) -> Study:
    """Cancel every unfinished experiment of the study (`request_cancel` each); `StudyFinished` when none is."""
    study = get_study(session, study_id)
    pending = [e.id for e in study_experiments(session, [study_id])[study_id] if e.status not in TERMINAL]
    if not pending:
        raise StudyFinished(study_id)
    for experiment_id in pending:
        try:
            request_cancel(session, experiment_id)
        except IllegalTransition:
            continue  # it finished meanwhile
    session.execute(update(Study).where(Study.id == study_id, Study.cancel_requested_at.is_(None))
                    .values(cancel_requested_at=utcnow(), updated_at=utcnow())
                    .execution_options(synchronize_session=False))
    return session.get(Study, study_id, populate_existing=True) or study


def mark_base_ready(session: Session, experiment_id: str) -> None:
    """Record that the experiment's pretrained base is finished (once: the first time counts)."""
    session.execute(update(Experiment)
                    .where(Experiment.id == experiment_id, Experiment.base_ready_at.is_(None))
                    .values(base_ready_at=utcnow())
                    .execution_options(synchronize_session=False))


def fail_blocked_dependents(session: Session) -> list[Experiment]:
    """Fail the queued experiments whose base experiment ended (failed, cancelled) without a pretrained base:
    their dependency can never be met. Returns them."""
    base = aliased(Experiment)
    blocked = session.execute(
        select(Experiment.id, base.id, base.name, base.status)
        .join(base, Experiment.depends_on == base.id)
        .where(Experiment.status == QUEUED, base.status.in_(sorted(TERMINAL)), base.base_ready_at.is_(None))
        .order_by(Experiment.created_at, Experiment.study_position, Experiment.id)
    ).all()
    failed = []
    for experiment_id, base_id, base_name, base_status in blocked:
        why = f"its base experiment {base_name} ({base_id}) was {base_status} before its pretrained base was ready"
        try:
            failed.append(transition(session, experiment_id, FAILED, from_=[QUEUED], message=f"failed: {why}",
                                     error=why))
        except IllegalTransition:
            continue  # cancelled or failed by someone else meanwhile
    return failed


# ----------------------------------------------------------------------------------------------------- cancel


def request_cancel(session: Session, experiment_id: str) -> Experiment:
    """Queued: cancelled at once. Running: cancelling (the dispatcher stops the run). Cancelling: unchanged.

    Raises `IllegalTransition` for a finished experiment, `NotFound` for an unknown one.
    """
    try:
        return transition(session, experiment_id, CANCELLED, from_=[QUEUED], message="cancelled before it started")
    except IllegalTransition as exc:
        if exc.current == CANCELLING:
            return get_experiment(session, experiment_id)
        if exc.current != RUNNING:
            raise
    try:
        return transition(session, experiment_id, CANCELLING, from_=[RUNNING], message="cancel requested")
    except IllegalTransition as exc:
        if exc.current == CANCELLING:
            return get_experiment(session, experiment_id)
        raise


# ---------------------------------------------------------------------------------------------------- the queue


def dispatcher_identity() -> str:
    """``host:pid:random``; `owner_is_dead` reads the host and pid back."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` is a dispatcher on this host whose process is gone (no need to wait for its lease)."""
    if not owner:
        return True
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    return pid != os.getpid() and not alive(pid)


def claim_next(session: Session, *, owner: str, lease_s: float, executor: str,
               free_cpus: float | None = None) -> Experiment | None:
    """Claim the best ready experiment, or return None.

    Ready: queued, and either independent or depending on an experiment whose pretrained base is finished
    (``base_ready_at``). Best: highest priority, then oldest, then first in its study's plan, then id, so the order
    is the same on every backend. With ``free_cpus``, the best one is claimed only if its
    ``resources.requested_cpus`` fit (no smaller run overtakes it: the order stays the queue's).

    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent dispatchers
    never wait on each other. SQLite: the transaction already holds the write lock (BEGIN IMMEDIATE) and the
    UPDATE is a compare-and-swap on ``status='queued'``, so a row is claimed at most once either way.
    """
    postgres = session.get_bind().dialect.name == "postgresql"
    for _ in range(8):
        query = (select(Experiment.id, Experiment.spec).where(Experiment.status == QUEUED, _ready())
                 .order_by(*CLAIM_ORDER).limit(1))
        if postgres:
            query = query.with_for_update(skip_locked=True)
        row = session.execute(query).first()
        if row is None:
            return None
        candidate, spec = row
        if free_cpus is not None and requested_cpus(spec) > free_cpus:
            return None
        now = utcnow()
        try:
            return transition(
                session,
                candidate,
                RUNNING,
                from_=[QUEUED],
                message=f"claimed by dispatcher {owner}",
                attempt=Experiment.attempt + 1,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_s),
                executor=executor,
                started_at=now,
                error=None,
            )
        except IllegalTransition:
            continue  # lost the race for this row; look again
    return None


def requested_cpus(spec: dict[str, Any]) -> float:
    """The CPUs a stored (resolved) spec's run holds: `ResourcesSpec.requested_cpus` (1 for a row it cannot read:
    the run itself then fails with the reason, and the queue goes on)."""
    try:
        return ResourcesSpec.model_validate(spec.get("resources") or {}).requested_cpus
    except (AttributeError, ValueError):
        return 1.0


CLAIM_ORDER = (Experiment.priority.desc(), Experiment.created_at, Experiment.study_position.asc().nulls_first(),
               Experiment.id)


def _ready() -> ColumnElement[bool]:
    """No dependency, or one whose pretrained base is finished."""
    base = aliased(Experiment)
    return Experiment.depends_on.is_(None) | (
        select(base.id).where(base.id == Experiment.depends_on, base.base_ready_at.is_not(None)).exists())


def renew_leases(session: Session, *, owner: str, ids: Sequence[str], lease_s: float) -> set[str]:
    """Extend our lease on ``ids``; returns the ids we still own (others were taken over or finished)."""
    if not ids:
        return set()
    rows = session.execute(
        update(Experiment)
        .where(Experiment.id.in_(list(ids)), Experiment.lease_owner == owner, Experiment.status.in_(sorted(ACTIVE)))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .returning(Experiment.id)
        .execution_options(synchronize_session=False)
    ).scalars()
    return set(rows)


def orphans(session: Session, *, owner: str, watched: Iterable[str] = ()) -> list[Experiment]:
    """Running/cancelling experiments nobody is watching: their dispatcher's lease expired, or it is a dead
    process on this host, or it is ``owner`` itself but not among the runs it ``watched``."""
    watched = set(watched)
    rows = session.scalars(select(Experiment).where(Experiment.status.in_(sorted(ACTIVE)))).all()
    now = utcnow()
    found = []
    for row in rows:
        if row.id in watched:
            continue
        if (
            row.lease_owner == owner
            or row.lease_expires_at is None
            or row.lease_expires_at < now
            or owner_is_dead(row.lease_owner)
        ):
            found.append(row)
    return found


def take_over(session: Session, experiment: Experiment, *, owner: str, lease_s: float) -> Experiment | None:
    """Compare-and-swap the lease of an orphan to ``owner``; None when someone else got there first."""
    condition = (
        Experiment.lease_owner.is_(None)
        if experiment.lease_owner is None
        else Experiment.lease_owner == experiment.lease_owner
    )
    taken = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment.id, Experiment.status.in_(sorted(ACTIVE)), condition)
        .values(lease_owner=owner, lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .returning(Experiment.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if taken is None:
        return None
    return session.get(Experiment, experiment.id, populate_existing=True)


def set_fields(session: Session, experiment_id: str, **fields: Any) -> None:
    """Update non-status columns (executor handle, run dir, error); status changes go through `transition`."""
    if "status" in fields:
        raise ValueError("status changes go through transition()")
    session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id)
        .values(updated_at=utcnow(), **_public_fields(fields))
        .execution_options(synchronize_session=False)
    )


def _public_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """``error`` is public (the API shows it): one storable line; tracebacks stay in the run's logs."""
    if fields.get("error") is not None:
        return {**fields, "error": one_line(fields["error"])}
    return fields


# --------------------------------------------------------------------------------------------- events, metrics


@dataclass(frozen=True)
class RunEvent:
    """One line of a run's events.jsonl, parsed."""

    time: datetime
    phase: str | None
    kind: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_line(cls, record: Any, raw: str = "") -> RunEvent:
        if not isinstance(record, dict):
            return cls(utcnow(), None, "message", (raw or repr(record))[:MAX_MESSAGE], None)
        record = dict(record)
        when = _parse_time(record.pop("time", None))
        phase = record.pop("phase", None)
        kind = record.pop("event", None) or "message"
        message = record.pop("message", "")
        return cls(
            time=when,
            phase=str(phase)[:32] if phase is not None else None,
            kind=str(kind)[:32],
            message=str(message)[:MAX_MESSAGE],
            data=record or None,
        )


def _parse_time(value: Any) -> datetime:
    """The line's time in UTC; the time of ingestion when it has none that every backend can store."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError):  # not ISO 8601, or out of range once moved to UTC (year 1, +01:00)
            return utcnow()
    return utcnow()


def event_row(experiment_id: str, seq: int, event: RunEvent) -> Event:
    """The row of one event, in the storable form (`service.storable`; the columns' lengths applied after it)."""
    return Event(experiment_id=experiment_id, seq=seq, time=event.time,
                 phase=storable_text(event.phase)[:32] if event.phase is not None else None,
                 kind=storable_text(event.kind)[:32], message=storable_text(event.message)[:MAX_MESSAGE],
                 data=storable_json(event.data) if event.data is not None else None)


def add_event(
    session: Session, experiment_id: str, kind: str, message: str, *, phase: str | None = None,
    data: dict[str, Any] | None = None,
) -> int:
    """Append a service-side event (not from the run's file); returns its seq."""
    seq = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id)
        .values(last_seq=Experiment.last_seq + 1)
        .returning(Experiment.last_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if seq is None:
        raise NotFound(experiment_id)
    session.add(event_row(experiment_id, seq, RunEvent(utcnow(), phase, kind, message, data)))
    session.flush()
    return seq


def ingest_events(session: Session, experiment_id: str, *, expected_ingested: int, events: Sequence[RunEvent]) -> bool:
    """Store lines ``expected_ingested+1 ..`` of events.jsonl, exactly once.

    The counter ``events_ingested`` moves in the same transaction as the inserts, with a compare-and-swap on
    its old value: a restarted dispatcher continues after the last stored line, and a stale one stores
    nothing (returns False; it should re-read the counter). The line that says the pretrain phase finished
    marks the experiment's base ready in the same transaction (`mark_base_ready`).
    """
    if not events:
        return True
    n = len(events)
    last = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.events_ingested == expected_ingested)
        .values(events_ingested=expected_ingested + n, last_seq=Experiment.last_seq + n)
        .returning(Experiment.last_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if last is None:
        return False
    first = last - n + 1
    session.add_all(event_row(experiment_id, first + i, e) for i, e in enumerate(events))
    if any(e.phase == PRETRAIN and e.kind == "finished" for e in events):
        mark_base_ready(session, experiment_id)
    session.flush()
    return True


def upsert_metrics(session: Session, experiment_id: str, rows: Sequence[tuple[str, int, dict[str, Any]]]) -> None:
    """Insert or replace metrics keyed by (experiment, phase, epoch): re-ingesting a file changes nothing."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two backends are supported
        raise RuntimeError(f"unsupported database dialect {dialect}")
    now = utcnow()
    unique: dict[tuple[str, int], dict[str, Any]] = {}
    for phase, epoch, values in rows:
        unique[(storable_text(phase)[:32], epoch)] = values  # last line wins, as in the file
    stmt = insert(Metric).values(
        [
            {"experiment_id": experiment_id, "phase": phase, "epoch": epoch, "values": storable_json(values),
             "updated_at": now}
            for (phase, epoch), values in unique.items()
        ]
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["experiment_id", "phase", "epoch"],
        set_={"values": stmt.excluded["values"], "updated_at": stmt.excluded["updated_at"]},
    )
    session.execute(stmt)


def record_artifacts(session: Session, experiment_id: str, run_dir: Path) -> int:
    """Replace the artifact list of an experiment with the regular files under ``run_dir`` (a name no text column
    can hold, or longer than 1024 characters, is left out: its URL could not name it either)."""
    found = artifact_files(run_dir)
    session.execute(delete(Artifact).where(Artifact.experiment_id == experiment_id))
    session.add_all(Artifact(experiment_id=experiment_id, path=p, size=s) for p, s in found
                    if len(p) <= 1024 and storable_text(p) == p)
    session.flush()
    return len(found)


# --------------------------------------------------------------------------------------------------- tracking


def keep_run_id(session: Session, model: type[Experiment] | type[Study], row_id: str, run_id: str) -> str | None:
    """Record `run_id` as the MLflow run of the experiment or study `row_id` unless it holds one already (a
    compare-and-swap); returns the run id it holds afterwards."""
    session.execute(update(model).where(model.id == row_id, model.mlflow_run_id.is_(None))
                    .values(mlflow_run_id=run_id).execution_options(synchronize_session=False))
    return session.scalar(select(model.mlflow_run_id).where(model.id == row_id))


def claim_untracked(session: Session, *, owner: str, lease_s: float, limit: int) -> list[Experiment]:
    """Up to `limit` finished experiments that ran but whose MLflow run is not ended yet, newest first, leased to
    `owner` for logging them (a finished experiment's lease is free, `owner`'s, or expired)."""
    now = utcnow()
    free = Experiment.lease_owner.is_(None) | (Experiment.lease_owner == owner) | (Experiment.lease_expires_at < now)
    untracked = (Experiment.status.in_(sorted(TERMINAL)), Experiment.attempt > 0, Experiment.tracked_at.is_(None))
    candidates = session.scalars(select(Experiment.id).where(*untracked, free)
                                 .order_by(Experiment.finished_at.desc(), Experiment.id).limit(limit)).all()
    if not candidates:
        return []
    claimed = session.scalars(
        update(Experiment).where(Experiment.id.in_(candidates), *untracked, free)
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s))
        .returning(Experiment.id).execution_options(synchronize_session=False)).all()
    rows = session.scalars(select(Experiment).where(Experiment.id.in_(claimed))
                           .order_by(Experiment.finished_at.desc(), Experiment.id)
                           .execution_options(populate_existing=True))
    return list(rows)


def mark_tracked(session: Session, experiment_id: str, *, owner: str) -> bool:
    """The MLflow run of the finished experiment that `owner` leased is ended: release the lease."""
    done = session.execute(
        update(Experiment).where(Experiment.id == experiment_id, Experiment.lease_owner == owner,
                                 Experiment.status.in_(sorted(TERMINAL)), Experiment.tracked_at.is_(None))
        .values(tracked_at=utcnow(), lease_owner=None, lease_expires_at=None)
        .returning(Experiment.id).execution_options(synchronize_session=False)).scalar_one_or_none()
    return done is not None


def studies_to_close(session: Session, *, limit: int) -> list[Study]:
    """Studies with an open MLflow parent run whose every experiment has finished and, if it ran, been tracked."""
    pending = select(Experiment.id).where(
        Experiment.study_id == Study.id,
        Experiment.status.not_in(sorted(TERMINAL)) | ((Experiment.attempt > 0) & Experiment.tracked_at.is_(None)))
    return list(session.scalars(select(Study).where(Study.mlflow_run_id.is_not(None), Study.tracked_at.is_(None),
                                                    ~pending.exists()).order_by(Study.created_at).limit(limit)))


def mark_study_tracked(session: Session, study_id: str) -> None:
    session.execute(update(Study).where(Study.id == study_id, Study.tracked_at.is_(None))
                    .values(tracked_at=utcnow()).execution_options(synchronize_session=False))


def metrics_after(session: Session, experiment_id: str, after_id: int, limit: int = 1000) -> list[Metric]:
    """The experiment's metric rows stored after row `after_id` (its first `limit` of them, in row order)."""
    return list(session.scalars(select(Metric).where(Metric.experiment_id == experiment_id, Metric.id > after_id)
                                .order_by(Metric.id).limit(limit)))
