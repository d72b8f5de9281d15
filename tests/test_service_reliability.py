"""No run can stop the queue (issue 16): a run whose loss diverges through the real training code, a run whose events
carry NUL characters and NaNs, and a normal run behind them, through a real dispatcher process on SQLite and
PostgreSQL; and a PostgreSQL server restarted under a running experiment."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.models import TERMINAL

try:
    from tests.service_fixtures import (  # noqa: F401
        AUTH, DIVERGING_EXPERIMENT, FAKE_RUNNER, TINY_EXPERIMENT, assert_no_duplicates, create_schema, db_url,
        events_of, fake_runner, fake_spec, free_port, kill_group, make_client, make_settings, metrics_of, pg_url,
        sessions, sqlite_url, start_dispatcher_process, status_of, wait_for,
    )
except ImportError:
    from service_fixtures import (  # noqa: F401
        AUTH, DIVERGING_EXPERIMENT, FAKE_RUNNER, TINY_EXPERIMENT, assert_no_duplicates, create_schema, db_url,
        events_of, fake_runner, fake_spec, free_port, kill_group, make_client, make_settings, metrics_of, pg_url,
        sessions, sqlite_url, start_dispatcher_process, status_of, wait_for,
    )

#: The service's default runner (`igat_core.cli run`), except for specs named like a fake runner's mode.
ROUTING_RUNNER = textwrap.dedent(
    """
    import os, sys, yaml
    fake = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_runner.py")
    if yaml.safe_load(open(sys.argv[1]))["name"] in ("nul", "odd"):
        os.execv(sys.executable, [sys.executable, fake, *sys.argv[1:]])
    os.execv(sys.executable, [sys.executable, "-m", "igat_core.cli", "run", *sys.argv[1:]])
    """
)


def _submit(client, spec) -> str:
    response = client.post("/experiments", json=spec, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _every_read_answers(client, experiment_id: str) -> dict:
    for path in (f"/experiments/{experiment_id}", f"/experiments/{experiment_id}/metrics",
                 f"/experiments/{experiment_id}/events", f"/results/{experiment_id}/artifacts"):
        assert client.get(path).status_code == 200, path
    return client.get(f"/results/{experiment_id}")


@pytest.mark.slow
def test_diverging_and_nul_runs_fail_with_their_reasons_and_the_queue_goes_on(tmp_path, db_url, sessions):
    (tmp_path / "fake_runner.py").write_text(FAKE_RUNNER)
    (tmp_path / "router.py").write_text(ROUTING_RUNNER)
    settings = make_settings(tmp_path, db_url, runner_command=[sys.executable, str(tmp_path / "router.py")],
                             dispatcher_poll_s=0.2, max_concurrent_experiments=1)
    with make_client(settings, sessions) as client:
        diverging = _submit(client, DIVERGING_EXPERIMENT)
        nul = _submit(client, fake_spec("nul", epochs=1))
        normal = _submit(client, {**TINY_EXPERIMENT, "name": "normal"})
        dispatcher = start_dispatcher_process(settings, tmp_path / "dispatcher.log", {"FAKE_EPOCH_S": "0.02"})
        try:
            wait_for(lambda: status_of(sessions, normal).status in TERMINAL, 600, interval=0.5,
                     what="the normal run to finish")
            assert dispatcher.poll() is None, "the dispatcher stopped"
        finally:
            dispatcher.send_signal(signal.SIGTERM)
            dispatcher.wait(timeout=60)
        log = (tmp_path / "dispatcher.log").read_text()
        runs = {name: status_of(sessions, e) for name, e in [("diverging", diverging), ("nul", nul),
                                                              ("normal", normal)]}
        assert runs["normal"].status == "succeeded", (runs["normal"].error, log)

        failed = runs["diverging"]
        assert failed.status == "failed"
        assert failed.error.startswith("the runner exited with code 1: igat run failed: training diverged: the "
                                       "pretrain loss became "), failed.error
        assert "likely too high (lr=10): lower it" in failed.error and " at epoch " in failed.error
        assert "\n" not in failed.error and "Traceback" not in failed.error
        assert any(ev.kind == "failed" and ev.phase == "pretrain" for ev in events_of(sessions, diverging))

        failed = runs["nul"]
        assert (failed.status, failed.error) == (
            "failed", "the runner exited with code 1: ValueError: embedded null byte\\u0000 in a path")
        assert any(ev.message == "nul\\u0000 here" for ev in events_of(sessions, nul))
        assert ("pretrain", 0, {"loss": "NaN", "acc": "Infinity"}) in metrics_of(sessions, nul)

        for name, run in runs.items():
            results = _every_read_answers(client, run.id)
            if name == "normal":
                assert results.status_code == 200 and "evaluation" in results.json()
            else:
                assert results.status_code == 409 and run.error in results.json()["detail"]
            assert client.get(f"/experiments/{run.id}").json()["error"] == run.error
        assert client.get("/experiments").status_code == 200
        assert "dispatcher tick failed" not in log


# ------------------------------------------------------------------------------------ a PostgreSQL restart


@dataclass
class PrivateCluster:
    """A PostgreSQL server of this test's own: initdb in a temporary directory, on a free port."""

    bin_dir: Path
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.data.parent / "server.log"),
                   "-o", options, "-w", *args]
        subprocess.run(_as_server_user(command), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self.pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("stop", "-m", mode)


def _as_server_user(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _postgres_bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        pytest.fail("no initdb found (under /usr/lib/postgresql/*/bin or on PATH): install the PostgreSQL server "
                    "or deselect this test with -m 'not postgres'")
    return Path(initdb).parent


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    bin_dir = _postgres_bin_dir()
    if os.geteuid() == 0:
        try:
            server_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, this test needs a `postgres` user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="igat-pg-"))  # not under tmp_path: the server user must reach it
    if os.geteuid() == 0:
        os.chown(root, server_user.pw_uid, server_user.pw_gid)
    cluster = PrivateCluster(bin_dir, root / "data", free_port())
    subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(cluster.data), "-U", "postgres", "-A", "trust",
                                    "-E", "UTF8", "--no-sync"]), check=True, capture_output=True, timeout=120)
    cluster.start()
    try:
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_postgres_restart_under_a_running_experiment_loses_and_duplicates_nothing(tmp_path, private_cluster,
                                                                                     fake_runner):
    from service.db import make_session_factory

    engine = create_schema(private_cluster.url)
    sessions = make_session_factory(engine)
    settings = make_settings(tmp_path, private_cluster.url, runner_command=fake_runner)
    epochs = 20
    with make_client(settings, sessions) as client:
        experiment = _submit(client, fake_spec("ok", epochs=epochs))
    dispatcher = start_dispatcher_process(settings, tmp_path / "dispatcher.log", {"FAKE_EPOCH_S": "0.2"})
    log = tmp_path / "dispatcher.log"
    try:
        wait_for(lambda: any(ev.kind == "epoch" for ev in events_of(sessions, experiment)), 60, interval=0.1,
                 what="the first epoch to be stored")
        private_cluster.stop()
        wait_for(lambda: "the database is unavailable" in log.read_text() or "tick failed" in log.read_text(), 60,
                 interval=0.1, what="the dispatcher to notice the server is gone")
        private_cluster.start()
        done = wait_for(lambda: (e := status_of(sessions, experiment)).status in TERMINAL and e, 120, interval=0.2,
                        what="the experiment to finish")
        assert dispatcher.poll() is None, "the dispatcher stopped"
    finally:
        dispatcher.send_signal(signal.SIGTERM)
        dispatcher.wait(timeout=60)  # the fake run ends on its own within seconds
    assert done.status == "succeeded", (done.error, log.read_text())
    assert done.attempt == 1  # the run went on through the outage: nothing was re-queued
    assert_no_duplicates(sessions, experiment, Path(done.run_dir))
    assert [m[1] for m in metrics_of(sessions, experiment)] == list(range(1, epochs + 1))
    statuses = [json.dumps(ev.data) for ev in events_of(sessions, experiment) if ev.kind == "status"]
    assert statuses == [json.dumps({"status": s}) for s in ("queued", "running", "succeeded")]
    engine.dispose()
