"""Empirical risks on ambiguous pairs (eq. 5) and Assumption 4.4 rates, on hand-made probabilities."""

from __future__ import annotations

import pytest
import torch

from igat_core.theory.acceptance import PairScores, assumption_rates, empirical_risks, errors
from igat_core.theory.toy import MEMBER_SCORES


def toy_scores() -> PairScores:
    members = torch.tensor(MEMBER_SCORES, dtype=torch.float64)
    return PairScores(members[:, 0:1], members[:, 1:2], torch.tensor([0]), torch.tensor([1]))


def test_toy_pair_gives_the_supplements_risks_through_eq_5():
    risks = empirical_risks(toy_scores())
    assert risks["single"] == 0.5 and risks["average"] == 0.0 and risks["max"] == 0.0
    assert risks["member_pairs"] == 1 and risks["inequality_holds"] == {"average": True, "max": True}
    assert risks["single_per_member"] == [0.5, 0.5]


def test_toy_members_are_acceptable_inside_their_j_range_and_not_outside():
    inside = assumption_rates(toy_scores(), j=4.0)
    assert inside["score_bar"] == 0.75
    assert inside["p"] == 0.5 and inside["part1"] == 0.5 and inside["part1_given_correct"] == 1.0
    assert inside["part2"] == 1.0 and inside["acceptance"] == 1.0 and inside["both_examples_correct"] == 0.0
    assert inside["members_above_threshold"] == 2
    assert inside["theory"]["single"] == pytest.approx(1 - 0.5 + 0.125)
    outside = assumption_rates(toy_scores(), j=10.0)
    assert outside["part1"] == 0.0 and outside["acceptance"] == 0.5


def test_part_2_demands_small_other_scores_and_the_table_7_form_relaxes_it():
    first = torch.tensor([[[0.6, 0.3, 0.1]], [[0.6, 0.2, 0.2]], [[0.6, 0.3, 0.1]]], dtype=torch.float64)
    second = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).expand(3, 1, 3)
    scores = PairScores(first, second, torch.tensor([0]), torch.tensor([2]))
    rates = assumption_rates(scores, j=1e9)
    assert rates["p_per_member"] == [0.5, 0.5, 0.5]
    assert rates["part2"] == pytest.approx(4 / 6)
    wrong = PairScores(first, second, torch.tensor([1]), torch.tensor([2]))
    relaxed = assumption_rates(wrong, j=1e9)
    assert relaxed["part2"] == 1.0 and relaxed["part2_relaxed"] == 1.0 and relaxed["p"] == 0.0


def test_errors_follow_eq_4_with_ties_counted_correct():
    probs = torch.tensor([[0.5, 0.5], [0.4, 0.6]])
    assert errors(probs, torch.tensor([1, 0])).tolist() == [0.0, 1.0]


def test_a_single_member_has_no_ensemble_side():
    scores = toy_scores()
    one = PairScores(scores.first[:1], scores.second[:1], scores.y_first, scores.y_second)
    risks = empirical_risks(one)
    assert risks["average"] is None and risks["inequality_holds"]["average"] is False
