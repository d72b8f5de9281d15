"""The storable form of run-produced values (service/storable.py), and the store writing it on SQLite and PostgreSQL:
what PostgreSQL refuses (NaN in JSON, NUL in text) and no driver can encode (lone surrogates) is stored encoded, and
the API serves what the database holds, rows from before the convention included, as strict JSON."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, text

from service import store
from service.db import make_session_factory, session_scope
from service.dispatcher import _parse_event, describe, error_summary
from service.models import FAILED, RUNNING, Event, Experiment, Metric
from service.storable import MAX_DEPTH, one_line, public_error, storable_float, storable_json, storable_text

try:
    from tests.service_fixtures import (  # noqa: F401
        create_schema, db_url, make_client, make_settings, pg_url, sessions, sqlite_url)
except ImportError:
    from service_fixtures import (  # noqa: F401
        create_schema, db_url, make_client, make_settings, pg_url, sessions, sqlite_url)

NUL = "\x00"
LONE = "\ud800"


# --------------------------------------------------------------------------------------------- the convention


def test_text_writes_nul_and_lone_surrogates_as_their_escapes():
    assert storable_text("plain text, é, 😀") == "plain text, é, 😀"
    assert storable_text(f"a{NUL}b") == "a\\u0000b"
    assert storable_text(f"{NUL}{NUL}") == "\\u0000\\u0000"
    assert storable_text(f"x{LONE}y\udfff") == "x\\ud800y\\udfff"
    assert storable_text("already \\u0000 escaped") == "already \\u0000 escaped"


def test_non_finite_floats_become_their_javascript_names():
    assert storable_float(1.5) == 1.5
    assert storable_float(-0.0) == 0.0
    assert storable_float(math.nan) == "NaN"
    assert storable_float(math.inf) == "Infinity"
    assert storable_float(-math.inf) == "-Infinity"


def test_json_values_are_encoded_all_the_way_down():
    value = {"loss": math.nan, "lr": 10.0, "ok": True, "n": 3, "none": None,
             f"k{NUL}": [math.inf, {"deep": -math.inf, "s": f"{LONE}"}], "t": (1, "two")}
    assert storable_json(value) == {"loss": "NaN", "lr": 10.0, "ok": True, "n": 3, "none": None,
                                    "k\\u0000": ["Infinity", {"deep": "-Infinity", "s": "\\ud800"}], "t": [1, "two"]}
    assert json.dumps(storable_json(value), allow_nan=False)  # strict JSON


def test_nesting_beyond_the_limit_and_foreign_types_are_recorded_as_such():
    deep: list = []
    cursor = deep
    for _ in range(MAX_DEPTH + 10):
        cursor.append([])
        cursor = cursor[0]
    stored = storable_json({"d": deep})
    for _ in range(MAX_DEPTH - 1):
        stored = stored[0] if isinstance(stored, list) else stored["d"]
    assert stored == [{"_invalid": f"nested deeper than {MAX_DEPTH} levels; not stored"}]
    assert storable_json({"b": b"\x00x", "set": {1}}) == {"b": "b'\\x00x'", "set": "{1}"}


def test_one_line_and_public_error():
    assert one_line("failed:\n  Traceback (most recent call last):\n\tboom\x00") == \
        "failed: Traceback (most recent call last): boom\\u0000"
    assert one_line("x" * 600) == "x" * 497 + "..."
    assert public_error(None) is None
    assert public_error("the runner exited with code 1\nTraceback (most recent call last):\n  File x") == \
        "the runner exited with code 1"


def test_error_summary_is_the_last_thing_the_output_says():
    traceback = ("progress 3/10\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                 "    boom()\nRuntimeError: boom in the runner")
    assert error_summary(traceback) == "RuntimeError: boom in the runner"
    assert error_summary("invalid experiment spec x.yaml:\n  base.train.lr: too big\n  seed: not an int") == \
        "invalid experiment spec x.yaml: base.train.lr: too big; seed: not an int"
    assert error_summary("") == ""
    assert describe(ValueError("embedded null byte\nmore")) == "ValueError: embedded null byte"


def test_event_lines_the_parser_cannot_take_are_kept_as_text():
    deep = b"[" * 100_000 + b"]" * 100_000
    event = _parse_event(deep)
    assert event.kind == "message" and event.data is None and event.message.startswith("[[[")
    event = _parse_event(b'{"event": "epoch", "message": "m", "time": "0001-01-01T00:00:00+01:00"}')
    assert event.kind == "epoch" and event.time.year >= 2024  # out of range in UTC: the time of ingestion


# ---------------------------------------------------------------------------------------------- the store


def _running(session) -> str:
    experiment, _ = store.create_experiment(session, spec={"name": "e"}, name="e")
    store.transition(session, experiment.id, RUNNING)
    return experiment.id


def test_the_store_writes_what_postgres_refuses_in_its_storable_form(sessions):
    line = json.dumps({"time": "2026-01-01T00:00:00+00:00", "phase": f"pre{NUL}", "event": "epoch",
                       "message": f"loss nan{NUL}", "loss": math.nan, "note": f"{LONE}x", f"key{NUL}": -math.inf})
    with session_scope(sessions) as s:
        e = _running(s)
        assert store.ingest_events(s, e, expected_ingested=0, events=[_parse_event(line.encode())])
        store.upsert_metrics(s, e, [(f"pre{NUL}", 1, {"loss": math.nan, "acc": math.inf, "name": f"a{NUL}"})])
        store.add_event(s, e, "message", f"service {NUL}", data={"x": math.nan})
        store.transition(s, e, FAILED, message=f"failed: {NUL}", error=f"reason {NUL}\nTraceback:\n  File x")
    with session_scope(sessions) as s:
        events = list(s.scalars(select(Event).where(Event.experiment_id == e).order_by(Event.seq)))
        metric = s.scalars(select(Metric).where(Metric.experiment_id == e)).one()
        experiment = s.get(Experiment, e)
        stored = [(ev.phase, ev.kind, ev.message, ev.data) for ev in events[2:]]
        assert stored == [
            ("pre\\u0000", "epoch", "loss nan\\u0000", {"loss": "NaN", "note": "\\ud800x", "key\\u0000": "-Infinity"}),
            (None, "message", "service \\u0000", {"x": "NaN"}),
            (None, "status", "failed: \\u0000", {"status": "failed"}),
        ]
        assert (metric.phase, metric.epoch, metric.values) == (
            "pre\\u0000", 1, {"loss": "NaN", "acc": "Infinity", "name": "a\\u0000"})
        assert experiment.error == "reason \\u0000 Traceback: File x"


def test_reads_answer_for_rows_and_files_from_before_the_convention(tmp_path, sqlite_url):
    """SQLite stored a NaN as it came (no encoding then), and a run's results.json holds one: every read answers."""
    sessions = make_session_factory(create_schema(sqlite_url))
    with session_scope(sessions) as s:
        e = _running(s)
        s.execute(text("INSERT INTO metrics (experiment_id, phase, epoch, \"values\", updated_at) "
                       "VALUES (:e, 'pretrain', 1, '{\"loss\": NaN}', :now)"), {"e": e, "now": datetime.now(UTC)})
        s.execute(text("UPDATE events SET data = '{\"loss\": Infinity}' WHERE experiment_id = :e"), {"e": e})
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "results.json").write_text('{"evaluation": {"base": {"average": {"natural": NaN}}}}')
        store.transition(s, e, "succeeded", run_dir=str(run_dir))
        s.execute(text("UPDATE experiments SET error = 'old reason' || char(10) || 'Traceback (most recent call "
                       "last):' WHERE id = :e"), {"e": e})
    with make_client(make_settings(tmp_path, sqlite_url), sessions) as client:
        assert client.get(f"/experiments/{e}/metrics").json()["items"][0]["values"] == {"loss": "NaN"}
        assert client.get(f"/results/{e}").json() == {"evaluation": {"base": {"average": {"natural": "NaN"}}}}
        detail = client.get(f"/experiments/{e}")
        assert detail.status_code == 200 and detail.json()["error"] == "old reason"
        events = client.get(f"/experiments/{e}/events")
        assert events.status_code == 200 and '"loss":"Infinity"' in events.text.replace(" ", "")
        assert client.get("/experiments").status_code == 200


def test_artifact_names_no_text_column_can_hold_are_left_out(tmp_path, sessions):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ok.txt").write_text("x")
    Path(run_dir / "bad-\udcff.txt").write_text("x")  # an undecodable byte in a name: a lone surrogate here
    with session_scope(sessions) as s:
        e = _running(s)
        store.record_artifacts(s, e, run_dir)
    with session_scope(sessions) as s:
        assert [a.path for a in store.list_artifacts(s, e)] == ["ok.txt"]
