"""Ensemble-aware attacks (issue 18): MORA against PGD-20 on a diverse (ADP) ensemble, the member-logit surrogate
on an ensemble whose softmax average masks a saturated member's gradient, and the adaptive-evaluation verdict."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from igat_core.attacks import MORA, PGD, LogitPGD
from igat_core.defenses import build_method
from igat_core.ensemble import Ensemble
from igat_core.evaluate import EvalConfig, correct_mask, evaluate_ensemble
from igat_core.report import render_report
from igat_core.results import adaptive_verdict, results_record
from igat_core.train import TrainConfig, fit
from tests.conftest import digits_config

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 0.1


@pytest.fixture(scope="module")
def adp_ensemble(digits_train, tmp_path_factory) -> Ensemble:
    """ADP (alpha 2, beta 0.5), 3 small CNNs of width 8, 10 epochs of Adam: about 98 % natural accuracy on the
    digits examples below (4 s on one core)."""
    method = build_method("adp", {})
    torch.manual_seed(0)
    ensemble = Ensemble(method.configure_model(digits_config(width=8)), 3)
    method.setup(ensemble)
    fit(ensemble, method, digits_train, TrainConfig(epochs=10, batch_size=64, lr=0.01, optimizer="adam", seed=0),
        tmp_path_factory.mktemp("adp"), progress=False)
    return ensemble.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * correct_mask(model, images, labels).float().mean().item()


@pytest.mark.parametrize("combiner", ["average", "max"])
def test_mora_is_at_least_as_strong_as_pgd20_on_a_diverse_ensemble(adp_ensemble, digits_test, combiner):
    """Measured with these seeds: average PGD-20 53.3 %, MORA 43.3 %; max PGD-20 46.7 %, MORA 23.3 % (60 examples,
    eps 0.1, MORA 5 runs of 20 steps)."""
    model = adp_ensemble.with_combiner(combiner)
    x, y = digits_test.images[::6], digits_test.labels[::6]
    pgd = accuracy(model, PGD(model, EPS, EPS / 4, 20, generator=torch.Generator().manual_seed(0))(x, y), y)
    mora = MORA(model, EPS, steps=20, restarts=5, generator=torch.Generator().manual_seed(0))
    adv = mora(x, y)
    assert accuracy(model, x, y) > 90.0 and pgd < 80.0
    assert accuracy(model, adv, y) <= pgd
    assert mora.raw_bounds.within_eps and mora.raw_bounds.within_range
    assert mora.cost.shape == (len(y),) and 1 <= int(mora.cost.min()) and int(mora.cost.max()) <= 100
    assert int((mora.cost == 100).sum()) == int(correct_mask(model, adv, y).sum())


class Affine(nn.Module):
    """Logits bias + slope * [sum of (x - 0.5) over the pixels] on class 1; the other classes constant."""

    def __init__(self, bias: list[float], slope: float):
        super().__init__()
        self.bias = torch.tensor(bias + [-300.0] * (10 - len(bias)))
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = (x - 0.5).flatten(1).sum(dim=1)
        logits = self.bias.expand(len(x), -1).clone()
        logits[:, 1] += self.slope * shift
        return logits


def saturated_ensemble() -> Ensemble:
    """Three members on 8x8 images, all 0.5, label 0; s = sum of (x - 0.5), |s| <= 64 eps = 6.4 in the ball:
    A: z1 - z0 = -200 + 50 s (saturated: e^-200 underflows in float32, so p_A = (1, 0) and no gradient of the
    softmax reaches s; at the ball's corner s = 6.4 it is +120), B: z1 - z0 = +10 (constant, wrong),
    C: z1 - z0 = -2 - 0.2 s. Softmax average P1 = (p_A1 + 0.99995 + p_C1) / 3: 0.37 at x; with p_A1 = 0 it stays
    below 0.5 wherever p_C1 < 0.5, i.e. everywhere in the ball (z1 - z0 of C >= -3.3, <= -0.72); it breaks only when
    A flips (s > 4). Its CE gradient in s is C's alone, p_C0 p_C1 0.2 / 3 P0 > 0 for -log P0 decreasing in s, so
    sign-PGD walks to s = -6.4 and never breaks it; under max the combined p0 = p_A0 and p1 = p_B1 carry no
    gradient at all. The mean of the logits has z1 - z0 = (-192 + 49.8 s) / 3, -64 at x: its CE gradient,
    e^-64 * 49.8 / 3 per pixel, survives in float32 and points to larger s, so PGD reaches the corner, where A
    flips and both combiners misclassify (P1 = 0.68, max p1 = 1 > max p0 = 0.96). A alone gives e^-200 = 0 as
    gradient, C alone points the wrong way: only the mean of the logits breaks it."""
    ensemble = Ensemble(digits_config(), members=3)
    ensemble.members = nn.ModuleList([Affine([0.0, -200.0], 50.0), Affine([0.0, 10.0], 0.0),
                                      Affine([0.0, -2.0], -0.2)])
    return ensemble.eval()


def test_the_logit_surrogate_breaks_a_saturated_member_that_softmax_pgd_cannot():
    x, y = torch.full((8, 1, 8, 8), 0.5), torch.zeros(8, dtype=torch.long)
    config = EvalConfig(attacks=("natural", "pgd", "logit_pgd"), eps=EPS, step=EPS / 4, steps=20, batch_size=8,
                        sanity_examples=0)
    result = evaluate_ensemble(saturated_ensemble(), x, y, config, progress=False)
    for combiner in ("average", "max"):
        acc = result.accuracy[combiner]
        assert (acc["natural"], acc["pgd"], acc["logit_pgd"], acc["union"]) == (100.0, 100.0, 0.0, 0.0), combiner
        assert result.cost[combiner]["logit_pgd"] == 20.0
    assert all(c.passed for c in result.sanity if c.name.startswith(("perturbation", "pixels")))


def test_the_logit_surrogate_tries_the_mean_then_each_member_on_the_examples_still_standing():
    """At eps 0.001 (s <= 0.064) nothing breaks the saturated ensemble, so all four surrogates (the mean of the
    logits, then A, B and C) attack every example, each charged its 3 PGD steps."""
    model = saturated_ensemble()
    x, y = torch.full((4, 1, 8, 8), 0.5), torch.zeros(4, dtype=torch.long)
    attack = LogitPGD(model, 0.001, 0.0005, 3, generator=torch.Generator().manual_seed(0))
    adv = attack(x, y)
    assert correct_mask(model, adv, y).all()
    assert attack.cost.tolist() == [3 * 4] * 4
    assert attack.raw_bounds.within_eps and attack.raw_bounds.within_range


ACCURACY = {"igat": {"average": {"natural": 90.0, "pgd": 50.0, "autoattack": 46.0, "mora": 41.0, "union": 40.0},
                     "max": {"natural": 88.0, "pgd": 30.0, "logit_pgd": 31.0, "union": 29.0}},
            "base": {"average": {"natural": 91.0, "pgd": 40.0, "autoattack": 38.5, "mora": 39.0, "union": 37.0}}}


def test_the_verdict_names_the_strongest_attack_and_its_distance_below_the_papers_attacks():
    verdict = adaptive_verdict(ACCURACY)
    assert verdict["igat"]["average"] == {"strongest": "mora", "accuracy": 41.0, "below": {"pgd": 9.0,
                                                                                           "autoattack": 5.0}}
    assert verdict["igat"]["max"] == {"strongest": "pgd", "accuracy": 30.0, "below": {"pgd": 0.0}}
    assert verdict["base"]["average"]["strongest"] == "autoattack"
    without = {m: {c: {a: v for a, v in acc.items() if a not in ("mora", "logit_pgd")} for c, acc in by_c.items()}
               for m, by_c in ACCURACY.items()}
    assert adaptive_verdict(without) == {}


def test_results_json_and_the_report_carry_the_verdict_only_when_an_ensemble_aware_attack_ran():
    def record(accuracy: dict) -> dict:
        evaluation = {"accuracy": accuracy, "n_examples": 100, "sanity": {}, "cost": {}}
        return results_record(evaluation, name="run", spec={}, eps=EPS, timing={}, artifacts={},
                              device=torch.device("cpu"))

    with_verdict = record(ACCURACY)
    assert with_verdict["adaptive_verdict"] == adaptive_verdict(ACCURACY)
    report = render_report(with_verdict)
    assert "| iGAT | average | MORA | 41.00 | 9.00 | 5.00 |" in report
    assert "| iGAT | max | PGD | 30.00 | 0.00 | n/a |" in report
    plain = record({"igat": {"average": {"natural": 90.0, "pgd": 50.0, "union": 50.0}}})
    assert "adaptive_verdict" not in plain and "Adaptive evaluation" not in render_report(plain)


def test_mora_weights_and_scale_follow_the_repositorys_formulas():
    """Members z_1 = (2, 0, 0) (correct), z_2 = (0, 1, 0) (wrong), label 0, tau = 1: the largest margin 2 <= 10,
    so S = 1; P = mean of the softmaxes classifies correctly (sigma = -1) with runner-up k = 1; member 1's weight is
    -q p_y / P_y + q (1 + q) / P_k with q = p_1[1], p_y = p_1[0]; member 2 classifies wrongly and weighs 0."""
    from igat_core.attacks.mora import member_scale, member_weights

    e = math.e
    logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    p1, p2 = [e * e / (e * e + 2), 1 / (e * e + 2)], [1 / (2 + e), e / (2 + e)]
    big_p = [(p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2]
    q = p1[1]
    expected = -q * p1[0] / big_p[0] + q * (1 + q) / big_p[1]
    weights = member_weights(logits, logits, torch.tensor([0]), temperature=1.0)
    assert weights[:, 0].tolist() == pytest.approx([expected, 0.0], rel=1e-5)
    assert member_scale(logits).tolist() == [1.0]
    assert member_scale(torch.tensor([[[25.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]]])).tolist() == [2.5]
