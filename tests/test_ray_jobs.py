"""The Ray Jobs executor's contract pieces, `igat run` refusing the Ray-only search, and `igat serve` starting
(and stopping) its own local Ray head when no IGAT_RAY_ADDRESS is given."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from igat_core.runner import Runner
from igat_core.spec import parse_spec
from service.dispatcher import configured_executor
from tests.service_fixtures import ROOT, free_port, make_settings, pid_alive, wait_for
from workers.executors import ExecutorUnavailable
from workers.executors.ray_jobs import exit_code_of, submission_id
from workers.ray_cluster import (
    free_ports,
    processes_naming,
    ray_address_file,
    recorded_head_port,
    release_signals,
    signals_held,
    start_local_head,
)


def test_job_states_map_to_exit_codes_the_dispatcher_understands():
    assert exit_code_of("SUCCEEDED", 0) == 0
    assert exit_code_of("STOPPED", None) == -signal.SIGTERM
    assert exit_code_of("FAILED", 2) == 2  # the runner rejected the spec
    assert exit_code_of("FAILED", 137) == -9  # the driver was killed: the dispatcher re-queues
    assert exit_code_of("FAILED", -9) == -9
    assert exit_code_of("FAILED", None) == 1
    assert submission_id("abc", 3) == "igat-abc-3"


def test_the_ray_executor_needs_an_address(tmp_path):
    settings = make_settings(tmp_path, "sqlite://", executor="ray", ray_address=None)
    with pytest.raises(ExecutorUnavailable, match="IGAT_RAY_ADDRESS"):
        configured_executor(settings)
    executor = configured_executor(settings.model_copy(update={"ray_address": "http://127.0.0.1:1"}))
    assert executor.name == "ray" and executor.find(tmp_path) is None


def test_igat_run_refuses_the_search_before_training(tmp_path):
    spec = parse_spec({"tune": {"enabled": True}, "base": {"train": {"epochs": 1, "lr": 0.1}}})
    with pytest.raises(ValueError, match="tune.enabled"):
        Runner(spec, tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run").exists()


def start_serve(tmp_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`igat serve` on its own local Ray head (one logical CPU), in its own session."""
    env = {k: v for k, v in os.environ.items() if k not in ("IGAT_EXECUTOR", "IGAT_RAY_ADDRESS", "RAY_ADDRESS")}
    env.update({"PYTHONPATH": str(ROOT), "IGAT_API_TOKEN": "t" * 24, "RAY_USAGE_STATS_ENABLED": "0"})
    return subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port), "--ray-cpus", "1"],
                            cwd=tmp_path, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_serve_defaults_to_ray_and_stops_its_head(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    serve = start_serve(tmp_path, port, log)
    pid_file = tmp_path / "var" / "ray-head.pid"
    try:
        def healthy():
            assert serve.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 180, interval=0.5, what="igat serve with a local Ray head")
        head_pid = int(pid_file.read_text())
        head_up = next(line for line in log.read_text().splitlines() if "local Ray head up" in line)
        dashboard = head_up.split("dashboard ")[1].split()[0]
        gcs_port = head_up.split(" up at ")[1].split(",")[0].rsplit(":", 1)[1]
        temp_dir = Path(head_up.split("Ray temp dir ")[1].rstrip(")"))
        assert httpx.get(f"{dashboard}/api/version", timeout=5).status_code == 200
        assert pid_alive(head_pid)
        wait_for(lambda: recorded_head_port(temp_dir) == gcs_port, 30, interval=0.5, what="the head's address file")
        assert processes_naming(str(temp_dir))
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    assert not pid_alive(head_pid), "the Ray head outlived igat serve"
    assert processes_naming(str(temp_dir)) == [], "Ray processes of the head outlived igat serve"
    assert not pid_file.exists()
    assert "Traceback" not in log.read_text()
    assert Path(tmp_path / "var" / "ray-head.log").exists()


def writers_of(path: Path) -> list[int]:
    """Live processes whose stdout is `path` (the Ray head and its children inherit the head log)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "fd" / "1") == str(path):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sigterm_while_the_ray_head_starts_leaves_no_ray_process(tmp_path):
    log = tmp_path / "serve.log"
    serve = start_serve(tmp_path, free_port(), log)
    head_log = tmp_path / "var" / "ray-head.log"
    try:
        wait_for(lambda: writers_of(head_log), 120, interval=0.05, what="the Ray head to be spawned")
        assert "local Ray head up" not in log.read_text()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    assert serve.returncode == 128 + signal.SIGTERM, log.read_text()
    assert writers_of(head_log) == [], "Ray processes outlived igat serve"
    assert "local Ray head up" not in log.read_text()


def test_a_sigterm_while_the_head_is_spawned_waits_until_the_head_can_be_stopped():
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: caught.append(signum))
    try:
        with signals_held() as received:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10_000))  # bytecodes at which Python would run a handler
            assert caught == [] and received == [signal.SIGTERM]
        assert caught == []
        release_signals(received)
        assert caught == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_head_keeps_its_address_to_itself_and_stop_kills_what_escaped_its_process_group(tmp_path):
    shared_file_before = ray_address_file().read_bytes() if ray_address_file().exists() else None
    head = start_local_head(num_cpus=1, log_path=tmp_path / "head.log", timeout=120)
    try:
        port = head.gcs_address.rsplit(":", 1)[1]
        wait_for(lambda: recorded_head_port(head.temp_dir) == port, 30, interval=0.2, what="the head's address file")
        assert (ray_address_file().read_bytes() if ray_address_file().exists() else None) == shared_file_before
        escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(head.temp_dir)],
                                   start_new_session=True)
    finally:
        head.stop()
    try:
        escaped.wait(timeout=10)
    finally:
        escaped.kill()
    assert escaped.returncode == -signal.SIGKILL
    assert processes_naming(str(head.temp_dir)) == []


def plain_ray_head(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`ray start --head --block` with Ray's shared temp dir, as any other Ray on the machine would start."""
    port, dashboard_port = free_ports(2)
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
               f"--port={port}", f"--dashboard-port={dashboard_port}", "--num-cpus=1"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True), str(port)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_job_driver_joins_the_head_it_was_submitted_to_when_another_head_started_later(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    shared_file = ray_address_file()
    before = shared_file.read_bytes() if shared_file.exists() else None
    later, later_port = plain_ray_head(tmp_path / "later-head.log")
    try:
        wait_for(lambda: recorded_head_port() == later_port, 120, interval=0.5, what="the later head")
        client = JobSubmissionClient(ray_cluster.dashboard_url)
        job = client.submit_job(entrypoint=f"{sys.executable} -c 'import os; print(os.environ[\"RAY_ADDRESS\"])'")
        wait_for(lambda: client.get_job_status(job).is_terminal(), 120, interval=0.5, what="the job")
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)
        driver_address = client.get_job_logs(job).strip().splitlines()[-1]
        assert driver_address.rsplit(":", 1)[1] == ray_cluster.gcs_address.rsplit(":", 1)[1]
    finally:
        later.send_signal(signal.SIGTERM)
        try:
            later.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(later.pid, signal.SIGKILL)
        if before is None:
            shared_file.unlink(missing_ok=True)
        else:
            shared_file.write_bytes(before)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_ray_token_left_by_an_earlier_ray_init_does_not_lock_out_the_local_head(tmp_path, monkeypatch):

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 64)  # what a plain local ray.init() leaves in ~/.ray
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    head = start_local_head(num_cpus=1, log_path=tmp_path / "head.log", timeout=90)
    try:
        assert httpx.get(f"{head.dashboard_url}/api/version", timeout=5).status_code == 200
    finally:
        head.stop()
    assert "Token authentication is enabled" not in (tmp_path / "head.log").read_text()


def test_trials_run_as_many_at_once_as_the_cluster_holds():
    from workers.ray_train import RayScaling
    from workers.runner import max_concurrent_trials, trial_phase

    cpu = RayScaling(1, False, 1.0, Path("/tmp"), "x")
    assert max_concurrent_trials(cpu, {"CPU": 4.0}, trials=4) == 2  # driver + worker per trial
    assert max_concurrent_trials(cpu, {"CPU": 4.0}, trials=1) == 1
    assert max_concurrent_trials(RayScaling(2, False, 1.0, Path("/tmp"), "x"), {"CPU": 2.0}, trials=4) == 1
    gpu = RayScaling(1, True, 4.0, Path("/tmp"), "x")
    assert max_concurrent_trials(gpu, {"CPU": 16.0, "GPU": 1.0}, trials=9) == 1
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}, trials=9) == 8
    assert trial_phase(5.0, 10.0) == "tune/alpha=5,beta=10"
    assert len(trial_phase(0.123456789, 1234.56789)) <= 32
