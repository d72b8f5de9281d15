"""The supplement's diagnostics (Tables 4-8) on hand-made probabilities and on a trained MLP ensemble."""

from __future__ import annotations

import json

import pytest
import torch

from igat_core.data import equidistant_indices
from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble
from igat_core.theory.diagnostics import (
    SCORE_BIN_LABELS,
    diagnostics_table,
    ensemble_diagnostics,
    global_adversarial_examples,
    score_diagnostics,
    score_histogram,
)
from igat_core.theory.plots import plot_diagnostics, plot_risks
from igat_core.train import TrainConfig, fit
from tests.conftest import digits_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor([
        [[0.75, 0.15, 0.10], [0.60, 0.30, 0.10], [0.50, 0.30, 0.20]],
        [[0.15, 0.65, 0.20], [0.10, 0.85, 0.05], [0.20, 0.45, 0.35]],
    ], dtype=torch.float64)
    return probs, torch.tensor([0, 1, 2])


def test_tables_4_to_8_on_hand_made_probabilities():
    probs, labels = hand_made()
    d = score_diagnostics(probs, labels, "average")
    assert d["p"] == pytest.approx(100 * 2 / 6)
    assert d["p_per_member"] == pytest.approx([100 / 3, 100 / 3])
    assert d["correct_score_histogram"]["percent"] == pytest.approx([0, 0, 0, 50, 50, 0])
    assert d["correct_score_histogram"]["count"] == 2
    assert d["largest_wrong_score"] == pytest.approx((0.15 + 0.6 + 0.5 + 0.65 + 0.1 + 0.45) / 6)
    assert d["small_wrong_score_rate"] == pytest.approx(50.0)
    assert d["ensemble_errors"] == 1 and d["best_member_score_on_errors"] == pytest.approx(0.35)


def test_no_ensemble_errors_leave_table_8_empty():
    probs, labels = hand_made()
    d = score_diagnostics(probs[:, :2], labels[:2], "max")
    assert d["ensemble_errors"] == 0 and d["best_member_score_on_errors"] is None
    given = score_diagnostics(probs, labels, "average", ensemble_predictions=labels)
    assert given["ensemble_errors"] == 0 and given["p"] == score_diagnostics(probs, labels)["p"]


def test_histogram_bins_are_closed_on_the_left():
    h = score_histogram(torch.tensor([0.49, 0.5, 0.6, 0.95, 1.0]))
    assert h["labels"] == list(SCORE_BIN_LABELS)
    assert h["percent"] == pytest.approx([20, 20, 20, 0, 0, 40])
    assert score_histogram(torch.zeros(0))["percent"] == [0.0] * 6


@pytest.fixture(scope="module")
def mlp_ensemble(digits_train, tmp_path_factory) -> Ensemble:
    torch.manual_seed(0)
    ensemble = Ensemble(digits_config("mlp", 32), members=3)
    fit(ensemble, Plain(), digits_train, TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=0),
        tmp_path_factory.mktemp("theory-mlp"), progress=False)
    return ensemble.eval()


@pytest.fixture(scope="module")
def diagnostics(mlp_ensemble, digits_test) -> dict:
    idx = equidistant_indices(len(digits_test.labels), 60)
    return ensemble_diagnostics(mlp_ensemble, digits_test.images[idx], digits_test.labels[idx], combiner="average",
                                eps=0.1, step=0.025, steps=5, device="cpu", seed=0)


def test_ensemble_diagnostics_are_json_and_in_range(diagnostics):
    json.dumps(diagnostics, allow_nan=False)
    assert diagnostics["n_examples"] == 60 and diagnostics["members"] == 3
    assert diagnostics["adversarial_accuracy"] <= diagnostics["natural_accuracy"]
    assert 0 <= diagnostics["p"] <= 100 and 0 <= diagnostics["small_wrong_score_rate"] <= 100
    assert 0 <= diagnostics["largest_wrong_score"] <= 1
    assert sum(diagnostics["correct_score_histogram"]["percent"]) == pytest.approx(100)
    curvature = diagnostics["curvature"]
    assert curvature["radius"] == pytest.approx(0.8)
    assert 0 <= curvature["members"]["median"] <= curvature["members"]["max"]
    assert len(curvature["per_member_max"]) == 3 and curvature["ensemble"]["max"] >= 0


def test_diagnostics_are_reproducible_and_match_the_attacked_member_scores(mlp_ensemble, digits_test, diagnostics):
    idx = equidistant_indices(len(digits_test.labels), 60)
    again = ensemble_diagnostics(mlp_ensemble, digits_test.images[idx], digits_test.labels[idx], eps=0.1,
                                 step=0.025, steps=5, seed=0, curvature=False)
    assert again["p"] == diagnostics["p"] and "curvature" not in again
    assert 100 - again["adversarial_accuracy"] == pytest.approx(100 * again["ensemble_errors"] / 60)
    x, y = digits_test.images[idx], digits_test.labels[idx]
    adv = global_adversarial_examples(mlp_ensemble, x, y, eps=0.1, step=0.025, steps=5, seed=0)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    given = ensemble_diagnostics(mlp_ensemble, x, y, eps=0.1, step=0.025, steps=5, curvature=False, adversarial=adv)
    assert given["p"] == diagnostics["p"] and given["attack"]["given"]
    natural = ensemble_diagnostics(mlp_ensemble, x, y, curvature=False, adversarial=x)
    assert natural["adversarial_accuracy"] == natural["natural_accuracy"]
    with pytest.raises(ValueError):
        ensemble_diagnostics(mlp_ensemble, x, y, curvature=False, adversarial=x[:3])


def test_table_and_plot_for_the_report(diagnostics, tmp_path):
    table = diagnostics_table({"base": diagnostics, "igat": diagnostics, "missing": None})
    assert "| quantity | base | igat |" in table and "(Table 8)" in table and "0.9-1.0" in table
    assert diagnostics_table({}) == ""
    png = plot_diagnostics({"base": diagnostics, "igat": diagnostics}, tmp_path / "plots" / "diagnostics.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    risks = plot_risks(tmp_path / "risks.png", {"p": 0.7, "single": 0.3, "average": 0.2, "max": None})
    assert risks.read_bytes()[:8] == PNG_MAGIC
