"""Theorem 4.1's risks on an ambiguous pair and the exact threshold where they cross."""

from __future__ import annotations

import math

import numpy as np
import pytest

from igat_core.theory import risks
from igat_core.theory.risks import (
    GAP_CUBIC_COEFFICIENTS,
    PAPER_THRESHOLD,
    RISK_GAP_COEFFICIENTS,
    THRESHOLD,
    cubic_real_roots,
    ensemble_cases,
    ensemble_risk,
    ensemble_risk_polynomial,
    risk_gap,
    single_cases,
    single_risk,
    single_risk_polynomial,
    threshold_from_cubic,
)

SAMPLE_P = [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0]


def bisect(f, lo: float, hi: float, iterations: int = 200) -> float:
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if (f(lo) > 0) == (f(mid) > 0):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_closed_form_threshold_matches_numeric_roots_to_1e9():
    quartic = [r.real for r in np.roots(RISK_GAP_COEFFICIENTS) if abs(r.imag) < 1e-12 and 0 < r.real < 1]
    cubic = [r.real for r in np.roots(GAP_CUBIC_COEFFICIENTS) if abs(r.imag) < 1e-12 and 0 < r.real < 1]
    assert len(quartic) == 1 and len(cubic) == 1
    assert THRESHOLD == pytest.approx(quartic[0], abs=1e-9)
    assert THRESHOLD == pytest.approx(cubic[0], abs=1e-9)
    assert THRESHOLD == pytest.approx(threshold_from_cubic(), abs=1e-12)
    assert THRESHOLD == pytest.approx(bisect(lambda p: single_risk(p) - ensemble_risk(p), 0.1, 0.9), abs=1e-12)
    assert THRESHOLD == pytest.approx(0.422649730810, abs=5e-13)


def test_paper_value_is_the_threshold_rounded_up():
    assert THRESHOLD < PAPER_THRESHOLD < THRESHOLD + 0.003
    assert ensemble_risk(PAPER_THRESHOLD) < single_risk(PAPER_THRESHOLD)


def test_both_risks_equal_two_thirds_at_the_threshold():
    assert single_risk(THRESHOLD) == pytest.approx(2 / 3, abs=1e-12)
    assert ensemble_risk(THRESHOLD) == pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize("p", SAMPLE_P)
def test_case_analysis_gives_the_papers_polynomials(p):
    assert single_risk(p) == pytest.approx(single_risk_polynomial(p), abs=1e-15)
    assert ensemble_risk(p) == pytest.approx(ensemble_risk_polynomial(p), abs=1e-15)
    assert single_risk(p) == pytest.approx(1 - p + p ** 2 / 2, abs=1e-15)
    assert ensemble_risk(p) == pytest.approx(1 - 3 * p ** 2 + 3 * p ** 3 - 3 * p ** 4 / 4, abs=1e-15)
    assert risk_gap(p) == pytest.approx(single_risk(p) - ensemble_risk(p), abs=1e-15)
    assert risk_gap(p) == pytest.approx(float(np.polyval(RISK_GAP_COEFFICIENTS, p)), abs=1e-15)


@pytest.mark.parametrize("p", SAMPLE_P)
def test_case_probabilities_sum_to_one(p):
    s, e = single_cases(p), ensemble_cases(p)
    assert s.first_correct + s.second_correct + s.both_wrong == pytest.approx(1.0)
    assert (e.both_members_first + e.both_members_second + e.split_members + e.split_members_swapped
            + e.remaining) == pytest.approx(1.0)


def test_ensemble_beats_single_exactly_above_the_threshold_on_a_fine_grid():
    grid = np.linspace(0.0, 1.0, 200_001)[1:-1]
    r1 = 1 - grid + grid ** 2 / 2
    r2 = 1 - 3 * grid ** 2 + 3 * grid ** 3 - 0.75 * grid ** 4
    above, below = grid > THRESHOLD, grid < THRESHOLD
    assert above.sum() > 0 and below.sum() > 0 and above.sum() + below.sum() == grid.size
    assert np.all(r2[above] < r1[above])
    assert np.all(r2[below] > r1[below])
    assert all(ensemble_risk(p) < single_risk(p) for p in grid[above][::997])
    assert all(ensemble_risk(p) > single_risk(p) for p in grid[below][::997])


def test_trigonometric_and_cardano_cubic_roots_match_numpy():
    assert cubic_real_roots(*GAP_CUBIC_COEFFICIENTS) == pytest.approx([1 - math.sqrt(3) / 3, 1 + math.sqrt(3) / 3, 2.0])
    for coeffs in [(1.0, -6.0, 11.0, -6.0), (2.0, 0.0, 1.0, -3.0), (1.0, 3.0, 3.0, 1.0), (-1.0, 0.5, 2.0, 0.1)]:
        expected = sorted(r.real for r in np.roots(coeffs) if abs(r.imag) < 1e-7)
        got = cubic_real_roots(*coeffs)
        assert len(got) == len(expected) or coeffs == (1.0, 3.0, 3.0, 1.0)
        for root in got:
            assert np.polyval(coeffs, root) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        cubic_real_roots(0.0, 1.0, 1.0, 1.0)


def test_probabilities_outside_the_unit_interval_are_rejected():
    with pytest.raises(ValueError):
        single_risk(1.5)
    with pytest.raises(ValueError):
        ensemble_risk(-0.1)


def test_summary_is_what_the_cli_prints():
    summary = risks.threshold_summary()
    assert summary["closed_form"] == "1 - sqrt(3)/3"
    assert summary["value"] == THRESHOLD and summary["paper_value"] == 0.425
    assert summary["cubic_roots"][0] == pytest.approx(THRESHOLD)
