"""`igat run` end to end: the run directory's contract, and a SIGKILL during fine-tuning followed by a rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from igat_core import load_ensemble
from igat_core.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "seed": 1,
    "dataset": {"name": "digits", "train_limit": 600},
    "ensemble": {"members": 2, "architecture": "small_cnn", "width": 8},
    "base": {"method": "plain", "train": {"epochs": 3, "batch_size": 64, "lr": 0.1}},
    "igat": {"attack": {"eps": 0.1, "step": 0.05, "steps": 3},
             "train": {"epochs": 5, "batch_size": 32, "lr": 0.01, "milestones": [4]}},
    "controls": ["global_at", "continued"],
    "eval": {"eps": 0.1, "step": 0.025, "steps": 10, "n_examples": 60, "sanity_pgd_steps": 40,
             "sanity_pgd_restarts": 2},
    "resources": {"device": "cpu"},
}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def igat_cmd(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "igat_core.cli", "run", str(spec), "--out", str(out), "--quiet"]


def metric_epochs(out: Path, phase: str) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if json.loads(line)["phase"] == phase]


@pytest.mark.slow
def test_run_killed_during_finetuning_resumes_to_the_same_result(tmp_path):
    spec = write_spec(tmp_path / "tiny.yaml", TINY)
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(igat_cmd(spec, killed_out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (killed_out / "metrics.jsonl").exists() and 2 in metric_epochs(killed_out, "igat"):
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_out / "results.json").exists()

    resumed = subprocess.run(igat_cmd(spec, killed_out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert metric_epochs(killed_out, "pretrain") == [1, 2, 3]
    assert metric_epochs(killed_out, "igat") == [1, 2, 3, 4, 5]
    events = [json.loads(line) for line in (killed_out / "events.jsonl").read_text().splitlines()]
    restarts = [e for e in events if e["phase"] == "igat" and e["event"] == "started"]
    assert restarts[-1]["resumed_from_epoch"] >= 2

    clean = subprocess.run(igat_cmd(spec, clean_out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    assert "iGAT" in clean.stdout and "average PGD" in clean.stdout
    a = load_ensemble(killed_out / "checkpoints/igat/ensemble.pt")
    b = load_ensemble(clean_out / "checkpoints/igat/ensemble.pt")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)

    results = json.loads((killed_out / "results.json").read_text())
    assert results == {**json.loads((clean_out / "results.json").read_text()), "timing": results["timing"]}
    check_results_contract(results, killed_out)


def check_results_contract(results: dict, out: Path) -> None:
    evaluation = results["evaluation"]
    assert evaluation["n_examples"] == 60 and evaluation["eps"] == pytest.approx(0.1)
    assert [m for m in evaluation if isinstance(evaluation[m], dict)] == ["base", "continued", "global_at", "igat"]
    for model in ("base", "continued", "global_at", "igat"):
        for combiner in ("average", "max"):
            acc = evaluation[model][combiner]
            assert set(acc) >= {"natural", "pgd", "union"}
            assert 0.0 <= acc["pgd"] <= acc["natural"] <= 100.0
    base, igat = evaluation["base"]["average"]["pgd"], evaluation["igat"]["average"]["pgd"]
    if base > 0:
        assert results["improvement"]["average"]["pgd"] == pytest.approx((igat - base) / base * 100)
    assert set(results["improvement_over"]) == set(results["gain_points"]) == {"base", "continued", "global_at"}
    for reference in ("base", "continued", "global_at"):
        for combiner in ("average", "max"):
            for attack, value in evaluation[reference][combiner].items():
                gain = evaluation["igat"][combiner][attack] - value
                assert results["gain_points"][reference][combiner][attack] == pytest.approx(gain)
                relative = results["improvement_over"][reference][combiner][attack]
                assert relative == (None if value == 0 else pytest.approx(gain / value * 100))
    assert results["improvement_over"]["base"] == results["improvement"]
    sanity = results["sanity"]
    for model in ("base", "igat"):
        for check in ("perturbation_within_eps", "pixels_within_range", "rescoring_agrees_average",
                      "rescoring_agrees_max", "white_box_not_weaker_than_noise_average",
                      "white_box_not_weaker_than_noise_max"):
            assert sanity[f"{model}.{check}"]["passed"], sanity[f"{model}.{check}"]
        for combiner in ("average", "max"):
            assert isinstance(sanity[f"{model}.pgd_converged_{combiner}"]["passed"], bool)
    for model in ("base", "igat"):
        diagnostics = results["diagnostics"][model]
        assert diagnostics["n_examples"] == 60 and diagnostics["members"] == 2
        assert 0.0 <= diagnostics["p"] <= 100.0
        histogram = diagnostics["correct_score_histogram"]
        assert sum(histogram["percent"]) == pytest.approx(100.0 if histogram["count"] else 0.0)
        assert diagnostics["adversarial_accuracy"] <= diagnostics["natural_accuracy"]
    assert "supplement Tables 4-8" in (out / "report.md").read_text()
    assert (out / "plots/diagnostics.png").is_file()
    assert set(results["timing"]) == {"pretrain", "igat", "continued", "global_at", "evaluate"}
    for rel in results["artifacts"].values():
        assert (out / rel).is_file() and not Path(rel).is_absolute()
    for name in ("spec.yaml", "metrics.jsonl", "events.jsonl", "report.md"):
        assert (out / name).is_file()
    assert "Table 1" in (out / "report.md").read_text()
    model = load_ensemble(out / results["artifacts"]["igat_checkpoint"])
    test = load_dataset("digits", "test")
    with torch.no_grad():
        assert torch.allclose(model(test.images[:20]).exp().sum(1), torch.ones(20), atol=1e-5)


def test_rerun_of_a_finished_run_only_rewrites_the_report(tmp_path):
    spec = dict(TINY, controls=[], igat={**TINY["igat"], "enabled": False},
                eval={**TINY["eval"], "combiners": ["average"]})
    spec["base"] = {**TINY["base"], "train": {**TINY["base"]["train"], "epochs": 1}}
    path = write_spec(tmp_path / "s.yaml", spec)
    first = subprocess.run(igat_cmd(path, tmp_path / "out"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert "igat" not in results["evaluation"] and results["improvement"] == {}
    mtime = (tmp_path / "out/checkpoints/base/ensemble.pt").stat().st_mtime_ns
    second = subprocess.run(igat_cmd(path, tmp_path / "out"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0
    assert (tmp_path / "out/checkpoints/base/ensemble.pt").stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "out/results.json").read_text())["evaluation"] == results["evaluation"]


def test_a_different_spec_is_refused_for_an_existing_run_directory(tmp_path):
    spec = dict(TINY, controls=[], base={**TINY["base"], "train": {**TINY["base"]["train"], "epochs": 1}},
                igat={**TINY["igat"], "enabled": False}, eval={**TINY["eval"], "combiners": ["average"]})
    path = write_spec(tmp_path / "a.yaml", spec)
    assert subprocess.run(igat_cmd(path, tmp_path / "out"), cwd=ROOT, capture_output=True).returncode == 0
    other = write_spec(tmp_path / "b.yaml", dict(spec, seed=7))
    proc = subprocess.run(igat_cmd(other, tmp_path / "out"), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "different spec" in proc.stderr and "Traceback" not in proc.stderr
