"""The Ray Jobs executor's contract pieces, `igat run` refusing the Ray-only search, and `igat serve` starting
(and stopping) its own local Ray head when no IGAT_RAY_ADDRESS is given."""

from __future__ import annotations

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
from workers.ray_cluster import recorded_head_port


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
        assert httpx.get(f"{dashboard}/api/version", timeout=5).status_code == 200
        assert pid_alive(head_pid)
        wait_for(lambda: recorded_head_port() == gcs_port, 30, interval=0.5, what="Ray's address file")
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    assert not pid_alive(head_pid), "the Ray head outlived igat serve"
    assert recorded_head_port() != gcs_port, "a plain ray.init() would still look for the stopped head"
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


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_ray_token_left_by_an_earlier_ray_init_does_not_lock_out_the_local_head(tmp_path, monkeypatch):
    from workers.ray_cluster import start_local_head

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
