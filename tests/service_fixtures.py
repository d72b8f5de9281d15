"""Fixtures and helpers shared by the service and dispatcher tests (imported by those test files; not a conftest).

Databases are real: a SQLite file under tmp_path, and a fresh ``igat_test_<random>`` database on the
machine's PostgreSQL (127.0.0.1:5432, user postgres), dropped afterwards. PostgreSQL tests are marked
``postgres`` and fail when the server cannot be reached (``-m "not postgres"`` leaves them out deliberately).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from service import store
from service.db import session_scope
from service.models import Event, Metric
from service.storable import storable_text

ROOT = Path(__file__).resolve().parents[1]
PG_HOST = os.environ.get("IGAT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("IGAT_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("IGAT_TEST_PG_USER", "postgres")
TOKEN = "test-token-0123456789"

_pg_reachable: bool | None = None


def pg_reachable() -> bool:
    global _pg_reachable
    if _pg_reachable is None:
        try:
            import psycopg

            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3):
                _pg_reachable = True
        except Exception:
            _pg_reachable = False
    return _pg_reachable


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not pg_reachable():
        pytest.fail(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}: start it (.ci/run does) or deselect "
                    "these tests with -m 'not postgres'")
    name = f"igat_test_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'igat.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


def make_settings(tmp_path: Path, url: str, **overrides: Any):
    from service.settings import Settings

    values: dict[str, Any] = {
        "database_url": url,
        "artifact_root": tmp_path / "artifacts",
        "api_token": TOKEN,
        "dispatcher_poll_s": 0.05,
        "sse_poll_s": 0.05,
        "lease_s": 30.0,
        "cancel_grace_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


def create_schema(url: str):
    """An engine on ``url`` with the schema created from the models (fast; migrations have their own test)."""
    from service.db import make_engine
    from service.models import Base

    engine = make_engine(url)
    Base.metadata.create_all(engine)
    return engine


@pytest.fixture
def sessions(db_url: str):
    from service.db import make_session_factory

    engine = create_schema(db_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_client(settings, sessions=None, **kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's note about httpx vs httpx2
        from fastapi.testclient import TestClient

    from service.app import create_app

    return TestClient(create_app(settings, session_factory=sessions), **kwargs)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- fake runner

#: A stand-in for `igat run` for the fast dispatcher tests: same command line, same files, resumable.
#: Behaviour by spec name: ok (default), fail (exit 1), badspec (exit 2), noresults (exit 0, no results.json),
#: stubborn (ignores SIGTERM), odd (also writes an event and a metric PostgreSQL refuses as they are: NUL, a lone
#: surrogate, NaN, Infinity), nul (odd, then fails with a NUL in its error), eventsdir (makes events.jsonl a
#: directory, which no dispatcher can read, and waits a minute).
#: Epochs: base.train.epochs; seconds per epoch: FAKE_EPOCH_S. A run whose name is a folder of FAKE_RESULTS_DIR
#: also writes training progress events and an `acc` metric per epoch, then an evaluation progress event per number
#: of that folder's results.json, and leaves the folder's files (results.json, plots, checkpoints) as its own.
FAKE_RUNNER = textwrap.dedent(
    '''
    import json, os, shutil, sys, time, pathlib, yaml
    from datetime import datetime, timezone

    spec = yaml.safe_load(open(sys.argv[1]))
    out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    mode = spec["name"]
    epochs = spec["base"]["train"]["epochs"]
    delay = float(os.environ.get("FAKE_EPOCH_S", "0.02"))
    ckpt = out / "checkpoint.json"
    prepared = pathlib.Path(os.environ.get("FAKE_RESULTS_DIR") or "/nonexistent") / mode
    start = json.loads(ckpt.read_text())["epoch"] if ckpt.exists() else 0
    if mode == "eventsdir":
        (out / "events.jsonl").mkdir(exist_ok=True)
        time.sleep(60)
        sys.exit(0)

    def event(**fields):
        fields = {"time": datetime.now(timezone.utc).isoformat(), **fields}
        with open(out / "events.jsonl", "a") as f:
            f.write(json.dumps(fields) + "\\n")

    # a resumed run rewrites metrics.jsonl without the epochs it is about to redo
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    metrics.write_text("".join(x + "\\n" for x in lines if json.loads(x)["epoch"] <= start))
    event(phase="run", event="started", message=f"fake runner from epoch {start}", resumed_from=start)
    print("fake runner starting", flush=True)
    if mode == "stubborn":
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "fail":
        print("Traceback (most recent call last):\\nRuntimeError: boom in the fake runner", file=sys.stderr)
        sys.exit(1)
    if mode == "badspec":
        print("invalid experiment spec: base.train.epochs: nope", file=sys.stderr)
        sys.exit(2)
    if mode in ("odd", "nul"):
        event(phase="pretrain", event="epoch", message="nul\\x00 here", epoch=0, note="\\ud800", loss=float("nan"))
        with open(metrics, "a") as f:
            f.write(json.dumps({"phase": "pretrain", "epoch": 0, "loss": float("nan"), "acc": float("inf")}) + "\\n")
    if mode == "nul":
        print("Traceback (most recent call last):\\nValueError: embedded null byte\\x00 in a path", file=sys.stderr)
        sys.exit(1)
    for epoch in range(start + 1, epochs + 1):
        time.sleep(delay)
        row = {"phase": "pretrain", "epoch": epoch, "loss": 1.0 / epoch, "lr": 0.1}
        if prepared.is_dir():
            row["acc"] = 100.0 - 50.0 / epoch
            event(phase="pretrain", event="progress", message=f"epoch {epoch}/{epochs}: batch 4/4", epoch=epoch,
                  epochs=epochs, batch=4, batches=4, examples_per_s=1000.0, eta_s=0.0)
        event(phase="pretrain", event="epoch", message=f"epoch {epoch}/{epochs}", epoch=epoch)
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\\n")
        ckpt.write_text(json.dumps({"epoch": epoch}))
    if prepared.is_dir():
        evaluation = json.loads((prepared / "results.json").read_text())["evaluation"]
        cells = [(m, c, a, v) for m, by_c in evaluation.items() if isinstance(by_c, dict)
                 for c, by_a in by_c.items() if isinstance(by_a, dict) for a, v in by_a.items()]
        for model, combiner, attack, accuracy in cells:
            event(phase="evaluate", event="progress", message=f"{model} {combiner} {attack}: 16/16", model=model,
                  combiner=combiner, attack=attack, done=16, total=16, accuracy=accuracy, eta_s=0.0)
        shutil.copytree(prepared, out, dirs_exist_ok=True)
    event(phase="run", event="finished", message="done")
    (out / "report.md").write_text("# fake report\\n")
    if mode != "noresults" and not prepared.is_dir():
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps({"evaluation": {"base": {"average": {"natural": 90.0}}}, "epochs": epochs}))
        os.replace(tmp, out / "results.json")
    '''
)


@pytest.fixture
def fake_runner(tmp_path: Path) -> list[str]:
    path = tmp_path / "fake_runner.py"
    path.write_text(FAKE_RUNNER)
    return [sys.executable, str(path)]


def fake_spec(name: str = "ok", epochs: int = 3) -> dict[str, Any]:
    return {"name": name, "base": {"train": {"epochs": epochs, "lr": 0.1}}}


# ------------------------------------------------------------------------------------------- real runner


#: A tiny study experiment: digits, 128 training images, two members of width 8, one epoch each.
TINY_EXPERIMENT = {
    "dataset": {"name": "digits", "train_limit": 128},
    "ensemble": {"members": 2, "architecture": "small_cnn", "width": 8},
    "base": {"method": "plain", "train": {"epochs": 1, "batch_size": 64, "lr": 0.1}},
    "igat": {"attack": {"eps": 0.1, "step": 0.05, "steps": 2}, "train": {"epochs": 1, "batch_size": 64, "lr": 0.01}},
    "eval": {"attacks": ["natural", "pgd"], "combiners": ["average"], "eps": 0.1, "step": 0.05, "steps": 3,
             "n_examples": 16, "sanity_examples": 0, "diagnostics_examples": 0},
    "resources": {"device": "cpu", "threads": 1},
}


#: TINY_EXPERIMENT pretrained with ADP at lr 10 (the spec's upper bound): its loss becomes NaN within three epochs.
DIVERGING_EXPERIMENT = {**TINY_EXPERIMENT, "name": "diverging",
                        "base": {"method": "adp", "train": {"epochs": 4, "batch_size": 64, "lr": 10.0}}}


def tiny_quickstart(pretrain_epochs: int = 1) -> dict[str, Any]:
    """examples/quickstart.yaml, cut down to seconds on a CPU (fewer epochs, examples and attack steps)."""
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["name"] = "quickstart-tiny"
    dataset = spec.setdefault("dataset", {})
    dataset["train_limit"] = min(dataset.get("train_limit") or 10**9, 256)
    base = spec.setdefault("base", {})
    base.setdefault("train", {"lr": 0.05})["epochs"] = pretrain_epochs
    if "attack" in base:
        base["attack"]["steps"] = min(base["attack"].get("steps", 20), 2)
    igat = spec.setdefault("igat", {})
    igat.setdefault("train", {"lr": 0.01})["epochs"] = 1
    igat.setdefault("attack", {})["steps"] = min(igat.get("attack", {}).get("steps", 20), 2)
    ev = spec.setdefault("eval", {})
    ev["n_examples"] = min(ev.get("n_examples", 1000), 64)
    ev["steps"] = min(ev.get("steps", 20), 3)
    ev["combiners"] = ["average"]
    ev["attacks"] = ["natural", "pgd"]
    ev.update({"sanity_examples": 16, "sanity_pgd_steps": 5, "sanity_pgd_restarts": 1, "diagnostics_examples": 16})
    return spec


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_dispatcher_process(settings, log_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m service.dispatcher`` configured like ``settings`` (through IGAT_* variables)."""
    env = dict(os.environ)
    env.update(settings_env(settings))
    env.update(extra_env or {})
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "service.dispatcher", "--log-level", "INFO"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def settings_env(settings) -> dict[str, str]:
    env = {
        "IGAT_DATABASE_URL": settings.database_url,
        "IGAT_ARTIFACT_ROOT": str(settings.artifact_root),
        "IGAT_RUNNER_COMMAND": json.dumps(settings.runner_command),
        "IGAT_DISPATCHER_POLL_S": str(settings.dispatcher_poll_s),
        "IGAT_LEASE_S": str(settings.lease_s),
        "IGAT_CANCEL_GRACE_S": str(settings.cancel_grace_s),
        "IGAT_SSE_POLL_S": str(settings.sse_poll_s),
        "IGAT_MAX_ATTEMPTS": str(settings.max_attempts),
        "IGAT_EXECUTOR": settings.executor,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
    }
    if settings.api_token is not None:
        env["IGAT_API_TOKEN"] = settings.api_token.get_secret_value()
    if settings.ray_address:
        env["IGAT_RAY_ADDRESS"] = settings.ray_address
    env["IGAT_MAX_CONCURRENT_EXPERIMENTS"] = str(settings.max_concurrent_experiments)
    if settings.max_concurrent_cpus is not None:
        env["IGAT_MAX_CONCURRENT_CPUS"] = str(settings.max_concurrent_cpus)
    return env


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] not in "ZX"


# ------------------------------------------------------------------------------------- database helpers


def queue(sessions, spec, priority=0):
    with session_scope(sessions) as s:
        experiment, _ = store.create_experiment(s, spec=spec, name=spec["name"], priority=priority)
    return experiment.id


def status_of(sessions, experiment_id):
    with session_scope(sessions) as s:
        return store.get_experiment(s, experiment_id)


def events_of(sessions, experiment_id):
    with session_scope(sessions) as s:
        return list(s.scalars(select(Event).where(Event.experiment_id == experiment_id).order_by(Event.seq)))


def metrics_of(sessions, experiment_id):
    with session_scope(sessions) as s:
        return [(m.phase, m.epoch, m.values) for m in
                s.scalars(select(Metric).where(Metric.experiment_id == experiment_id).order_by(Metric.id))]


def assert_no_duplicates(sessions, experiment_id, run_dir: Path):
    """Events: one gap-free sequence holding every line of events.jsonl exactly once. Metrics: one row per
    (phase, epoch), equal to the final metrics.jsonl."""
    events = events_of(sessions, experiment_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    lines = read_jsonl(run_dir / "events.jsonl")
    from_file = [e for e in events if e.phase is not None]  # the service's own events carry no phase
    assert [(e.phase, e.kind, e.message) for e in from_file] == [  # as stored: service.storable's form
        (line.get("phase"), line["event"], storable_text(line["message"])) for line in lines
    ]
    assert status_of(sessions, experiment_id).events_ingested == len(lines)
    metrics = metrics_of(sessions, experiment_id)
    keys = [(p, e) for p, e, _ in metrics]
    assert len(keys) == len(set(keys))
    final = {(m["phase"], m["epoch"]) for m in read_jsonl(run_dir / "metrics.jsonl")}
    assert set(keys) == final


def kill_group(pgid: int) -> None:
    """Leave no runner behind (stopped or not) when a recovery test fails half-way."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
