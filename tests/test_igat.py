"""The iGAT pieces against hand-derived values: distributing rules (eqs. 13-14), roulette, L_R (eq. 15), eq. 16."""

from __future__ import annotations

import math

import pytest
import torch

from igat_core.defenses import Plain
from igat_core.igat import (IgatConfig, IgatObjective, distribution_probs, global_adversarial_loss,
                            misclassification_regularizer, roulette_select)

# true-class probabilities of 8 members for one example, in a scrambled order; ranks by descending value
SCORES_8 = torch.tensor([[0.30, 0.95, 0.10, 0.55, 0.70, 0.05, 0.20, 0.40]])
RANKS_8 = [5, 1, 7, 3, 2, 8, 6, 4]


def test_soft_rule_n8_matches_eq14():
    p = distribution_probs(SCORES_8, "soft")[0]
    expected = torch.tensor([2 ** (8 - r) / 255 for r in RANKS_8])
    assert torch.allclose(p, expected, atol=1e-7)
    assert p[1].item() == pytest.approx(128 / 255)
    assert p[5].item() == pytest.approx(1 / 255)
    assert p.sum().item() == pytest.approx(1.0)


def test_opposite_rule_reverses_the_ranking():
    p = distribution_probs(SCORES_8, "opposite")[0]
    assert p[5].item() == pytest.approx(128 / 255)
    assert p[1].item() == pytest.approx(1 / 255)


def test_hard_rule_picks_the_best_member():
    scores = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    assert distribution_probs(scores, "hard").tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_random_rule_is_uniform():
    assert torch.allclose(distribution_probs(SCORES_8, "random"), torch.full((1, 8), 1 / 8))


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="rule must be one of"):
        distribution_probs(SCORES_8, "greedy")


def test_roulette_frequencies_match_soft_rule_within_one_point():
    probs = distribution_probs(SCORES_8.expand(100_000, 8), "soft")
    picks = roulette_select(probs, torch.Generator().manual_seed(1234))
    freq = torch.bincount(picks, minlength=8).double() / 100_000
    expected = torch.tensor([2 ** (8 - r) / 255 for r in RANKS_8], dtype=torch.float64)
    assert (freq - expected).abs().max().item() < 0.01


def test_roulette_interval_boundaries():
    probs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert roulette_select(probs, torch.Generator().manual_seed(0)).tolist() == [1, 0, 2]


def _members(*rows):
    """(N, B, C) member probabilities from per-member lists of per-example rows."""
    return torch.tensor(rows, dtype=torch.float64)


def test_regularizer_hand_made_three_members():
    # example 0: label 0, average [0.3, 0.533, 0.167] is wrong; worst wrong class is member 1's 0.8
    # example 1: label 2, average [0.4, 0.3, 0.3] is wrong; member 1's true-class 0.8 must be ignored, max wrong 0.6
    # example 2: label 0, average [0.6, 0.3, 0.1] is right -> 0
    probs = _members(
        [[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]],
        [[0.3, 0.6, 0.1], [0.5, 0.45, 0.05], [0.5, 0.4, 0.1]],
        [[0.5, 0.2, 0.3], [0.6, 0.35, 0.05], [0.5, 0.4, 0.1]],
    )
    labels = torch.tensor([0, 2, 0])
    misclassified = probs.mean(0).argmax(-1) != labels
    assert misclassified.tolist() == [True, True, False]
    paper = misclassification_regularizer(probs, labels, misclassified, "paper")
    assert paper.tolist() == pytest.approx([-math.log(1 - 0.8), -math.log(1 - 0.6), 0.0])
    per_member = misclassification_regularizer(probs, labels, misclassified, "per_member")
    assert per_member[0].item() == pytest.approx(-math.log(0.2) - math.log(0.4) - math.log(0.7))
    assert per_member[1].item() == pytest.approx(-math.log(1 - 0.1) - math.log(1 - 0.5) - math.log(1 - 0.6))


def test_regularizer_clip_caps_the_term_and_its_gradient():
    probs = _members([[0.003, 0.995, 0.002]]).requires_grad_(True)
    value = misclassification_regularizer(probs, torch.tensor([0]), torch.tensor([True]), "paper", clip=0.99)
    assert value.item() == pytest.approx(-math.log(0.01))
    value.sum().backward()
    assert probs.grad.abs().sum().item() == 0.0


def test_global_adversarial_loss_per_member_mean_and_batch_sum():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                           [[0.5, 0.5], [3.0, 0.0], [0.0, 2.0]]])
    labels = torch.tensor([0, 1, 1])
    assignment = torch.tensor([0, 1, 0])
    ones = torch.ones(3)

    def ce(z, y):
        return -z[y] + math.log(sum(math.exp(v) for v in z))

    member0 = [ce([2.0, 0.0], 0), ce([1.0, 1.0], 1)]
    member1 = [ce([3.0, 0.0], 1)]
    per_member = global_adversarial_loss(logits, labels, assignment, ones, "member")
    assert per_member.item() == pytest.approx(sum(member0) / 2 + member1[0])
    batch = global_adversarial_loss(logits, labels, assignment, ones, "batch")
    assert batch.item() == pytest.approx((sum(member0) + member1[0]) / 3)
    masked = global_adversarial_loss(logits, labels, assignment, torch.tensor([1.0, 1.0, 0.0]), "member")
    assert masked.item() == pytest.approx(member0[0] + member1[0])


def test_enhanced_objective_combines_its_terms(trained_ensemble, digits_train):
    x, y = digits_train.images[:64], digits_train.labels[:64]
    config = IgatConfig(alpha=5.0, beta=10.0, eps=0.1, step=0.025, steps=5)
    out = IgatObjective(Plain(), config)(trained_ensemble, x, y, torch.Generator().manual_seed(0))
    m = out.metrics
    assert m["loss"] == pytest.approx(m["base_ce"] + 5.0 * m["global_adv_loss"] + 10.0 * m["regularizer"], rel=1e-5)
    assert m["global_adv_error"] > m["natural_error"]
    out.loss.backward()
    grads = [p.grad for member in trained_ensemble.members for p in member.parameters()]
    assert all(g is not None for g in grads)
    trained_ensemble.zero_grad(set_to_none=True)
    zero = IgatObjective(Plain(), IgatConfig(alpha=0.0, beta=0.0, eps=0.1, step=0.025, steps=5))
    assert zero(trained_ensemble, x, y).loss.item() == pytest.approx(Plain()(trained_ensemble, x, y).loss.item(),
                                                                    rel=1e-5)
