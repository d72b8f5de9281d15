"""End to end through ``python -m service serve`` (API + dispatcher process tree) and the REST client.

- with the stand-in runner: fast, always runs;
- with the real ``python -m igat_core.cli run`` on a cut-down examples/quickstart.yaml, on SQLite and on
  PostgreSQL: events arrive over SSE while it runs and results.json comes back from GET /results/<id>;
- SIGKILL of the dispatcher mid-run with the real runner: re-attached or re-queued (resumed from checkpoints),
  succeeded, nothing stored twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.cli import parse_sse
from service.db import make_session_factory

try:
    from tests.service_fixtures import (  # noqa: F401
        ROOT, TOKEN, create_schema, db_url, fake_runner, fake_spec, free_port, make_settings, pg_url, pid_alive,
        read_jsonl, settings_env, sqlite_url, start_dispatcher_process, tiny_quickstart,
        wait_for,
    )
    from tests.service_fixtures import kill_group, assert_no_duplicates, events_of, metrics_of, queue, status_of
except ImportError:
    from service_fixtures import (  # noqa: F401
        ROOT, TOKEN, create_schema, db_url, fake_runner, fake_spec, free_port, make_settings, pg_url, pid_alive,
        read_jsonl, settings_env, sqlite_url, start_dispatcher_process, tiny_quickstart,
        wait_for,
    )
    from service_fixtures import kill_group, assert_no_duplicates, events_of, metrics_of, queue, status_of

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Served:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


def serve(tmp_path: Path, settings, extra_env: dict[str, str] | None = None) -> Served:
    port = free_port()
    env = {**os.environ, **settings_env(settings), "IGAT_TOKEN_FILE": str(tmp_path / "token"), **(extra_env or {})}
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--log-level", "info"],
        cwd=tmp_path, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    served = Served(process, f"http://127.0.0.1:{port}", log)

    def healthy():
        if process.poll() is not None:
            raise AssertionError(f"igat serve exited early:\n{log.read_text()}")
        try:
            return httpx.get(served.url + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, 60, interval=0.2, what="igat serve to answer /healthz")
    return served


def stop(served: Served) -> None:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait()


def submit_and_watch(served: Served, spec: dict, timeout: float) -> tuple[str, list[dict], list[str]]:
    """Submit, then follow the SSE stream to its end. Returns (id, events, statuses seen while events came)."""
    with served.client() as client:
        r = client.post("/experiments", json=spec, headers=AUTH)
        assert r.status_code == 202, r.text
        experiment_id = r.json()["id"]
        events: list[dict] = []
        live_statuses: list[str] = []
        deadline = time.monotonic() + timeout
        with client.stream("GET", f"/experiments/{experiment_id}/events", timeout=timeout) as stream:
            for sse in parse_sse(stream.iter_lines()):
                if sse.get("event") == "end":
                    break
                if "data" in sse:
                    event = json.loads(sse["data"])
                    assert int(sse["id"]) == event["seq"]
                    events.append(event)
                    if event["kind"] == "epoch" and len(live_statuses) < 3:
                        live_statuses.append(client.get(f"/experiments/{experiment_id}").json()["status"])
                assert time.monotonic() < deadline, "the event stream did not end in time"
    return experiment_id, events, live_statuses


# ------------------------------------------------------------------------------------ with the stand-in


def test_serve_submit_stream_results_fake_runner(tmp_path, sqlite_url, fake_runner):
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner)
    served = serve(tmp_path, settings, {"FAKE_EPOCH_S": "0.1"})
    try:
        experiment_id, events, live = submit_and_watch(served, fake_spec("ok", epochs=8), timeout=60)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["message"] for e in events if e["kind"] == "epoch"] == [f"epoch {i}/8" for i in range(1, 9)]
        assert "running" in live, "events arrived while the experiment was running"
        assert events[-1]["data"] == {"status": "succeeded"}
        with served.client() as client:
            assert client.get(f"/results/{experiment_id}").json()["epochs"] == 8
            assert client.get(f"/experiments/{experiment_id}/metrics").json()["total"] == 8

        # the thin client, as `igat submit --wait` / `igat status` / `igat results` / `igat cancel`
        env = {**os.environ, "IGAT_API_URL": served.url, "IGAT_TOKEN_FILE": str(tmp_path / "token"),
               "IGAT_API_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(json.dumps(fake_spec("ok", epochs=2)))

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "service", *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=120)

        r = cli("submit", str(spec_file), "--wait")
        assert r.returncode == 0, r.stderr
        new_id = r.stdout.split()[0]
        assert "epoch 2/2" in r.stdout and "succeeded" in r.stdout
        assert json.loads(cli("results", new_id).stdout)["epochs"] == 2
        assert "succeeded" in cli("status", new_id).stdout
        assert new_id in cli("status").stdout
        r = cli("cancel", new_id)
        assert r.returncode == 1 and "already succeeded" in r.stderr
        r = cli("status", "nope")
        assert r.returncode == 1 and "404" in r.stderr
        bad = tmp_path / "bad.yaml"
        bad.write_text("dataset: {name: imagenet}\n")
        r = cli("submit", str(bad))
        assert r.returncode == 2 and "dataset.name" in r.stderr
        r = subprocess.run([sys.executable, "-m", "service", "status"], cwd=tmp_path, capture_output=True, text=True,
                           env={**env, "IGAT_API_URL": "http://127.0.0.1:1"}, timeout=60)
        assert r.returncode == 1 and "cannot reach" in r.stderr
    finally:
        stop(served)
    assert served.process.returncode is not None
    log = served.log.read_text()
    assert "Traceback" not in log, log


def test_serve_generates_a_token_when_none_is_set(tmp_path, sqlite_url, fake_runner):
    settings = make_settings(tmp_path, sqlite_url, runner_command=fake_runner, api_token=None)
    served = serve(tmp_path, settings, {"IGAT_API_TOKEN": ""})
    try:
        token = (tmp_path / "token").read_text().strip()
        assert len(token) > 20 and oct((tmp_path / "token").stat().st_mode)[-3:] == "600"
        with served.client() as client:
            assert client.post("/experiments", json=fake_spec(), headers=AUTH).status_code == 401
            ok = client.post("/experiments", json=fake_spec(), headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 202
    finally:
        stop(served)


def test_serve_refuses_an_unknown_executor(tmp_path):
    r = subprocess.run([sys.executable, "-m", "service", "serve", "--executor", "slurm"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown executor 'slurm'" in r.stderr


# --------------------------------------------------------------------------------- with the real runner


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_through_the_service(tmp_path, db_url):
    spec = tiny_quickstart()
    settings = make_settings(tmp_path, db_url)  # default runner_command: python -m igat_core.cli run
    served = serve(tmp_path, settings)
    try:
        experiment_id, events, live = submit_and_watch(served, spec, timeout=840)
        with served.client() as client:
            detail = client.get(f"/experiments/{experiment_id}").json()
            assert detail["status"] == "succeeded", detail.get("error")
            assert "running" in live, "events arrived over SSE while the experiment ran"
            phases = {e["phase"] for e in events if e["phase"]}
            assert "pretrain" in phases
            results = client.get(f"/results/{experiment_id}")
            assert results.status_code == 200
            on_disk = json.loads((tmp_path / "artifacts" / experiment_id / "results.json").read_text())
            assert results.json() == on_disk
            assert "evaluation" in on_disk
            metrics = client.get(f"/experiments/{experiment_id}/metrics").json()
            assert metrics["total"] >= 1
            report = client.get(f"/results/{experiment_id}/artifacts/report.md")
            assert report.status_code == 200 and report.text.strip()
    finally:
        stop(served)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kill_runner", [False, True], ids=["reattach", "requeue"])
def test_sigkill_dispatcher_mid_run_real_runner(tmp_path, sqlite_url, kill_runner):
    sessions = make_session_factory(create_schema(sqlite_url))
    settings = make_settings(tmp_path, sqlite_url, lease_s=60.0, dispatcher_poll_s=0.2)
    e = queue(sessions, tiny_quickstart(pretrain_epochs=3))
    first = start_dispatcher_process(settings, tmp_path / "dispatcher1.log")

    # re-attach: kill as early as possible (most of the run still ahead); re-queue: once a checkpoint exists
    wanted = "epoch" if kill_runner else "started"

    def run_progressing():
        assert first.poll() is None, (tmp_path / "dispatcher1.log").read_text()
        current = status_of(sessions, e)
        assert current.status in ("queued", "running"), f"the run ended early: {current.status}: {current.error}"
        return any(ev.kind == wanted and ev.phase == "pretrain" for ev in events_of(sessions, e))

    try:
        wait_for(run_progressing, 600, interval=0.2, what="the run to make progress")
        handle = status_of(sessions, e).executor_handle
        # re-attach: freeze the runner so that it is surely still mid-run when the new dispatcher looks
        os.killpg(handle["pgid"], signal.SIGKILL if kill_runner else signal.SIGSTOP)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    if kill_runner:
        wait_for(lambda: not pid_alive(handle["pid"]), 30, what="the runner to die")
    second = start_dispatcher_process(settings, tmp_path / "dispatcher2.log")
    try:
        if not kill_runner:
            wait_for(lambda: any("re-attached" in ev.message for ev in events_of(sessions, e)), 120,
                     what="the new dispatcher to re-attach")
            os.killpg(handle["pgid"], signal.SIGCONT)
        done = wait_for(lambda: (x := status_of(sessions, e)).status in ("succeeded", "failed") and x, 840,
                        interval=0.5, what="the experiment to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        kill_group(handle["pgid"])
    assert done.status == "succeeded", (done.error, (tmp_path / "dispatcher2.log").read_text()[-3000:])
    messages = [ev.message for ev in events_of(sessions, e)]
    if kill_runner:
        assert done.attempt == 2 and any(m.startswith("re-queued") for m in messages)
        starts = [ev for ev in read_jsonl(Path(done.run_dir) / "events.jsonl")
                  if ev["phase"] == "pretrain" and ev["event"] == "started"]
        if len(starts) == 2:  # (one only if pretraining had already finished when the runner was killed)
            assert starts[1].get("resumed_from_epoch", 0) >= 1, starts
    else:
        assert done.attempt == 1 and any("re-attached" in m for m in messages)
    run_dir = Path(done.run_dir)
    assert_no_duplicates(sessions, e, run_dir)
    assert json.loads((run_dir / "results.json").read_text())
    assert metrics_of(sessions, e)
