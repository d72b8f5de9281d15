"""Studies through the service: the store queues a study's plan with its dependencies (SQLite and PostgreSQL), the
queue claims a run only once the base it loads is ready, in a deterministic order, and fails the runs whose base
can never come; the REST routes; and one study through ``igat serve`` and ``igat submit --wait`` with the real
runner, its dispatcher killed mid-study, against the same study run by ``igat study``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from igat_core.rundir import REPORT_FILE, RESULTS_FILE, STUDY_FILE, model_checkpoint, run_dir_of
from igat_core.study_spec import parse_study, plan_study
from service import store, studies
from service.db import make_engine, make_session_factory, session_scope
from service.dispatcher import Dispatcher
from service.models import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, Experiment, Study
from workers.executors import ExperimentRun, RunState

try:
    from tests.service_fixtures import (  # noqa: F401
        AUTH, ROOT, TINY_EXPERIMENT, TOKEN, db_url, events_of, fake_runner, fake_spec, make_client, make_settings,
        metrics_of, pg_url, queue, read_jsonl, sessions, sqlite_url, status_of, wait_for,
    )
except ImportError:
    from service_fixtures import (  # noqa: F401
        AUTH, ROOT, TINY_EXPERIMENT, TOKEN, db_url, events_of, fake_runner, fake_spec, make_client, make_settings,
        metrics_of, pg_url, queue, read_jsonl, sessions, sqlite_url, status_of, wait_for,
    )

#: Two seeds x two arms: abl-seed0-igat trains seed 0's base, abl-seed0-hard loads it; the same for seed 1.
STUDY = {"name": "abl", "experiment": fake_spec("ok", epochs=2), "grid": {"seed": [0, 1]},
         "arms": {"igat": {}, "hard": {"igat.rule": "hard"}}, "tables": ["table3"]}
B0, D0, B1, D1 = "abl-seed0-igat", "abl-seed0-hard", "abl-seed1-igat", "abl-seed1-hard"


def create(sessions, artifact_root: Path, body: dict | None = None, **kwargs) -> tuple[Study, bool]:
    study = parse_study(body or STUDY)
    with session_scope(sessions) as s:
        return store.create_study(s, spec=study.model_dump(mode="json"), plan=plan_study(study),
                                  artifact_root=artifact_root, **kwargs)


def runs_of(sessions, study_id: str) -> dict[str, Experiment]:
    with session_scope(sessions) as s:
        return {e.name: e for e in store.study_experiments(s, [study_id])[study_id]}


def claim(sessions) -> str | None:
    with session_scope(sessions) as s:
        claimed = store.claim_next(s, owner="me", lease_s=30, executor="test")
        return claimed.name if claimed else None


def pretrain_finished(sessions, experiment_id: str, already: int = 0) -> None:
    """What the dispatcher stores when the run's events.jsonl says its pretrain phase finished."""
    lines = [{"phase": "pretrain", "event": "started", "message": "pretrain"},
             {"phase": "pretrain", "event": "epoch", "message": "epoch 1", "epoch": 1},
             {"phase": "pretrain", "event": "finished", "message": "pretrain finished in 1.0s"}]
    with session_scope(sessions) as s:
        assert store.ingest_events(s, experiment_id, expected_ingested=already,
                                   events=[store.RunEvent.from_line(line) for line in lines])


def finish(sessions, experiment_id: str, status: str, **fields) -> None:
    with session_scope(sessions) as s:
        if store.get_experiment(s, experiment_id).status == QUEUED:
            store.transition(s, experiment_id, RUNNING)
        store.transition(s, experiment_id, status, **fields)


# ------------------------------------------------------------------------------------------------ the store


def test_a_study_is_queued_in_plan_order_with_its_dependencies(sessions, tmp_path):
    study, created = create(sessions, tmp_path / "artifacts")
    assert created and study.name == "abl" and [row["name"] for row in study.plan] == [B0, D0, B1, D1]
    runs = runs_of(sessions, study.id)
    assert list(runs) == [B0, D0, B1, D1]
    assert [runs[n].study_position for n in runs] == [0, 1, 2, 3]
    assert {e.status for e in runs.values()} == {QUEUED} and len({e.created_at for e in runs.values()}) == 1
    assert (runs[B0].depends_on, runs[D0].depends_on) == (None, runs[B0].id)
    assert (runs[B1].depends_on, runs[D1].depends_on) == (None, runs[B1].id)
    expected = (tmp_path / "artifacts").resolve() / runs[B0].id / model_checkpoint("base")
    assert expected == run_dir_of((tmp_path / "artifacts").resolve(), runs[B0].id) / model_checkpoint("base")
    assert runs[D0].spec["base"]["checkpoint"] == str(expected) and runs[B0].spec["base"]["checkpoint"] is None
    assert runs[D0].spec["igat"]["rule"] == "hard" and runs[D1].spec["seed"] == 1
    for e in runs.values():
        assert [(ev.seq, ev.kind, ev.data) for ev in events_of(sessions, e.id)] == [(1, "status", {"status": QUEUED})]


def test_a_study_submission_is_idempotent(sessions, tmp_path):
    first, created = create(sessions, tmp_path, idempotency_key="k", request_hash="h1")
    again, created_again = create(sessions, tmp_path, idempotency_key="k", request_hash="h1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(store.IdempotencyConflict, match="study"):
        create(sessions, tmp_path, idempotency_key="k", request_hash="h2")
    with session_scope(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 1
        assert s.scalar(select(func.count()).select_from(Experiment)) == 4


def test_a_dependent_is_claimed_only_once_its_base_is_ready(sessions, tmp_path):
    study, _ = create(sessions, tmp_path)
    runs = runs_of(sessions, study.id)
    assert [claim(sessions), claim(sessions), claim(sessions)] == [B0, B1, None]  # the dependents wait
    with session_scope(sessions) as s:
        store.ingest_events(s, runs[B0].id, expected_ingested=0, events=[store.RunEvent.from_line(
            {"phase": "pretrain", "event": "epoch", "message": "epoch 1", "epoch": 1})])
    assert claim(sessions) is None  # an epoch of the pretrain phase is not its end
    pretrain_finished(sessions, runs[B0].id, already=1)
    assert runs_of(sessions, study.id)[B0].base_ready_at is not None
    assert [claim(sessions), claim(sessions)] == [D0, None]
    finish(sessions, runs[B1].id, SUCCEEDED)  # a base that succeeded is ready too
    assert runs_of(sessions, study.id)[B1].base_ready_at is not None
    assert [claim(sessions), claim(sessions)] == [D1, None]


def test_the_claim_order_is_priority_age_then_plan_position(sessions, tmp_path):
    body = {**STUDY, "grid": {"seed": list(range(8))}, "arms": {"igat": {}}, "tables": ["table1"]}
    first, _ = create(sessions, tmp_path, body)
    second, _ = create(sessions, tmp_path, {**body, "name": "later"})
    urgent = queue(sessions, fake_spec("urgent"), priority=1)
    order = [claim(sessions) for _ in range(17)]
    assert order == ["urgent", *[f"abl-seed{i}-igat" for i in range(8)], *[f"later-seed{i}-igat" for i in range(8)]]
    assert claim(sessions) is None and urgent and first.id != second.id


def test_dependents_of_a_base_that_failed_fail_naming_it(sessions, tmp_path):
    study, _ = create(sessions, tmp_path)
    runs = runs_of(sessions, study.id)
    assert [claim(sessions), claim(sessions)] == [B0, B1]
    finish(sessions, runs[B0].id, FAILED, error="the runner exited with code 1")
    pretrain_finished(sessions, runs[B1].id)
    finish(sessions, runs[B1].id, FAILED, error="out of memory while fine-tuning")  # after its base was ready
    with session_scope(sessions) as s:
        failed = store.fail_blocked_dependents(s)
    assert [e.name for e in failed] == [D0]
    runs = runs_of(sessions, study.id)
    assert runs[D0].status == FAILED and B0 in runs[D0].error and runs[B0].id in runs[D0].error
    assert "failed before its pretrained base was ready" in runs[D0].error
    assert events_of(sessions, runs[D0].id)[-1].message == f"failed: {runs[D0].error}"
    assert runs[D1].status == QUEUED and claim(sessions) == D1  # its base exists: it runs
    with session_scope(sessions) as s:
        assert store.fail_blocked_dependents(s) == []


def test_cancelling_a_study_cancels_every_unfinished_run(sessions, tmp_path):
    study, _ = create(sessions, tmp_path)
    runs = runs_of(sessions, study.id)
    assert claim(sessions) == B0
    finish(sessions, runs[B1].id, SUCCEEDED)
    with session_scope(sessions) as s:
        cancelled = store.request_study_cancel(s, study.id)
    assert cancelled.cancel_requested_at is not None
    runs = runs_of(sessions, study.id)
    assert {n: e.status for n, e in runs.items()} == {B0: CANCELLING, D0: CANCELLED, B1: SUCCEEDED, D1: CANCELLED}
    assert studies.study_status(cancelled, list(runs.values())) == CANCELLING
    with session_scope(sessions) as s:
        store.request_study_cancel(s, study.id)  # again while one is still cancelling: fine
    finish(sessions, runs[B0].id, CANCELLED)
    assert studies.study_status(cancelled, list(runs_of(sessions, study.id).values())) == CANCELLED
    with session_scope(sessions) as s, pytest.raises(store.StudyFinished):
        store.request_study_cancel(s, study.id)
    with session_scope(sessions) as s, pytest.raises(store.StudyNotFound, match="no study"):
        store.request_study_cancel(s, "nope")


# ------------------------------------------------------------------------------------------- the dispatcher


class ScriptedExecutor:
    """Runs nothing: a run ends at its first poll, succeeded (results.json written) unless its name is in
    ``failing``. Records the order of starts and the most runs it had at once."""

    name = "scripted"

    def __init__(self, failing: frozenset[str] = frozenset()):
        self.failing = failing
        self.started: list[str] = []
        self.live: set[str] = set()
        self.most = 0

    def start(self, run: ExperimentRun):
        self.started.append(run.spec["name"])
        self.live.add(run.experiment_id)
        self.most = max(self.most, len(self.live))
        run.run_dir.mkdir(parents=True, exist_ok=True)
        return {"name": run.spec["name"], "run_dir": str(run.run_dir), "id": run.experiment_id}

    def poll(self, handle):
        self.live.discard(handle["id"])
        if handle["name"] in self.failing:
            return RunState(running=False, exit_code=1)
        (Path(handle["run_dir"]) / "results.json").write_text("{}")
        return RunState(running=False, exit_code=0)

    def cancel(self, handle, *, force=False):
        pass

    def attach(self, handle):
        return False

    def find(self, run_dir):
        return None

    def release(self, handle):
        pass

    def error_tail(self, handle, max_chars=4000):
        return ""


def test_the_dispatcher_runs_ready_work_while_dependents_wait(tmp_path, sqlite_url):
    from tests.service_fixtures import create_schema

    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, max_concurrent_experiments=3)
    study, _ = create(sessions, settings.artifact_root)
    other = queue(sessions, fake_spec("independent"))
    executor = ScriptedExecutor()
    dispatcher = Dispatcher(settings, session_factory=sessions, executor=executor)
    dispatcher.tick()
    assert executor.started == [B0, B1, "independent"]  # the two dependents hold no slot
    dispatcher.tick()  # the three end; both bases are ready: their dependents start
    assert executor.started == [B0, B1, "independent", D0, D1]
    dispatcher.tick()
    assert {e.status for e in runs_of(sessions, study.id).values()} == {SUCCEEDED}
    assert status_of(sessions, other).status == SUCCEEDED and executor.most == 3


def test_the_dispatcher_fails_the_dependents_of_a_failed_base(tmp_path, sqlite_url):
    from tests.service_fixtures import create_schema

    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, max_concurrent_experiments=4)
    study, _ = create(sessions, settings.artifact_root)
    executor = ScriptedExecutor(failing=frozenset({B0}))
    dispatcher = Dispatcher(settings, session_factory=sessions, executor=executor)
    for _ in range(4):
        dispatcher.tick()
    runs = runs_of(sessions, study.id)
    assert {n: e.status for n, e in runs.items()} == {B0: FAILED, D0: FAILED, B1: SUCCEEDED, D1: SUCCEEDED}
    assert executor.started == [B0, B1, D1] and f"its base experiment {B0}" in runs[D0].error


# -------------------------------------------------------------------------------------------------- the API


@pytest.fixture
def settings(tmp_path, db_url):
    return make_settings(tmp_path, db_url)


@pytest.fixture
def client(settings, sessions):
    with make_client(settings, sessions) as c:
        yield c


def results_of(natural: float, pgd: float) -> dict:
    return {"evaluation": {"eps": 0.1, "n_examples": 16, "base": {"average": {"natural": 80.0, "pgd": 10.0}},
                           "igat": {"average": {"natural": natural, "pgd": pgd}}}}


def row(table: list[dict], **match) -> dict:
    (found,) = [r for r in table if all(r[k] == v for k, v in match.items())]
    return found


def test_submit_read_list_results_and_cancel_a_study(client, sessions, tmp_path):
    r = client.post("/studies", json=STUDY, headers=AUTH, params={"priority": 2})
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/studies/{body['id']}" == body["links"]["self"]
    assert (body["status"], body["runs"], body["progress"], body["priority"]) == ("queued", 4, 0.0, 2)
    assert body["counts"]["queued"] == 4 and body["spec"]["reference_arm"] == "igat"
    runs = {run["name"]: run for run in body["experiments"]}
    assert list(runs) == [B0, D0, B1, D1]
    assert (runs[D0]["arm"], runs[D0]["point"], runs[D0]["base_of"], runs[D0]["depends_on"]) == (
        "hard", {"seed": 0}, B0, runs[B0]["id"])
    detail = client.get(f"/experiments/{runs[D0]['id']}").json()
    assert (detail["study_id"], detail["depends_on"], detail["priority"]) == (body["id"], runs[B0]["id"], 2)
    assert client.get(r.headers["location"]).json()["experiments"] == body["experiments"]

    pending = client.get(f"/studies/{body['id']}/results").json()
    assert pending["id"] == body["id"] and pending["counts"] == {"planned": 4, "succeeded": 0, "pending": 4,
                                                                 "failed": 0}
    assert row(pending["table3"], arm="hard", attack="pgd", combiner="average")["pending"] == 2

    for name, result in ((B0, results_of(90.0, 40.0)), (D0, results_of(88.0, 45.0))):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(result))
        finish(sessions, runs[name]["id"], SUCCEEDED, run_dir=str(run_dir))
    finish(sessions, runs[B1]["id"], FAILED, error="the runner exited with code 1\nRuntimeError: boom")
    now = client.get(f"/studies/{body['id']}").json()
    assert (now["status"], now["progress"], now["counts"]["succeeded"], now["counts"]["failed"]) == (
        "running", 0.75, 2, 1)
    record = client.get(f"/studies/{body['id']}/results").json()
    assert record["counts"] == {"planned": 4, "succeeded": 2, "pending": 1, "failed": 1}
    hard = row(record["table3"], arm="hard", attack="pgd", combiner="average")
    assert (hard["mean"], hard["n"], hard["pending"]) == (45.0, 1, 1)
    assert hard["difference"]["mean"] == 5.0
    assert row(record["table3"], arm="igat", attack="pgd", combiner="average")["failed"] == 1
    assert {r["name"]: r["status"] for r in record["runs"]} == {B0: "succeeded", D0: "succeeded", B1: "failed",
                                                                D1: "queued"}

    second = client.post("/studies", json={**STUDY, "name": "second"}, headers=AUTH).json()
    page = client.get("/studies", params={"limit": 1}).json()
    assert page["total"] == 2 and [s["id"] for s in page["items"]] == [second["id"]]  # newest first
    assert client.get("/studies", params={"offset": 1}).json()["items"][0]["counts"]["succeeded"] == 2

    cancelled = client.post(f"/studies/{body['id']}/cancel", headers=AUTH)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["counts"]["cancelled"] == 1 and cancelled.json()["cancel_requested_at"]
    again = client.post(f"/studies/{body['id']}/cancel", headers=AUTH)
    assert again.status_code == 409 and "already finished" in again.json()["detail"]
    whole = client.post(f"/studies/{second['id']}/cancel", headers=AUTH).json()
    assert whole["status"] == "cancelled" and whole["counts"]["cancelled"] == 4


@pytest.mark.parametrize("body,field,needle", [
    ({**STUDY, "grid": {"seed": [0], "igat.rule": ["soft", "hard", "median"]}}, "grid.igat.rule[2]", "'soft'"),
    ({**STUDY, "experiment": {**STUDY["experiment"], "ensemble": {"members": 0}}}, "experiment.ensemble.members",
     "greater than or equal to 1"),
    ({**STUDY, "arms": {"igat": {}, "gal": {"base.method": "gal"}}}, "arms.gal.base.method", "only igat.*"),
    ({**STUDY, "grids": {}}, "grids", "Extra inputs"),
    ({**STUDY, "name": "bad name!"}, "name", "pattern"),
    ([STUDY], "(root)", "dictionary"),
])
def test_an_invalid_study_is_a_422_naming_its_field(client, body, field, needle):
    r = client.post("/studies", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    problems = {p["field"]: p["msg"] for p in r.json()["detail"]}
    assert field in problems and needle in problems[field], problems
    assert field in r.json()["message"]
    assert client.get("/studies").json()["total"] == 0


def test_study_mutations_need_the_token_and_unknown_ids_are_404(client):
    study = client.post("/studies", json=STUDY, headers=AUTH).json()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for path in ("/studies", f"/studies/{study['id']}/cancel"):
            r = client.post(path, json=STUDY, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert client.get(f"/studies/{study['id']}").json()["status"] == "queued"
    assert client.get("/studies").json()["total"] == 1
    for method, path in (("GET", "/studies/nope"), ("GET", "/studies/nope/results"),
                         ("POST", "/studies/nope/cancel"), ("GET", "/studies/%00")):
        r = client.request(method, path, headers=AUTH)
        assert r.status_code == 404 and "no study" in r.json()["detail"], (path, r.text)


def test_a_study_submission_honours_the_idempotency_key(client):
    key = {**AUTH, "Idempotency-Key": "study-1"}
    first = client.post("/studies", json=STUDY, headers=key)
    again = client.post("/studies", json=STUDY, headers=key)
    assert first.status_code == again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    other = client.post("/studies", json={**STUDY, "grid": {"seed": [0, 1, 2]}}, headers=key)
    assert other.status_code == 422 and "already used" in other.json()["detail"]
    assert client.post("/studies", json=STUDY, headers=key, params={"priority": 1}).status_code == 422
    reordered = {**STUDY, "arms": {"hard": {"igat.rule": "hard"}, "igat": {}}}  # the hard arm would train the base
    assert client.post("/studies", json=reordered, headers=key).status_code == 422
    assert client.get("/studies").json()["total"] == 1
    assert client.get("/experiments").json()["total"] == 4


def test_the_openapi_lists_the_study_routes(client):
    spec = client.get("/openapi.json").json()
    assert {"/studies", "/studies/{study_id}", "/studies/{study_id}/results", "/studies/{study_id}/cancel"} <= set(
        spec["paths"])
    body = spec["paths"]["/studies"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/StudySpec"
    study = spec["components"]["schemas"]["StudySpec"]
    assert {"experiment", "grid", "arms", "variants", "tables"} <= set(study["properties"])


class InProcess:
    """What `service.cli._client` returns, for the app's TestClient (already started; each command reuses it)."""

    def __init__(self, client):
        self.client = client

    def __enter__(self):
        return self.client

    def __exit__(self, *exc) -> None:
        return None


def test_the_igat_client_submits_shows_and_cancels_a_study(client, monkeypatch, tmp_path):
    """`igat submit` recognises a study spec; status, results and cancel take a study's id as well (the client
    talks to the real app in-process)."""
    from typer.testing import CliRunner

    from service import cli

    client.headers.update(AUTH)
    monkeypatch.setattr(cli, "_client", lambda timeout=30.0: InProcess(client))
    app, runner = cli.igat_app(), CliRunner()
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    submitted = runner.invoke(app, ["submit", str(path)])
    assert submitted.exit_code == 0, submitted.output
    study_id = submitted.output.split()[0]
    assert "queued (study abl, 4 runs)" in submitted.output
    shown = runner.invoke(app, ["status", study_id]).output
    assert f"{study_id}  study abl" in shown and f"queued     {D0} (base from {B0})" in shown
    assert json.loads(runner.invoke(app, ["results", study_id]).output)["counts"]["pending"] == 4
    recent = runner.invoke(app, ["status"]).output.splitlines()
    assert recent[0].startswith(f"{study_id}  queued     study abl  (0% of 4 runs finished; created ")
    assert recent[1] == "1 of 1 studies" and recent[-1] == "4 of 4 experiment(s)"
    assert sum(f"queued     {name}  (created " in line for line in recent for name in (B0, D0, B1, D1)) == 4
    assert runner.invoke(app, ["cancel", study_id]).output.strip() == f"{study_id} cancelled"
    again = runner.invoke(app, ["cancel", study_id])
    assert again.exit_code == 1 and "already finished" in again.output
    missing = runner.invoke(app, ["status", "nope"])
    assert missing.exit_code == 1 and "404" in missing.output and "no experiment" in missing.output
    path.write_text(yaml.safe_dump({**STUDY, "grid": {"seed": [0, 0]}}, sort_keys=False))
    refused = runner.invoke(app, ["submit", str(path)])
    assert refused.exit_code == 2 and "grid.seed[1]: repeats 0" in refused.output


# ------------------------------------------------------------------------------ end to end, real runner

ABLATION = {"name": "svc", "experiment": TINY_EXPERIMENT, "grid": {"seed": [0, 1]},
            "arms": {"igat": {"controls": ["global_at"]}, "hard": {"igat.rule": "hard"}},
            "tables": ["table3", "table2"]}
BASES = {"svc-seed0-igat": "svc-seed0-hard", "svc-seed1-igat": "svc-seed1-hard"}


def _experiment(sessions, name: str) -> Experiment | None:
    with session_scope(sessions) as s:
        return s.scalar(select(Experiment).where(Experiment.name == name))


def _past_pretrain(sessions, artifact_root: Path, name: str) -> Experiment | None:
    """The experiment once its own events.jsonl (not yet the database) says its pretrain phase finished."""
    experiment = _experiment(sessions, name)
    if experiment is None or experiment.executor_handle is None:
        return None
    lines = read_jsonl(run_dir_of(artifact_root, experiment.id) / "events.jsonl")
    return experiment if any(x["phase"] == "pretrain" and x["event"] == "finished" for x in lines) else None


def _kill_mid_study(sessions, artifact_root: Path) -> bool:
    """Once seed 0's base has pretrained: freeze its runner, SIGKILL the dispatcher (``igat serve`` starts another),
    then SIGKILL the frozen runner, so that the new dispatcher finds it lost and re-queues it. The runner of seed 1's
    base is left running (re-attached). Returns whether the killed runner had not finished yet."""
    base = wait_for(lambda: _past_pretrain(sessions, artifact_root, "svc-seed0-igat"), 600, interval=0.02,
                    what="seed 0's base to finish pretraining")
    pgid = base.executor_handle["pgid"]
    os.killpg(pgid, signal.SIGSTOP)
    unfinished = not (run_dir_of(artifact_root, base.id) / "results.json").exists()
    os.kill(int(base.lease_owner.rsplit(":", 2)[1]), signal.SIGKILL)
    os.killpg(pgid, signal.SIGKILL)
    return unfinished


def _phases(run_dir: Path, event: str) -> list[str]:
    return [x["phase"] for x in read_jsonl(run_dir / "events.jsonl") if x["event"] == event]


def _check_runs(sessions, artifact_root: Path, study_id: str) -> dict[str, Experiment]:
    """Every run ended once, succeeded; each finished phase ran once; each seed's base was trained by its base run
    alone and loaded by the other arm, which was claimed only after that base was ready."""
    runs = runs_of(sessions, study_id)
    for name, e in runs.items():
        terminal = [ev for ev in events_of(sessions, e.id) if ev.kind == "status" and ev.data["status"] in TERMINAL]
        assert [ev.data["status"] for ev in terminal] == [SUCCEEDED], (name, e.error)
        finished = _phases(Path(e.run_dir), "finished")
        assert len(finished) == len(set(finished)), (name, finished)  # no finished phase repeated
    for base, dependent in BASES.items():
        trainer, loader = Path(runs[base].run_dir), Path(runs[dependent].run_dir)
        assert _phases(trainer, "started").count("pretrain") == 1
        assert [m["phase"] for m in read_jsonl(trainer / "metrics.jsonl")].count("pretrain") == 1
        assert "loaded" not in json.loads((trainer / "state.json").read_text())["phases"]["pretrain"]
        loaded = json.loads((loader / "state.json").read_text())["phases"]["pretrain"]["loaded"]
        assert loaded == str(trainer.resolve() / model_checkpoint("base"))
        assert "pretrain" not in {m["phase"] for m in read_jsonl(loader / "metrics.jsonl")}
        assert "pretrain" not in {phase for phase, _, _ in metrics_of(sessions, runs[dependent].id)}
        assert runs[dependent].depends_on == runs[base].id and runs[base].base_ready_at is not None
        claimed = [ev.time for ev in events_of(sessions, runs[dependent].id)
                   if ev.kind == "status" and ev.data["status"] == RUNNING]
        assert claimed[0] > runs[base].base_ready_at  # queued until its base was ready, not started to race it
    return runs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_study_through_the_service_survives_a_killed_dispatcher_and_matches_igat_study(tmp_path, sqlite_url):
    from igat_core.study import run_study

    try:
        from tests.test_service_e2e import serve, stop
    except ImportError:
        from test_service_e2e import serve, stop

    settings = make_settings(tmp_path, sqlite_url, max_concurrent_experiments=2, dispatcher_poll_s=0.2, lease_s=60.0)
    artifact_root = settings.artifact_root.resolve()
    spec_file = tmp_path / "ablation.yaml"
    spec_file.write_text(yaml.safe_dump(ABLATION, sort_keys=False))
    served = serve(tmp_path, settings)
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    env = {**os.environ, "IGAT_API_URL": served.url, "IGAT_API_TOKEN": TOKEN, "IGAT_POLL_S": "0.5",
           "PYTHONPATH": str(ROOT)}
    submit = subprocess.Popen([sys.executable, "-m", "service", "submit", str(spec_file), "--wait"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        caught = _kill_mid_study(sessions, artifact_root)
        print(f"seed 0's base runner killed before it finished: {caught}")
        out, err = submit.communicate(timeout=700)
        assert submit.returncode == 0, (out, err, served.log.read_text()[-3000:])
        study_id = out.split()[0]
        with served.client() as client:
            record = client.get(f"/studies/{study_id}/results").json()
        fetched = subprocess.run([sys.executable, "-m", "service", "results", study_id, "--into", "fetched"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert fetched.returncode == 0, fetched.stderr
    finally:
        if submit.poll() is None:
            submit.kill()
        stop(served)
        engine.dispose()
    assert "## Table 3" in out and "study succeeded" in out
    runs = _check_runs(sessions, artifact_root, study_id)
    if caught:  # the killed base was re-queued and resumed after its pretrain phase
        assert runs["svc-seed0-igat"].attempt == 2
        assert any(m.startswith("re-queued") for m in (ev.message for ev in events_of(sessions, runs[
            "svc-seed0-igat"].id)))
    assert "restarting it" in served.log.read_text()
    starts = sorted((ev.time, ev.data["status"], name) for name, e in runs.items() for ev in events_of(sessions, e.id)
                    if ev.kind == "status" and ev.data["status"] in (RUNNING, SUCCEEDED, FAILED))
    live, most = set(), 0
    for _, status, name in starts:
        (live.add if status == RUNNING else live.discard)(name)
        most = max(most, len(live))
    assert most == 2  # the two seeds' bases ran side by side
    assert record["counts"] == {"planned": 4, "succeeded": 4, "pending": 0, "failed": 0}
    assert {r["n"] for r in record["table3"]} == {2}

    local = run_study(parse_study(ABLATION), tmp_path / "local", progress=False, echo=lambda _line: None)
    assert local["table3"] == record["table3"]
    assert local["table2"] == record["table2"]
    _check_fetched_like_local(tmp_path / "fetched", tmp_path / "local", record)


def _check_fetched_like_local(fetched: Path, local: Path, record: dict) -> None:
    """`igat results STUDY --into DIR` writes what `igat study --out DIR` writes, checkpoints aside."""
    assert json.loads((fetched / STUDY_FILE).read_text()) == json.loads((local / STUDY_FILE).read_text())
    assert json.loads((fetched / RESULTS_FILE).read_text()) == record
    run_files = sorted(p.relative_to(fetched) for p in fetched.glob("runs/*/results.json"))
    assert run_files == sorted(p.relative_to(local) for p in local.glob("runs/*/results.json")) and len(run_files) == 4
    for name in run_files:
        ours, theirs = (json.loads((d / name).read_text()) for d in (fetched, local))
        assert ours["spec"]["seed"] == theirs["spec"]["seed"] and ours["evaluation"] == theirs["evaluation"]
    assert "## Table 3" in (fetched / REPORT_FILE).read_text()
