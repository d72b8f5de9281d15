"""MLflow tracking (service/tracking.py) against a real MLflow tracking server started on 127.0.0.1 for this module,
read back through MLflow's own client; experiments run through the dispatcher with the stand-in runner.

MLflow is imported inside the tests only, so collecting this module costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from igat_core.study_spec import parse_study, plan_study
from service import store, studies
from service.db import make_session_factory, session_scope
from service.dispatcher import Dispatcher
from service.tracking import MAX_PARAM_VALUE, flat_params

try:
    from tests.service_fixtures import (  # noqa: F401
        FAKE_RUNNER, ROOT, create_schema, db_url, events_of, fake_runner, fake_spec, free_port, make_settings,
        metrics_of, pg_url, queue, read_jsonl, sessions, sqlite_url, status_of, wait_for,
    )
except ImportError:
    from service_fixtures import (  # noqa: F401
        FAKE_RUNNER, ROOT, create_schema, db_url, events_of, fake_runner, fake_spec, free_port, make_settings,
        metrics_of, pg_url, queue, read_jsonl, sessions, sqlite_url, status_of, wait_for,
    )


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend, artifacts served by it) for the whole module."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "artifacts")],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or healthy(uri), 300, interval=0.2, what="the MLflow server")
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # a throwaway server: nothing to shut down gracefully
        server.wait()


def healthy(uri: str) -> bool:
    try:
        return httpx.get(f"{uri}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(autouse=True)
def _quiet_client(monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_S", "0.02")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client_of(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_of(client, experiment_id: str):
    """The MLflow run tagged with the igat experiment's id (exactly one)."""
    igat = client.get_experiment_by_name("igat")
    runs = client.search_runs([igat.experiment_id], filter_string=f"tags.`igat.experiment_id` = '{experiment_id}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def file_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as MLflow should hold it: {"<phase>/<name>": [(epoch, value), ...]}."""
    found: dict[str, list[tuple[int, float]]] = {}
    for line in read_jsonl(run_dir / "metrics.jsonl"):
        for name, value in line.items():
            if name not in ("phase", "epoch"):
                found.setdefault(f"{line['phase']}/{name}", []).append((line["epoch"], value))
    return {key: sorted(steps) for key, steps in found.items()}


def drive_until_tracked(dispatcher, sessions, experiment_ids, timeout=90.0):
    """Tick until every experiment has finished and its MLflow run has been ended."""
    def check():
        dispatcher.tick()
        return all(status_of(sessions, e).tracked_at is not None for e in experiment_ids)

    wait_for(check, timeout, interval=0.05, what=f"experiments {experiment_ids} to be tracked")
    return [status_of(sessions, e) for e in experiment_ids]


def downloaded(client, run_id: str, path: str, tmp_path: Path) -> bytes:
    target = tmp_path / "download" / run_id
    target.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(target))).read_bytes()


# ---------------------------------------------------------------------------------------------- the params


def test_params_are_the_flattened_spec_as_json_text():
    spec = {"name": "p", "base": {"train": {"epochs": 3, "lr": 0.1}, "method": "adp", "checkpoint": None},
            "eval": {"attacks": ["pgd", "cw"], "extra": {}}, "long": "x" * 7000, "odd key!": True}
    assert flat_params(spec) == {
        "name": "p", "base.train.epochs": "3", "base.train.lr": "0.1", "base.method": "adp", "base.checkpoint": "null",
        "eval.attacks": '["pgd", "cw"]', "eval.extra": "{}", "long": "x" * (MAX_PARAM_VALUE - 3) + "...",
        "odd key_": "true"}


# ------------------------------------------------------------------------------------------ one experiment


def test_an_experiment_is_one_mlflow_run_with_its_spec_metrics_results_and_report(tmp_path, db_url, sessions,
                                                                                   mlflow_uri, fake_runner):
    settings = make_settings(tmp_path, db_url, runner_command=fake_runner, mlflow_tracking_uri=mlflow_uri)
    e = queue(sessions, fake_spec("ok", epochs=3))
    (done,) = drive_until_tracked(Dispatcher(settings, session_factory=sessions), sessions, [e])
    assert done.status == "succeeded", done.error
    client, run_dir = client_of(mlflow_uri), Path(done.run_dir)
    run = run_of(client, e)
    assert (run.info.run_id, run.info.run_name, run.info.status) == (done.mlflow_run_id, "ok", "FINISHED")
    assert run.data.params == {"name": "ok", "base.train.epochs": "3", "base.train.lr": "0.1"}
    assert file_metrics(run_dir) == {"pretrain/loss": [(1, 1.0), (2, 0.5), (3, 1 / 3)],
                                     "pretrain/lr": [(1, 0.1), (2, 0.1), (3, 0.1)]}
    for key, steps in file_metrics(run_dir).items():
        assert history(client, run.info.run_id, key) == steps
    results = json.loads((run_dir / "results.json").read_text())
    assert history(client, run.info.run_id, "eval/base/average/natural") == [
        (0, results["evaluation"]["base"]["average"]["natural"])]
    assert set(run.data.metrics) == {"pretrain/loss", "pretrain/lr", "eval/base/average/natural"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"results.json", "report.md"}
    for name in ("results.json", "report.md"):
        assert downloaded(client, run.info.run_id, name, tmp_path) == (run_dir / name).read_bytes()
    assert not any("MLflow" in ev.message for ev in events_of(sessions, e))


def test_a_failed_run_ends_failed_and_a_cancelled_one_killed(tmp_path, sqlite_url, mlflow_uri, fake_runner,
                                                             monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_S", "0.2")
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, mlflow_tracking_uri=mlflow_uri,
                             max_concurrent_experiments=2)
    dispatcher = Dispatcher(settings, session_factory=sessions)
    failing, cancelled = queue(sessions, fake_spec("fail", epochs=1)), queue(sessions, fake_spec("ok", epochs=50))
    wait_for(lambda: dispatcher.tick() or metrics_of(sessions, cancelled), 60, what="the first epoch")
    with session_scope(sessions) as s:
        store.request_cancel(s, cancelled)
    drive_until_tracked(dispatcher, sessions, [failing, cancelled])
    client = client_of(mlflow_uri)
    runs = {e: run_of(client, e) for e in (failing, cancelled)}
    assert {e: r.info.status for e, r in runs.items()} == {failing: "FAILED", cancelled: "KILLED"}
    assert runs[failing].data.params["name"] == "fail" and runs[failing].data.metrics == {}
    logged = history(client, runs[cancelled].info.run_id, "pretrain/loss")
    assert logged and logged == file_metrics(Path(status_of(sessions, cancelled).run_dir))["pretrain/loss"]


# ------------------------------------------------------------------------------------------------ a study


def test_a_study_is_a_parent_run_its_experiments_are_nested_in(tmp_path, sqlite_url, mlflow_uri, fake_runner):
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, mlflow_tracking_uri=mlflow_uri,
                             max_concurrent_experiments=2)
    study_spec = parse_study({"name": "nest", "experiment": fake_spec("ok", epochs=2),
                              "arms": {"igat": {}, "hard": {"igat.rule": "hard"}}, "tables": ["table3"]})
    with session_scope(sessions) as s:
        study, _ = store.create_study(s, spec=study_spec.model_dump(mode="json"), plan=plan_study(study_spec),
                                      artifact_root=settings.artifact_root)
    with session_scope(sessions) as s:
        experiments = store.study_experiments(s, [study.id])[study.id]
    dispatcher = Dispatcher(settings, session_factory=sessions)
    drive_until_tracked(dispatcher, sessions, [e.id for e in experiments])
    dispatcher.tick()  # the parent ends on the tick after its last child
    client = client_of(mlflow_uri)
    with session_scope(sessions) as s:
        study, experiments = store.get_study(s, study.id), store.study_experiments(s, [study.id])[study.id]
    parent = client.get_run(study.mlflow_run_id)
    assert (parent.info.run_name, parent.info.status, parent.data.tags["igat.study_id"]) == ("nest", "FINISHED",
                                                                                           study.id)
    assert parent.data.params["name"] == "nest" and parent.data.params["arms.hard.igat.rule"] == "hard"
    assert study.tracked_at is not None
    record = json.loads(downloaded(client, parent.info.run_id, "results.json", tmp_path))
    assert record == json.loads(json.dumps(studies.results(study, experiments, settings.artifact_root)))
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(e.name for e in experiments) == [
        "nest-hard", "nest-igat"]
    by_name = {e.name: e for e in experiments}
    for child in children:
        experiment = by_name[child.info.run_name]
        assert child.info.run_id == experiment.mlflow_run_id and child.info.status == "FINISHED"
        assert child.data.params == flat_params(experiment.spec)
        assert history(client, child.info.run_id, "pretrain/loss") == [(1, 1.0), (2, 0.5)]


# ----------------------------------------------------------------------------------------- restart, outage


def test_a_dispatcher_that_takes_a_run_over_logs_each_step_once(tmp_path, sqlite_url, mlflow_uri, fake_runner,
                                                                 monkeypatch):
    """The first dispatcher logs some epochs and stops; the next one re-attaches to the run and, with nothing in
    memory (and every metric row stored again), logs the rest: each step once, in the same MLflow run."""
    monkeypatch.setenv("FAKE_EPOCH_S", "0.3")
    epochs, client = 10, client_of(mlflow_uri)  # MLflow imported before the run starts
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, mlflow_tracking_uri=mlflow_uri,
                             lease_s=0.3)
    e = queue(sessions, fake_spec("ok", epochs=epochs))
    first = Dispatcher(settings, session_factory=sessions, owner="gone-host:1:first")
    first.tick()
    pid, run_dir = status_of(sessions, e).executor_handle["pid"], Path(status_of(sessions, e).run_dir)
    try:
        wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 2, 60, interval=0.02, what="two epochs")
        os.killpg(pid, signal.SIGSTOP)  # mid-run whatever the machine's load (SIGCONT below)
        first.tick()
        early = history(client, status_of(sessions, e).mlflow_run_id, "pretrain/loss")
        assert len(early) >= 2 and status_of(sessions, e).status == "running"
        time.sleep(0.4)  # the first dispatcher's lease expires
        second = Dispatcher(settings, session_factory=sessions)
        second.tick()
    finally:
        os.killpg(pid, signal.SIGCONT)
    (done,) = drive_until_tracked(second, sessions, [e])
    assert done.status == "succeeded" and any("re-attached" in ev.message for ev in events_of(sessions, e))
    run = run_of(client, e)
    assert run.info.run_id == done.mlflow_run_id and run.info.status == "FINISHED"
    for key, steps in file_metrics(Path(done.run_dir)).items():
        assert history(client, run.info.run_id, key) == steps
    assert [step for step, _ in history(client, run.info.run_id, "pretrain/loss")] == list(range(1, epochs + 1))


def test_mlflow_being_away_fails_nothing_and_a_later_dispatcher_catches_up(tmp_path, sqlite_url, mlflow_uri,
                                                                          fake_runner):
    sessions = make_session_factory(create_schema(sqlite_url))
    away = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, lease_s=0.3,
                         mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    e = queue(sessions, fake_spec("ok", epochs=3))
    dispatcher = Dispatcher(away, session_factory=sessions)
    wait_for(lambda: dispatcher.tick() or status_of(sessions, e).status == "succeeded", 60, what="the run to end")
    for _ in range(3):
        dispatcher.tick()
    done = status_of(sessions, e)
    assert (done.status, done.error, done.mlflow_run_id, done.tracked_at) == ("succeeded", None, None, None)
    failures = [ev.message for ev in events_of(sessions, e) if "MLflow" in ev.message]
    assert len(failures) == 1 and failures[0].startswith("MLflow tracking failed: MlflowException: API request to")
    assert failures[0].endswith("; retrying on the next tick")
    time.sleep(0.4)  # its lease on finishing the run's tracking expires
    back = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, mlflow_tracking_uri=mlflow_uri)
    (done,) = drive_until_tracked(Dispatcher(back, session_factory=sessions), sessions, [e])
    client = client_of(mlflow_uri)
    run = run_of(client, e)
    assert run.info.status == "FINISHED" and run.data.params["base.train.epochs"] == "3"
    assert history(client, run.info.run_id, "pretrain/loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert math.isclose(run.data.metrics["eval/base/average/natural"], 90.0)


# ------------------------------------------------------------------------------------------ without the URI

NO_MLFLOW = """
import json, sys
from service import store
from service.db import make_engine, make_session_factory, session_scope
from service.dispatcher import Dispatcher
from service.models import Base
from service.settings import get_settings

engine = make_engine(get_settings().database_url)
Base.metadata.create_all(engine)
sessions = make_session_factory(engine)
with session_scope(sessions) as s:
    e, _ = store.create_experiment(s, spec={"name": "ok", "base": {"train": {"epochs": 2, "lr": 0.1}}}, name="ok")
dispatcher = Dispatcher(get_settings(), session_factory=sessions)
while True:
    dispatcher.tick()
    with session_scope(sessions) as s:
        if store.get_experiment(s, e.id).status not in ("queued", "running"):
            break
with session_scope(sessions) as s:
    status = store.get_experiment(s, e.id).status
    print(store.get_experiment(s, e.id).error)
print(json.dumps([status, sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")]))
"""


def test_without_the_tracking_uri_mlflow_is_never_imported(tmp_path):
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    env = {key: value for key, value in os.environ.items() if key != "IGAT_MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": str(ROOT), "IGAT_DATABASE_URL": f"sqlite:///{tmp_path / 'igat.db'}",
            "IGAT_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "IGAT_DISPATCHER_POLL_S": "0.05",
            "IGAT_RUNNER_COMMAND": json.dumps([sys.executable, str(runner)])}
    r = subprocess.run([sys.executable, "-c", NO_MLFLOW], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["succeeded", []], r.stdout
