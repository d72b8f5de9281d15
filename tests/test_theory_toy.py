"""The toy example of supplement section 3 and the reading of its numbers."""

from __future__ import annotations

import pytest
import torch

from igat_core.ensemble import combine_probs
from igat_core.theory.toy import MEMBER_SCORES, PAPER_RISKS, ToyExample, combine, zero_one_risk


def test_toy_example_reproduces_the_supplements_risks():
    toy = ToyExample()
    assert toy.risks == PAPER_RISKS == {"max": 0.0, "average": 0.0, "single": 0.5}


def test_reading_h0_classifies_x_i_and_h1_classifies_x_j():
    toy = ToyExample()
    (h0_i, h0_j), (h1_i, h1_j) = toy.members
    y_i, y_j = toy.labels
    assert h0_i[y_i] == max(h0_i) and h0_j[y_j] < max(h0_j)
    assert h1_j[y_j] == max(h1_j) and h1_i[y_i] < max(h1_i)
    assert h0_j[y_i] == 0.64 and h1_j[y_j] == 0.89


def test_the_literal_member_order_for_x_j_contradicts_the_stated_single_risk():
    literal = (((0.90, 0.10), (0.11, 0.89)), ((0.37, 0.63), (0.64, 0.36)))
    assert ToyExample(members=literal).risks["single"] == 0.0


def test_toy_members_meet_assumption_4_4_part_1_for_a_range_of_j():
    low, high = ToyExample().acceptable_j_range()
    assert low == pytest.approx(1 / 0.39) and high == pytest.approx(1 / 0.14)
    assert 2 < low < high


def test_pure_python_combiners_agree_with_the_ensemble_module():
    members = torch.tensor(MEMBER_SCORES, dtype=torch.float64)
    for combiner in ("average", "max"):
        got = torch.tensor(combine(MEMBER_SCORES, combiner), dtype=torch.float64)
        assert torch.allclose(got, combine_probs(members, combiner))
    with pytest.raises(ValueError):
        combine(MEMBER_SCORES, "median")


def test_zero_one_risk_counts_ties_as_correct():
    assert zero_one_risk(((0.5, 0.5), (0.2, 0.8)), (0, 0)) == 0.5
