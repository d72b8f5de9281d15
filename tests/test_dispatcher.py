"""The dispatcher and the local executor, with a stand-in runner (same command line and files as `igat run`).

The acceptance runs with the real runner are in tests/test_service_e2e.py; these are the fast ones.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from service import store
from service.db import make_engine, make_session_factory, session_scope
from service.dispatcher import Dispatcher, Watched
from service.models import Artifact, Experiment
from workers.executors import ExperimentRun, RunState

try:
    from tests.service_fixtures import (  # noqa: F401
        kill_group, assert_no_duplicates, create_schema, db_url, events_of, fake_runner, fake_spec, free_port,
        make_client, make_settings, metrics_of, pg_url, pid_alive, queue, read_jsonl, sessions, sqlite_url,
        start_dispatcher_process, status_of, wait_for,
    )
except ImportError:
    from service_fixtures import (  # noqa: F401
        kill_group, assert_no_duplicates, create_schema, db_url, events_of, fake_runner, fake_spec, free_port,
        make_client, make_settings, metrics_of, pg_url, pid_alive, queue, read_jsonl, sessions, sqlite_url,
        start_dispatcher_process, status_of, wait_for,
    )


@pytest.fixture(autouse=True)
def _fast_fake_epochs(monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_S", "0.02")


def drive(dispatcher, sessions, experiment_id, until, timeout=60.0):
    def check():
        dispatcher.tick()
        e = status_of(sessions, experiment_id)
        return e if e.status in until else None

    return wait_for(check, timeout, interval=0.05, what=f"experiment {experiment_id} to become {until}")


# ------------------------------------------------------------------------------------------------ outcomes


def test_runs_to_success_and_ingests_everything(tmp_path, db_url, sessions, fake_runner):
    settings = make_settings(tmp_path, db_url, runner_command=fake_runner)
    dispatcher = Dispatcher(settings, session_factory=sessions)
    e = queue(sessions, fake_spec("ok", epochs=4))
    done = drive(dispatcher, sessions, e, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error
    assert done.attempt == 1 and done.lease_owner is None and done.finished_at is not None
    run_dir = Path(done.run_dir)
    assert run_dir == (tmp_path / "artifacts" / e).resolve()
    assert (run_dir / "spec.yaml").exists() and (run_dir / "executor.json").exists()
    assert "fake runner starting" in (run_dir / "stdout.log").read_text()
    assert_no_duplicates(sessions, e, run_dir)
    assert [v["loss"] for _, _, v in metrics_of(sessions, e)] == [1.0, 0.5, 1 / 3, 0.25]
    kinds = [ev.kind for ev in events_of(sessions, e)]
    assert kinds[0] == "status" and kinds[-1] == "status" and kinds.count("epoch") == 4
    with session_scope(sessions) as s:
        paths = set(s.scalars(select(Artifact.path).where(Artifact.experiment_id == e)))
    assert {"results.json", "report.md", "spec.yaml", "metrics.jsonl", "events.jsonl"} <= paths
    with make_client(settings, sessions) as client:
        assert client.get(f"/results/{e}").json()["epochs"] == 4


@pytest.mark.parametrize(
    "mode,error",
    [
        ("fail", "the runner exited with code 1: RuntimeError: boom in the fake runner"),
        ("badspec", "the runner rejected the spec (exit code 2): invalid experiment spec: base.train.epochs: nope"),
        ("noresults", "the runner exited 0 but wrote no readable results.json"),
        ("nul", "the runner exited with code 1: ValueError: embedded null byte\\u0000 in a path"),
    ],
)
def test_failures_keep_a_one_line_reason_and_the_traceback_stays_in_the_logs(tmp_path, sqlite_url, fake_runner,
                                                                                mode, error):
    sessions = make_session_factory(create_schema(sqlite_url))
    dispatcher = Dispatcher(make_settings(tmp_path, sqlite_url, runner_command=fake_runner), session_factory=sessions)
    e = queue(sessions, fake_spec(mode, epochs=1))
    done = drive(dispatcher, sessions, e, {"succeeded", "failed"})
    assert (done.status, done.error) == ("failed", error)
    assert events_of(sessions, e)[-1].message == f"failed: {error}"
    if mode == "fail":
        assert "Traceback (most recent call last):" in (Path(done.run_dir) / "stderr.log").read_text()


def test_a_runner_that_cannot_start_fails_cleanly(tmp_path, sqlite_url):
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=[str(tmp_path / "no-such-runner")])
    e = queue(sessions, fake_spec())
    done = drive(Dispatcher(settings, session_factory=sessions), sessions, e, {"failed"})
    assert "could not start" in done.error


def test_priority_and_concurrency_limit(tmp_path, sqlite_url, fake_runner):
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, max_concurrent_experiments=2)
    dispatcher = Dispatcher(settings, session_factory=sessions)
    low = queue(sessions, fake_spec("ok", 2), priority=0)
    highs = [queue(sessions, fake_spec("ok", 2), priority=1) for _ in range(2)]
    dispatcher.tick()
    assert set(dispatcher.watched) == set(highs)
    assert status_of(sessions, low).status == "queued"
    drive(dispatcher, sessions, low, {"succeeded"})


def test_runs_start_only_while_their_resources_fit_the_cpu_limit(tmp_path, sqlite_url, fake_runner):
    """Limit 3 CPUs: a 2-CPU run and a 1-CPU run fill it; the next 2-CPU run waits (the 1-CPU run queued behind it
    does not overtake it) until one finishes; a 5-CPU run, larger than the limit, starts once nothing runs."""
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, max_concurrent_experiments=8,
                             max_concurrent_cpus=3.0)
    dispatcher = Dispatcher(settings, session_factory=sessions)

    def run(cpus: float, epochs: int = 2) -> str:
        return queue(sessions, {**fake_spec("ok", epochs), "resources": {"cpus_per_worker": cpus}})

    first, second, third, small, big = run(2.0), run(1.0), run(2.0), run(1.0), run(5.0)
    dispatcher.tick()
    assert set(dispatcher.watched) == {first, second}
    assert [status_of(sessions, e).status for e in (third, small, big)] == ["queued"] * 3
    drive(dispatcher, sessions, big, {"succeeded"})
    runs = {e: status_of(sessions, e) for e in (first, second, third, small, big)}
    assert all(r.status == "succeeded" for r in runs.values())
    start, end = ({e: getattr(r, key) for e, r in runs.items()} for key in ("started_at", "finished_at"))
    assert start[third] >= end[first]  # 1 CPU left while the 2-CPU run ran
    assert start[small] >= start[third]  # fitted earlier, but behind the 2-CPU run in the queue
    assert start[big] >= max(end[e] for e in (first, second, third, small))


def test_requested_cpus_are_the_workers_cpus_or_the_threads():
    assert store.requested_cpus({"resources": {"num_workers": 3, "cpus_per_worker": 1.5}}) == 4.5
    assert store.requested_cpus({"resources": {"cpus_per_worker": 0.5, "threads": 2}}) == 2.0
    assert store.requested_cpus({}) == 1.0
    assert store.requested_cpus({"resources": {"num_workers": "many"}}) == 1.0


# -------------------------------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("mode", ["ok", "stubborn"])
def test_cancel_running_stops_the_process_group(tmp_path, sqlite_url, fake_runner, monkeypatch, mode):
    monkeypatch.setenv("FAKE_EPOCH_S", "0.1")
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, cancel_grace_s=0.5)
    dispatcher = Dispatcher(settings, session_factory=sessions)
    e = queue(sessions, fake_spec(mode, epochs=1000))

    def started():
        dispatcher.tick()
        return any(ev.kind == "epoch" for ev in events_of(sessions, e))

    wait_for(started, 30, what="the first epoch")
    pid = status_of(sessions, e).executor_handle["pid"]
    with session_scope(sessions) as s:
        assert store.request_cancel(s, e).status == "cancelling"
    done = drive(dispatcher, sessions, e, {"cancelled", "succeeded", "failed"}, timeout=30)
    assert done.status == "cancelled"
    assert not pid_alive(pid)
    assert not dispatcher.watched
    assert not (Path(done.run_dir) / "results.json").exists()


# ------------------------------------------------------------------------------------------------ ingestion


def test_ingestion_waits_for_complete_lines_and_follows_rewrites(tmp_path, sqlite_url):
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url)
    dispatcher = Dispatcher(settings, session_factory=sessions, executor=_InstantExecutor())
    e = queue(sessions, fake_spec())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    watched = Watched(e, {}, run_dir, attempt=1)
    ev = lambda i: json.dumps({"time": "2026-01-01T00:00:00+00:00", "phase": "pretrain", "event": "epoch",  # noqa: E731
                               "message": f"e{i}", "epoch": i})
    (run_dir / "events.jsonl").write_text(ev(1) + "\n" + ev(2) + "\n" + ev(3)[:10])
    (run_dir / "metrics.jsonl").write_text('{"phase": "pretrain", "epoch": 1, "loss": 1.0}\n{"phase": "pre')
    dispatcher.ingest(watched)
    dispatcher.ingest(watched)
    assert [x.message for x in events_of(sessions, e)][1:] == ["e1", "e2"]
    assert metrics_of(sessions, e) == [("pretrain", 1, {"loss": 1.0})]
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(ev(3)[10:] + "\n" + "not json\n")
    # the runner resumed and rewrote metrics.jsonl: epoch 1 redone with a new value, epoch 2 added
    (run_dir / "metrics.jsonl").write_text('{"phase": "pretrain", "epoch": 1, "loss": 0.9}\n'
                                           '{"phase": "pretrain", "epoch": 2, "loss": 0.5}\n{"bad": 1}\n')
    dispatcher.ingest(watched)
    # a brand-new dispatcher (no offsets in memory) must not store anything twice
    fresh = Dispatcher(settings, session_factory=sessions, executor=_InstantExecutor())
    fresh.ingest(Watched(e, {}, run_dir, attempt=1))
    messages = [x.message for x in events_of(sessions, e)]
    assert messages[1:] == ["e1", "e2", "e3", "not json"]
    assert metrics_of(sessions, e) == [("pretrain", 1, {"loss": 0.9}), ("pretrain", 2, {"loss": 0.5})]


# -------------------------------------------------------------------------------- one bad run, one failure


def test_values_postgres_refuses_are_stored_encoded_and_served(tmp_path, db_url, sessions, fake_runner):
    settings = make_settings(tmp_path, db_url, runner_command=fake_runner)
    e = queue(sessions, fake_spec("odd", epochs=1))
    done = drive(Dispatcher(settings, session_factory=sessions), sessions, e, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error
    odd = next(ev for ev in events_of(sessions, e) if ev.kind == "epoch" and ev.data["epoch"] == 0)
    assert (odd.message, odd.data) == ("nul\\u0000 here", {"epoch": 0, "note": "\\ud800", "loss": "NaN"})
    assert metrics_of(sessions, e)[0] == ("pretrain", 0, {"loss": "NaN", "acc": "Infinity"})
    assert_no_duplicates(sessions, e, Path(done.run_dir))
    with make_client(settings, sessions) as client:
        metrics = client.get(f"/experiments/{e}/metrics").json()["items"]
        assert metrics[0]["values"] == {"loss": "NaN", "acc": "Infinity"}
        assert "nul\\\\u0000 here" in client.get(f"/experiments/{e}/events").text


def test_a_fault_of_one_experiment_fails_it_alone_and_the_queue_goes_on(tmp_path, sqlite_url, fake_runner):
    """A run whose events.jsonl cannot be read (a directory) fails with the reason, its process is stopped, and the
    experiment queued behind it runs (one slot: it could not start while the broken one held it)."""
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, max_concurrent_experiments=1)
    dispatcher = Dispatcher(settings, session_factory=sessions)
    broken, ok = queue(sessions, fake_spec("eventsdir")), queue(sessions, fake_spec("ok", epochs=2))
    assert drive(dispatcher, sessions, ok, {"succeeded"}).status == "succeeded"
    done = status_of(sessions, broken)
    assert done.status == "failed"
    assert done.error.startswith("the dispatcher could not record the run: IsADirectoryError: [Errno 21] Is a "
                                 "directory")
    assert "\n" not in done.error
    assert not pid_alive(done.executor_handle["pid"])


def test_adopting_an_orphan_that_cannot_be_ingested_fails_it_and_claims_the_next(tmp_path, sqlite_url, fake_runner):
    """The broken run's dispatcher died with it; the next dispatcher's adoption reads its files, which fails: it
    fails that experiment instead of failing on it every tick, and goes on to the queue."""
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, lease_s=0.2)
    first = Dispatcher(settings, session_factory=sessions, owner="gone-host:1:x")
    broken = queue(sessions, fake_spec("eventsdir"))
    first.tick()
    run_dir = Path(status_of(sessions, broken).run_dir)
    pid = status_of(sessions, broken).executor_handle["pid"]
    wait_for(lambda: (run_dir / "events.jsonl").is_dir(), 30, what="the runner to make events.jsonl a directory")
    kill_group(pid)
    wait_for(lambda: not pid_alive(pid), 10, what="the runner to die")
    ok = queue(sessions, fake_spec("ok", epochs=2))
    time.sleep(0.3)  # the first dispatcher's lease expires
    second = Dispatcher(settings, session_factory=sessions)
    assert drive(second, sessions, ok, {"succeeded"}).status == "succeeded"
    done = status_of(sessions, broken)
    assert done.status == "failed" and "IsADirectoryError" in done.error


# ------------------------------------------------------------------------------------ restart recovery


def _first_epoch_seen(sessions, e):
    return any(ev.kind == "epoch" for ev in events_of(sessions, e))


@pytest.mark.parametrize("kill_runner", [False, True], ids=["reattach", "requeue"])
def test_sigkill_dispatcher_then_recover(tmp_path, db_url, sessions, fake_runner, kill_runner):
    """SIGKILL the dispatcher process mid-run; a new one re-attaches (runner alive) or re-queues (runner dead
    too, the next attempt resumes from its checkpoint). Either way: succeeded, nothing stored twice."""
    settings = make_settings(tmp_path, db_url, runner_command=fake_runner, lease_s=60.0)
    env = {"FAKE_EPOCH_S": "0.15"}
    e = queue(sessions, fake_spec("ok", epochs=12))
    first = start_dispatcher_process(settings, tmp_path / "dispatcher1.log", env)
    try:
        wait_for(lambda: _first_epoch_seen(sessions, e), 60, interval=0.1, what="the first epoch")
        runner_pid = status_of(sessions, e).executor_handle["pid"]
        # freeze the runner so that it is still mid-run whatever the machine's load (SIGCONT below)
        os.killpg(runner_pid, signal.SIGKILL if kill_runner else signal.SIGSTOP)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    if kill_runner:
        wait_for(lambda: not pid_alive(runner_pid), 10, what="the runner to die")
    assert status_of(sessions, e).status == "running"
    # lease_s=60 has not expired: the new dispatcher recognises the old one as dead from its pid
    second = start_dispatcher_process(settings, tmp_path / "dispatcher2.log", env)
    try:
        if not kill_runner:
            wait_for(lambda: any("re-attached" in ev.message for ev in events_of(sessions, e)), 60,
                     what="the new dispatcher to re-attach")
            os.killpg(runner_pid, signal.SIGCONT)
        done = wait_for(lambda: (x := status_of(sessions, e)).status in ("succeeded", "failed") and x, 90,
                        interval=0.1, what="the experiment to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
        kill_group(runner_pid)
    logs = (tmp_path / "dispatcher2.log").read_text()
    assert done.status == "succeeded", (done.error, logs)
    messages = [ev.message for ev in events_of(sessions, e)]
    if kill_runner:
        assert done.attempt == 2
        assert any(m.startswith("re-queued") for m in messages)
        starts = [x for x in read_jsonl(Path(done.run_dir) / "events.jsonl") if x["event"] == "started"]
        assert len(starts) == 2 and starts[1]["resumed_from"] > 0  # resumed from the checkpoint
    else:
        assert done.attempt == 1
        assert any("re-attached" in m for m in messages)
    assert_no_duplicates(sessions, e, Path(done.run_dir))
    assert len(metrics_of(sessions, e)) == 12


def test_lost_run_fails_after_max_attempts(tmp_path, sqlite_url):
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, max_attempts=1, lease_s=0.2)
    e = queue(sessions, fake_spec())
    with session_scope(sessions) as s:
        store.claim_next(s, owner="gone-host:1:x", lease_s=0.2, executor="local")
    time.sleep(0.3)
    dispatcher = Dispatcher(settings, session_factory=sessions, executor=_InstantExecutor(alive=False))
    dispatcher.tick()
    done = status_of(sessions, e)
    assert done.status == "failed" and "gave up after 1 attempt" in done.error


# ------------------------------------------------------------------------------- concurrent dispatchers


class _InstantExecutor:
    """Runs nothing: every run has already succeeded (writes results.json). Records what it was asked."""

    name = "instant"

    def __init__(self, alive: bool = True):
        self.started: list[str] = []
        self.alive = alive

    def start(self, run: ExperimentRun):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "results.json").write_text("{}")
        self.started.append(run.experiment_id)
        return {"pid": 0, "run_dir": str(run.run_dir)}

    def poll(self, handle):
        return RunState(running=False, exit_code=0)

    def cancel(self, handle, *, force=False):
        pass

    def attach(self, handle):
        return self.alive

    def find(self, run_dir):
        return None

    def release(self, handle):
        pass

    def error_tail(self, handle, max_chars=4000):
        return ""


def _two_dispatchers_claim_each_once(tmp_path, url, n=20):
    create_schema(url).dispose()
    engines = [make_engine(url) for _ in range(3)]
    sessions = make_session_factory(engines[0])
    ids = {queue(sessions, fake_spec(f"e{i}"), priority=i % 3) for i in range(n)}
    settings = make_settings(tmp_path, url, max_concurrent_experiments=4)
    executors = [_InstantExecutor(), _InstantExecutor()]
    dispatchers = [Dispatcher(settings, session_factory=make_session_factory(engines[i + 1]), executor=executors[i])
                   for i in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def loop(d: Dispatcher):
        try:
            barrier.wait()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                d.tick()
                with session_scope(d.sessions) as s:
                    if not s.scalar(select(Experiment.id).where(Experiment.status.in_(["queued", "running"]))):
                        return
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(d,)) for d in dispatchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    started = executors[0].started + executors[1].started
    assert sorted(started) == sorted(ids), "every experiment started exactly once"
    with session_scope(sessions) as s:
        rows = s.scalars(select(Experiment)).all()
        assert {r.status for r in rows} == {"succeeded"} and {r.attempt for r in rows} == {1}
    for engine in engines:
        engine.dispose()
    return [len(x.started) for x in executors]


@pytest.mark.postgres
def test_two_dispatchers_on_postgres_claim_each_exactly_once(tmp_path, pg_url):
    counts = _two_dispatchers_claim_each_once(tmp_path, pg_url)
    print("claims per dispatcher:", counts)
    assert sum(counts) == 20


def test_two_dispatchers_on_sqlite_claim_each_exactly_once(tmp_path, sqlite_url):
    counts = _two_dispatchers_claim_each_once(tmp_path, sqlite_url)
    assert sum(counts) == 20


def test_dispatcher_cli_needs_a_ray_address_for_the_ray_executor():
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "IGAT_RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "service.dispatcher", "--executor", "ray", "--once"], env=env,
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert r.returncode == 2 and "IGAT_RAY_ADDRESS" in r.stdout


@pytest.mark.postgres
def test_only_an_unreachable_database_counts_as_no_ones_fault(pg_url):
    """A refused value is the experiment's fault (it fails); a server that cannot be reached is not (retried)."""
    from sqlalchemy import text

    from service.dispatcher import database_unavailable, describe

    engine = make_engine(pg_url)
    with pytest.raises(Exception) as refused, engine.connect() as connection:
        connection.execute(text("SELECT :t"), {"t": "a\x00b"})
    engine.dispose()
    assert not database_unavailable(refused.value)
    assert describe(refused.value) == "DataError: PostgreSQL text fields cannot contain NUL (0x00) bytes"
    gone = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres",
                       connect_args={"connect_timeout": 2})
    with pytest.raises(Exception) as unreachable, gone.connect():
        pass
    gone.dispose()
    assert database_unavailable(unreachable.value)
