"""The Monte-Carlo check of Theorem 4.1 with real MLPs, and the `igat theory` commands."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from igat_core.cli import app
from igat_core.ensemble import Ensemble
from igat_core.theory.cli import infer_dataset
from igat_core.theory.montecarlo import MonteCarloConfig, run_montecarlo, write_montecarlo
from igat_core.theory.risks import THRESHOLD
from tests.conftest import digits_config

runner = CliRunner()


@pytest.fixture(scope="module")
def small_run():
    config = MonteCarloConfig(members=3, epochs=2, steps=2, pairs=25, seed=0)
    return run_montecarlo(config)


def test_montecarlo_measures_both_sides_of_eq_5(small_run):
    r = small_run
    assert len(r.pairs) == 25 and len(r.natural_accuracy) == 3
    assert torch.all(r.labels[r.pairs.first] != r.labels[r.pairs.second])
    for key in ("single", "average", "max"):
        assert 0.0 <= r.risks[key] <= 1.0
    assert r.risks["member_pairs"] == 3
    assert r.risks["inequality_holds"]["average"] == (r.risks["average"] < r.risks["single"])
    assert 0.0 <= r.rates["p"] <= 1.0 and 0.0 <= r.rates["acceptance"] <= r.rates["part2"] + 1e-12
    assert r.rates["theory"]["threshold"] == THRESHOLD
    assert r.rates["J"] == (r.pairs.j if r.pairs.definition_met else r.config.fallback_j)
    assert r.seconds["total"] >= r.seconds["train"]


def test_montecarlo_writes_its_table(small_run, tmp_path):
    paths = write_montecarlo(small_run, tmp_path)
    assert [p.name for p in paths] == ["montecarlo.json", "montecarlo.md", "risks.png"]
    data = json.loads((tmp_path / "montecarlo.json").read_text())
    assert data["ambiguous_pairs"]["count"] == 25 and data["config"]["members"] == 3
    text = (tmp_path / "montecarlo.md").read_text()
    assert "risk, average of two" in text and "| i | j | y_i | y_j | distance |" in text


def test_montecarlo_restores_the_thread_count():
    before = torch.get_num_threads()
    run_montecarlo(MonteCarloConfig(members=1, epochs=1, adversarial=False, pairs=3), models=None)
    assert torch.get_num_threads() == before


def test_a_given_j_may_leave_a_d_empty_and_the_table_says_so():
    torch.manual_seed(0)
    models = [Ensemble(digits_config("mlp", 8), members=1).members[0].eval() for _ in range(2)]
    result = run_montecarlo(MonteCarloConfig(members=2, j=3.0), models=models)
    assert len(result.pairs) == 0 and not result.pairs.definition_met and result.rates == {}
    assert "| risk, single member | n/a |" in result.table()
    json.dumps(result.to_dict(), allow_nan=False)


def test_cli_prints_threshold_and_toy_example():
    result = runner.invoke(app, ["theory", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["threshold"]["value"] == pytest.approx(THRESHOLD, abs=1e-12)
    assert data["toy_example"]["risks"] == {"max": 0.0, "average": 0.0, "single": 0.5}
    text = runner.invoke(app, ["theory"])
    assert text.exit_code == 0 and "1 - sqrt(3)/3 = 0.422649730810" in text.output


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("theory-ckpt") / "ensemble.pt"
    Ensemble(digits_config("mlp", 16), members=2).save(path)
    return path


def test_cli_diagnose_and_pairs(mlp_checkpoint, tmp_path):
    plot = tmp_path / "d.png"
    result = runner.invoke(app, ["theory", "diagnose", str(mlp_checkpoint), "--n-examples", "20", "--eps", "0.1",
                                 "--steps", "2", "--device", "cpu", "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["dataset"] == "digits" and data["n_examples"] == 20 and plot.exists()
    result = runner.invoke(app, ["theory", "pairs", str(mlp_checkpoint), "--pairs", "3", "--json"])
    assert result.exit_code == 0, result.output
    pairs = json.loads(result.output)["ambiguous_pairs"]
    assert pairs["count"] == 3 and pairs["pairs"][0]["distance"] <= pairs["pairs"][2]["distance"]
    missing = runner.invoke(app, ["theory", "diagnose", str(tmp_path / "none.pt")])
    assert missing.exit_code != 0


def test_cli_montecarlo_writes_the_table(tmp_path):
    result = runner.invoke(app, ["theory", "montecarlo", "--members", "2", "--epochs", "1", "--pairs", "5",
                                 "--plain", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "eq. 5 holds" in result.output and (tmp_path / "montecarlo.md").exists()


def test_dataset_is_inferred_from_the_model_config():
    assert infer_dataset(digits_config("mlp", 8)) == "digits"
