"""The service on the Ray executor: `igat serve` (API + dispatcher) submitting runners as Ray Jobs to the shared
local cluster (IGAT_RAY_ADDRESS), on SQLite.

- a 2x2 alpha/beta grid on digits: results.json `tune` names the chosen pair and every trial's score, each
  trial's epochs reach the database under `tune/alpha=..,beta=..`, and the igat phase uses the chosen pair;
- an ASHA search: its pairs are drawn inside the alphas/betas ranges, and a trial is stopped early only when
  another trial scored higher at the epoch it stopped at;
- cancelling a running experiment stops its Ray job (STOPPED), well within 30 seconds;
- killing the runner (the job's driver) mid-phase re-queues the experiment, and the next attempt (a new Ray
  job) resumes the same Ray Train run from the last epoch checkpoint;
- a study (two methods x two seeds, the iGAT arm and beta = 0 sharing each seed's base) runs as Ray jobs, two at a
  time: the beta = 0 runs wait in the queue for their base and load it, and the study's tables equal
  `igat study`'s in this process;
- a cut-down quickstart gives the same weights and the same accuracies, to the bit, through the service on Ray
  (one Train worker) as through igat_core's Runner in this process, both with the resolved `resources.threads`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.service_fixtures import TINY_EXPERIMENT, make_settings, read_jsonl, tiny_quickstart, wait_for
from tests.test_service_e2e import AUTH, serve, stop

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def tiny_spec(name: str, *, pretrain_epochs: int, train_limit: int | None, tune: bool) -> dict:
    spec = {
        "name": name,
        "seed": 0,
        "dataset": {"name": "digits", "val_fraction": 0.1, "train_limit": train_limit},
        "ensemble": {"members": 2, "architecture": "small_cnn", "width": 8},
        "base": {"method": "plain", "train": {"epochs": pretrain_epochs, "batch_size": 32, "lr": 0.05}},
        "igat": {"attack": {"eps": 0.1, "step": 0.025, "steps": 2},
                 "train": {"epochs": 2, "batch_size": 128, "lr": 0.01}},
        "eval": {"attacks": ["natural", "pgd"], "eps": 0.1, "step": 0.025, "steps": 3, "n_examples": 64,
                 "combiners": ["average"], "sanity_examples": 16, "sanity_pgd_steps": 5, "sanity_pgd_restarts": 1},
        "resources": {"device": "cpu", "num_workers": 1},
    }
    if tune:
        spec["tune"] = {"enabled": True, "mode": "grid", "alphas": [1, 5], "betas": [5, 10], "val_examples": 96,
                        "pgd_steps": 3}
    return spec


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ray_service")
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'igat.db'}", executor="ray",
                             ray_address=ray_cluster.dashboard_url, dispatcher_poll_s=0.5, cancel_grace_s=15.0,
                             max_concurrent_experiments=2, max_concurrent_cpus=2.0)
    server = serve(tmp_path, settings)
    server.settings = settings
    try:
        yield server
    finally:
        stop(server)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-5000:]


def job_client(ray_cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_cluster.dashboard_url)


def submit(served, spec: dict) -> str:
    with served.client() as client:
        r = client.post("/experiments", json=spec, headers=AUTH)
        assert r.status_code == 202, r.text
        return r.json()["id"]


def detail(served, experiment_id: str) -> dict:
    with served.client() as client:
        return client.get(f"/experiments/{experiment_id}").json()


def metrics(served, experiment_id: str) -> list[dict]:
    with served.client() as client:
        return client.get(f"/experiments/{experiment_id}/metrics", params={"limit": 5000}).json()["items"]


def finished(served, experiment_id: str) -> dict | None:
    d = detail(served, experiment_id)
    return d if d["status"] in ("succeeded", "failed", "cancelled") else None


@pytest.mark.timeout(600)
def test_alpha_beta_grid_through_the_service(served, ray_cluster):
    experiment_id = submit(served, tiny_spec("grid", pretrain_epochs=6, train_limit=512, tune=True))
    done = wait_for(lambda: finished(served, experiment_id), 540, interval=1.0, what="the grid experiment")
    assert done["status"] == "succeeded", done.get("error")

    with served.client() as client:
        results = client.get(f"/results/{experiment_id}").json()
    tune = results["tune"]
    pairs = {(t["alpha"], t["beta"]) for t in tune["trials"]}
    assert pairs == {(1.0, 5.0), (1.0, 10.0), (5.0, 5.0), (5.0, 10.0)}
    assert all(t["status"] == "completed" and 0 <= t["val_pgd"] <= 100 for t in tune["trials"])
    chosen = (tune["chosen"]["alpha"], tune["chosen"]["beta"])
    assert chosen in pairs and tune["split"] == "val"
    assert tune["chosen"]["val_pgd"] == max(t["val_pgd"] for t in tune["trials"])
    print("grid scores:", {f"{t['alpha']:g}/{t['beta']:g}": round(t["val_pgd"], 2) for t in tune["trials"]},
          "chosen", chosen)

    rows = metrics(served, experiment_id)
    phases = {m["phase"] for m in rows}
    assert {t["phase"] for t in tune["trials"]} <= phases and {"pretrain", "igat"} <= phases
    assert all(len([m for m in rows if m["phase"] == t["phase"]]) == 2 for t in tune["trials"])
    assert all("val_pgd" in m["values"] for m in rows if m["phase"].startswith("tune/"))

    run_dir = Path(served.settings.artifact_root) / experiment_id
    state = json.loads((run_dir / "state.json").read_text())
    assert (state["phases"]["tune"]["alpha"], state["phases"]["tune"]["beta"]) == chosen
    assert all((run_dir / "ray" / f"{experiment_id}-{phase}").is_dir() for phase in ("pretrain", "tune", "igat"))
    assert job_client(ray_cluster).get_job_status(f"igat-{experiment_id}-1").value == "SUCCEEDED"
    assert any(e["phase"] == "job" and e["event"] == "log" for e in read_jsonl(run_dir / "events.jsonl"))


@pytest.mark.timeout(600)
def test_asha_search_draws_pairs_in_the_ranges_and_stops_only_trials_behind_another(served):
    spec = tiny_spec("asha", pretrain_epochs=6, train_limit=512, tune=True)
    spec["tune"].update({"mode": "asha", "alphas": [1, 10], "betas": [5, 20], "num_samples": 4, "epochs": 4,
                         "grace_period": 1, "reduction_factor": 2})
    experiment_id = submit(served, spec)
    done = wait_for(lambda: finished(served, experiment_id), 540, interval=1.0, what="the ASHA experiment")
    assert done["status"] == "succeeded", done.get("error")
    with served.client() as client:
        tune = client.get(f"/results/{experiment_id}").json()["tune"]

    trials = tune["trials"]
    assert tune["mode"] == "asha" and len(trials) == 4
    assert all(1 <= t["alpha"] <= 10 and 5 <= t["beta"] <= 20 for t in trials)
    assert len({(t["alpha"], t["beta"]) for t in trials}) == 4
    assert all((t["status"] == "completed") == (t["epochs"] == 4) and 1 <= t["epochs"] <= 4 for t in trials)
    assert any(t["status"] == "completed" for t in trials)  # the first trial at the last rung always goes on

    rows = metrics(served, experiment_id)
    score = {(m["phase"], m["epoch"]): m["values"]["val_pgd"] for m in rows if m["phase"].startswith("tune/")}
    for t in trials:
        assert t["epochs"] <= t["trained_epochs"] <= 4
        logged = sorted(e for p, e in score if p == t["phase"])  # a stopped run may die between checkpoint and log
        assert logged == list(range(1, len(logged) + 1)) and t["epochs"] <= len(logged) <= t["trained_epochs"]
        assert t["val_pgd"] == score[(t["phase"], t["epochs"])]
    for t in (t for t in trials if t["status"] == "stopped early"):
        at_rung = [score[(other["phase"], t["epochs"])] for other in trials if other is not t
                   and (other["phase"], t["epochs"]) in score]
        assert score[(t["phase"], t["epochs"])] < max(at_rung), (t, at_rung)
    assert tune["chosen"]["val_pgd"] == max(t["val_pgd"] for t in trials)
    print("asha trials:", [(round(t["alpha"], 2), round(t["beta"], 2), t["epochs"], t["trained_epochs"], t["val_pgd"])
                           for t in trials])


@pytest.mark.timeout(300)
def test_cancel_stops_the_ray_job(served, ray_cluster):
    experiment_id = submit(served, tiny_spec("cancel", pretrain_epochs=200, train_limit=None, tune=False))
    wait_for(lambda: any(m["phase"] == "pretrain" for m in metrics(served, experiment_id)), 240, interval=0.5,
             what="the first pretraining epoch in the database")
    jobs = job_client(ray_cluster)
    job = f"igat-{experiment_id}-1"
    assert jobs.get_job_status(job).value == "RUNNING"
    started = time.monotonic()
    with served.client() as client:
        assert client.post(f"/experiments/{experiment_id}/cancel", headers=AUTH).status_code in (200, 202)
    wait_for(lambda: jobs.get_job_status(job).value in ("STOPPED", "FAILED", "SUCCEEDED"), 30, interval=0.2,
             what="the Ray job to end after cancel")
    latency = time.monotonic() - started
    print(f"cancel -> Ray job terminal in {latency:.1f}s")
    assert jobs.get_job_status(job).value == "STOPPED"
    done = wait_for(lambda: finished(served, experiment_id), 60, interval=0.5, what="the experiment to be cancelled")
    assert done["status"] == "cancelled"
    epochs = [m["epoch"] for m in metrics(served, experiment_id) if m["phase"] == "pretrain"]
    assert max(epochs) < 200


@pytest.mark.timeout(600)
def test_killed_runner_is_resubmitted_and_resumes_from_its_checkpoint(served, ray_cluster):
    spec = tiny_spec("resume", pretrain_epochs=10, train_limit=None, tune=False)
    experiment_id = submit(served, spec)
    wait_for(lambda: any(m["phase"] == "pretrain" and m["epoch"] >= 2 for m in metrics(served, experiment_id)), 300,
             interval=0.3, what="two pretraining epochs")
    jobs = job_client(ray_cluster)
    info = jobs.get_job_info(f"igat-{experiment_id}-1")
    assert info.status.value == "RUNNING" and info.driver_info is not None
    os.kill(int(info.driver_info.pid), signal.SIGKILL)
    killed_after = max(m["epoch"] for m in metrics(served, experiment_id) if m["phase"] == "pretrain")

    done = wait_for(lambda: finished(served, experiment_id), 540, interval=1.0, what="the resumed experiment")
    assert done["status"] == "succeeded", done.get("error")
    assert done["attempt"] == 2
    assert jobs.get_job_status(f"igat-{experiment_id}-1").value == "FAILED"
    assert jobs.get_job_status(f"igat-{experiment_id}-2").value == "SUCCEEDED"
    run_dir = Path(served.settings.artifact_root) / experiment_id
    starts = [e for e in read_jsonl(run_dir / "events.jsonl") if e["phase"] == "pretrain" and e["event"] == "started"]
    assert len(starts) == 2 and starts[1]["resumed_from_epoch"] >= killed_after, starts
    print(f"killed after epoch {killed_after}; attempt 2 resumed from epoch {starts[1]['resumed_from_epoch']}")
    epochs = sorted(m["epoch"] for m in metrics(served, experiment_id) if m["phase"] == "pretrain")
    assert epochs == list(range(1, 11))
    assert (run_dir / "ray" / f"{experiment_id}-pretrain").is_dir()


def member_weights(path: Path) -> dict[str, torch.Tensor]:
    from igat_core.ensemble import load_ensemble

    return load_ensemble(path).state_dict()


def accuracies(results: dict) -> dict[tuple[str, str, str], float]:
    """Every evaluation[model][combiner][attack] of a results.json."""
    return {(model, combiner, attack): value for model, by_combiner in results["evaluation"].items()
            if isinstance(by_combiner, dict) for combiner, by_attack in by_combiner.items()
            if isinstance(by_attack, dict) for attack, value in by_attack.items()}


@pytest.mark.timeout(400)
def test_a_spec_gives_the_same_numbers_in_process_and_through_the_service_on_ray(served, tmp_path):
    from igat_core.runner import run_experiment
    from igat_core.spec import parse_spec

    spec = tiny_quickstart(pretrain_epochs=5)
    spec["name"] = "same-numbers"
    spec["dataset"]["train_limit"] = 1024
    spec["resources"] = {"device": "cpu", "num_workers": 1}
    experiment_id = submit(served, spec)
    threads_before = torch.get_num_threads()
    local = run_experiment(parse_spec(spec), tmp_path / "local", progress=False)
    assert torch.get_num_threads() == threads_before, "the run restores the caller's thread count"
    done = wait_for(lambda: finished(served, experiment_id), 360, interval=1.0, what="the experiment on Ray")
    assert done["status"] == "succeeded", done.get("error")
    with served.client() as client:
        remote = client.get(f"/results/{experiment_id}").json()

    assert accuracies(local) == accuracies(remote)
    assert {model for model, _, _ in accuracies(local)} == {"base", "global_at", "igat"}
    assert len(accuracies(local)) == 9
    print("accuracies on both paths:", accuracies(local))
    run_dir = Path(served.settings.artifact_root) / experiment_id
    for checkpoint in ("checkpoints/base/ensemble.pt", "checkpoints/igat/ensemble.pt"):
        here, there = member_weights(tmp_path / "local" / checkpoint), member_weights(run_dir / checkpoint)
        assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here), checkpoint
    assert local["spec"]["resources"]["threads"] == remote["spec"]["resources"]["threads"] == 1
    assert local["runtime"] == remote["runtime"] and local["runtime"]["threads"] == 1


@pytest.mark.timeout(600)
def test_a_study_runs_as_ray_jobs_sharing_bases_and_gives_igat_study_s_tables(served, tmp_path):
    """Two methods x two seeds x two arms: eight Ray jobs, two at a time (IGAT_MAX_CONCURRENT_CPUS 2, one CPU
    each); each beta = 0 run waits for its seed's base and loads it; the tables equal `igat study`'s, run here
    meanwhile."""
    from igat_core.study import run_study
    from igat_core.study_spec import parse_study

    study = {"name": "ray-study", "experiment": TINY_EXPERIMENT, "grid": {"seed": [0, 1]},
             "variants": {"plain": {}, "adp": {"base.method": "adp"}},
             "arms": {"igat": {}, "beta0": {"igat.beta": 0}}, "tables": ["table1", "table2", "table3"]}
    with served.client() as client:
        r = client.post("/studies", json=study, headers=AUTH)
        assert r.status_code == 202, r.text
        study_id = r.json()["id"]
    local = run_study(parse_study(study), tmp_path / "local", progress=False, echo=lambda _line: None)
    with served.client() as client:
        done = wait_for(lambda: (d := client.get(f"/studies/{study_id}").json())["status"] not in
                        ("queued", "running", "cancelling") and d, 480, interval=1.0, what="the study on Ray")
        record = client.get(f"/studies/{study_id}/results").json()
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 8, done
    runs = {run["name"]: run for run in done["experiments"]}
    root = Path(served.settings.artifact_root).resolve()
    for variant in ("plain", "adp"):
        for seed in (0, 1):
            base, dependent = (runs[f"ray-study-{variant}-seed{seed}-{arm}"] for arm in ("igat", "beta0"))
            assert dependent["depends_on"] == base["id"]
            state = json.loads((root / dependent["id"] / "state.json").read_text())
            assert state["phases"]["pretrain"]["loaded"] == str(root / base["id"] / "checkpoints/base/ensemble.pt")
    for run in runs.values():
        handle = json.loads((root / run["id"] / "executor.json").read_text())
        assert handle["executor"] == "ray" and handle["submission_id"] == f"igat-{run['id']}-1"
    spans = [(d["started_at"], d["finished_at"]) for d in (detail(served, run["id"]) for run in runs.values())]
    assert max(sum(start <= t < end for start, end in spans) for t, _ in spans) == 2  # two at a time, never three
    assert record["counts"] == {"planned": 8, "succeeded": 8, "pending": 0, "failed": 0}
    for table in ("table1", "table2", "table3"):
        assert local[table] == record[table], table
    assert {(row["method"], row["n"]) for row in record["table3"]} == {("plain", 2), ("adp", 2)}
