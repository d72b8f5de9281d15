"""The queue and the state machine (service/store.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from service import store
from service.db import session_scope
from service.models import (
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    TERMINAL,
    Event,
    Experiment,
    Metric,
    utcnow,
)

try:
    from tests.service_fixtures import db_url, pg_url, sessions, sqlite_url  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from service_fixtures import db_url, pg_url, sessions, sqlite_url  # noqa: F401


def _new(session, name="e", priority=0, **kw):
    experiment, created = store.create_experiment(session, spec={"name": name}, name=name, priority=priority, **kw)
    assert created
    return experiment


def _force_status(session, experiment_id, status):
    session.execute(update(Experiment).where(Experiment.id == experiment_id).values(status=status))


def _seqs(session, experiment_id):
    return list(session.scalars(select(Event.seq).where(Event.experiment_id == experiment_id).order_by(Event.seq)))


def test_transition_table(sessions):
    """Every (from, to) pair: allowed ones succeed, every other one raises and changes nothing."""
    for source, target in itertools.product(STATUSES, STATUSES):
        with session_scope(sessions) as s:
            e = _new(s)
            _force_status(s, e.id, source)
        with session_scope(sessions) as s:
            if target in store.ALLOWED[source]:
                assert store.transition(s, e.id, target).status == target
            else:
                with pytest.raises(store.IllegalTransition) as info:
                    store.transition(s, e.id, target)
                assert (info.value.current, info.value.target) == (source, target)
        with session_scope(sessions) as s:
            expected = target if target in store.ALLOWED[source] else source
            assert store.get_experiment(s, e.id).status == expected


def test_allowed_transitions_are_the_documented_ones():
    assert store.ALLOWED[QUEUED] == {RUNNING, CANCELLED, FAILED}  # failed: a study's base ended without a base
    assert store.ALLOWED[RUNNING] == {SUCCEEDED, FAILED, CANCELLED, CANCELLING, QUEUED}
    assert store.ALLOWED[CANCELLING] == {CANCELLED, SUCCEEDED, FAILED}
    assert all(not store.ALLOWED[t] for t in TERMINAL)


def test_transition_unknown_id_and_status(sessions):
    with session_scope(sessions) as s:
        with pytest.raises(store.NotFound):
            store.transition(s, "nope", RUNNING)
        e = _new(s)
        with pytest.raises(ValueError):
            store.transition(s, e.id, "paused")


def test_transition_records_events_and_timestamps(sessions):
    with session_scope(sessions) as s:
        e = _new(s)
        store.transition(s, e.id, RUNNING, message="go")
        done = store.transition(s, e.id, SUCCEEDED, message="done")
        assert done.finished_at is not None and done.lease_owner is None
        assert _seqs(s, e.id) == [1, 2, 3]
        messages = list(s.scalars(select(Event.message).where(Event.experiment_id == e.id).order_by(Event.seq)))
        assert messages == ["status: queued", "go", "done"]


def test_claim_order_priority_then_age(sessions):
    with session_scope(sessions) as s:
        low = _new(s, "low", priority=0)
    with session_scope(sessions) as s:
        high_old = _new(s, "high-old", priority=5)
    with session_scope(sessions) as s:
        high_new = _new(s, "high-new", priority=5)
    with session_scope(sessions) as s:
        cancelled = _new(s, "cancelled", priority=9)
        store.request_cancel(s, cancelled.id)
    order = []
    for _ in range(4):
        with session_scope(sessions) as s:
            claimed = store.claim_next(s, owner="me", lease_s=30, executor="test")
            order.append(claimed.id if claimed else None)
    assert order == [high_old.id, high_new.id, low.id, None]
    with session_scope(sessions) as s:
        e = store.get_experiment(s, low.id)
        assert e.status == RUNNING and e.attempt == 1 and e.lease_owner == "me" and e.lease_expires_at > utcnow()


def test_claim_is_compare_and_swap(sessions):
    with session_scope(sessions) as s:
        e = _new(s)
    with session_scope(sessions) as s:
        store.transition(s, e.id, RUNNING, from_=[QUEUED])
    with session_scope(sessions) as s:
        with pytest.raises(store.IllegalTransition):
            store.transition(s, e.id, RUNNING, from_=[QUEUED])
        assert store.claim_next(s, owner="me", lease_s=30, executor="test") is None


def test_cancel_rules(sessions):
    with session_scope(sessions) as s:
        queued = _new(s, "q")
        running = _new(s, "r")
        store.transition(s, running.id, RUNNING)
        done = _new(s, "d")
        store.transition(s, done.id, RUNNING)
        store.transition(s, done.id, SUCCEEDED)
    with session_scope(sessions) as s:
        assert store.request_cancel(s, queued.id).status == CANCELLED
        assert store.request_cancel(s, running.id).status == CANCELLING
        assert store.request_cancel(s, running.id).status == CANCELLING  # idempotent
        with pytest.raises(store.IllegalTransition):
            store.request_cancel(s, done.id)
        with pytest.raises(store.NotFound):
            store.request_cancel(s, "missing")


def test_idempotency_key(sessions):
    with session_scope(sessions) as s:
        first, created = store.create_experiment(s, spec={}, name="a", idempotency_key="k", request_hash="h1")
        assert created
    with session_scope(sessions) as s:
        again, created = store.create_experiment(s, spec={}, name="a", idempotency_key="k", request_hash="h1")
        assert not created and again.id == first.id
        with pytest.raises(store.IdempotencyConflict):
            store.create_experiment(s, spec={}, name="b", idempotency_key="k", request_hash="h2")
    with session_scope(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Experiment)) == 1


def test_ingest_events_exactly_once(sessions):
    events = [store.RunEvent.from_line({"time": "2026-01-01T00:00:00Z", "phase": "pretrain", "event": "epoch",
                                        "message": f"epoch {i}", "epoch": i}) for i in range(3)]
    with session_scope(sessions) as s:
        e = _new(s)
        assert store.ingest_events(s, e.id, expected_ingested=0, events=events[:2])
    with session_scope(sessions) as s:
        # a second ingester that still believes nothing was stored is refused
        assert not store.ingest_events(s, e.id, expected_ingested=0, events=events[:2])
        store.add_event(s, e.id, "message", "from the service")
        assert store.ingest_events(s, e.id, expected_ingested=2, events=events[2:])
    with session_scope(sessions) as s:
        assert _seqs(s, e.id) == [1, 2, 3, 4, 5]
        row = s.scalars(select(Event).where(Event.experiment_id == e.id, Event.seq == 2)).one()
        assert (row.phase, row.kind, row.message, row.data) == ("pretrain", "epoch", "epoch 0", {"epoch": 0})
        assert row.time.tzinfo is not None and row.time.year == 2026
        assert store.get_experiment(s, e.id).events_ingested == 3


def test_upsert_metrics_is_idempotent(sessions):
    with session_scope(sessions) as s:
        e = _new(s)
        store.upsert_metrics(s, e.id, [("pretrain", 1, {"loss": 2.0}), ("pretrain", 2, {"loss": 1.0})])
    with session_scope(sessions) as s:
        store.upsert_metrics(s, e.id, [("pretrain", 2, {"loss": 0.5}), ("igat", 1, {"loss": 3.0})])
        store.upsert_metrics(s, e.id, [("pretrain", 2, {"loss": 0.5})])
    with session_scope(sessions) as s:
        rows = {(m.phase, m.epoch): m.values for m in s.scalars(select(Metric).where(Metric.experiment_id == e.id))}
        assert rows == {("pretrain", 1): {"loss": 2.0}, ("pretrain", 2): {"loss": 0.5}, ("igat", 1): {"loss": 3.0}}
        page, total = store.metrics_page(s, e.id, phase="pretrain", limit=1, offset=1)
        assert total == 2 and [(m.phase, m.epoch) for m in page] == [("pretrain", 2)]


def test_orphans_and_take_over(sessions):
    with session_scope(sessions) as s:
        alive = _new(s, "alive")
        expired = _new(s, "expired")
        dead_owner = _new(s, "dead-owner")
        for e in (alive, expired, dead_owner):
            store.transition(s, e.id, RUNNING)
        later = utcnow() + timedelta(seconds=60)
        store.set_fields(s, alive.id, lease_owner="elsewhere:1:x", lease_expires_at=later)
        store.set_fields(s, expired.id, lease_owner="elsewhere:1:x", lease_expires_at=utcnow() - timedelta(seconds=1))
        # a dispatcher on this host whose pid does not exist: no need to wait for its lease
        dead = f"{store.dispatcher_identity().rsplit(':', 2)[0]}:{2**22 + 12345}:x"
        store.set_fields(s, dead_owner.id, lease_owner=dead, lease_expires_at=later)
    with session_scope(sessions) as s:
        found = {e.id for e in store.orphans(s, owner="me")}
        assert found == {expired.id, dead_owner.id}
        assert {e.id for e in store.orphans(s, owner="elsewhere:1:x")} == {alive.id, expired.id, dead_owner.id}
        assert {e.id for e in store.orphans(s, owner="elsewhere:1:x", watched=[alive.id])} == {
            expired.id, dead_owner.id}
        candidate = store.get_experiment(s, expired.id)
    with session_scope(sessions) as s:
        assert store.take_over(s, candidate, owner="me", lease_s=30).lease_owner == "me"
    with session_scope(sessions) as s:
        assert store.take_over(s, candidate, owner="other", lease_s=30) is None  # lost the race: already ours
        assert store.renew_leases(s, owner="me", ids=[expired.id, alive.id], lease_s=30) == {expired.id}
