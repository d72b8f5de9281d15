"""Theorem 4.1 on one ambiguous pair: the single-model and two-member-ensemble 0-1 risks as functions of p.

p is the probability that an acceptable classifier classifies one example of an ambiguous pair correctly
(supplement section 2.2). The risks come from the case analysis of the proof; their difference

    r1(p) - r2(p) = p (p - 2) (3 p^2 - 6 p + 2) / 4

vanishes in (0, 1) only at p* = 1 - sqrt(3)/3 = 0.422649730810..., which the paper rounds up to 0.425.
docs/theory.md has the derivation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER_THRESHOLD = 0.425
THRESHOLD = 1.0 - math.sqrt(3.0) / 3.0
THRESHOLD_FORMULA = "1 - sqrt(3)/3"

#: r1 - r2 as polynomial coefficients, highest degree first: (3/4) p^4 - 3 p^3 + (7/2) p^2 - p
RISK_GAP_COEFFICIENTS: tuple[float, ...] = (0.75, -3.0, 3.5, -1.0, 0.0)
#: (r1 - r2) * 4 / p: the cubic left after factoring out the root p = 0
GAP_CUBIC_COEFFICIENTS: tuple[float, float, float, float] = (3.0, -12.0, 14.0, -4.0)


@dataclass(frozen=True)
class SingleCases:
    """Probabilities of the single-model cases I-III (supplement eqs. 50-52)."""

    first_correct: float
    second_correct: float
    both_wrong: float


@dataclass(frozen=True)
class EnsembleCases:
    """Probabilities of the ensemble cases I-V (supplement eqs. 60-75); cases I-IV are equally likely."""

    both_members_first: float
    both_members_second: float
    split_members: float
    split_members_swapped: float
    remaining: float


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")


def single_cases(p: float) -> SingleCases:
    _check_probability(p)
    one = p - p * p / 2.0
    return SingleCases(one, one, (1.0 - p) ** 2)


def ensemble_cases(p: float) -> EnsembleCases:
    _check_probability(p)
    one = (p - p * p / 2.0) ** 2
    return EnsembleCases(one, one, one, one, 1.0 - 4.0 * one)


def single_risk(p: float) -> float:
    """r1: expected 0-1 risk of one acceptable classifier on an ambiguous pair (supplement eq. 53)."""
    c = single_cases(p)
    return 0.5 * c.first_correct + 0.5 * c.second_correct + 1.0 * c.both_wrong


def ensemble_risk(p: float) -> float:
    """r2: the proof's bound on the 0-1 risk of an average or max ensemble of two (supplement eq. 75)."""
    c = ensemble_cases(p)
    return (0.5 * c.both_members_first + 0.5 * c.both_members_second
            + 0.0 * (c.split_members + c.split_members_swapped) + 1.0 * c.remaining)


def single_risk_polynomial(p: float) -> float:
    return 1.0 - p + p ** 2 / 2.0


def ensemble_risk_polynomial(p: float) -> float:
    return 1.0 - 3.0 * p ** 2 + 3.0 * p ** 3 - 0.75 * p ** 4


def risk_gap(p: float) -> float:
    """r1(p) - r2(p); positive exactly where the ensemble's bound beats the single model (eq. 77)."""
    return p * (p - 2.0) * (3.0 * p * p - 6.0 * p + 2.0) / 4.0


def cubic_real_roots(a: float, b: float, c: float, d: float) -> list[float]:
    """Real roots of a x^3 + b x^2 + c x + d (a != 0), ascending: trigonometric form when all three are real,
    Cardano's formula otherwise."""
    if a == 0:
        raise ValueError("not a cubic: leading coefficient is 0")
    shift = b / (3.0 * a)
    pp = (3.0 * a * c - b * b) / (3.0 * a * a)
    qq = (2.0 * b ** 3 - 9.0 * a * b * c + 27.0 * a * a * d) / (27.0 * a ** 3)
    disc = -(4.0 * pp ** 3 + 27.0 * qq ** 2)
    if pp == 0.0 and qq == 0.0:
        return [-shift] * 3
    if disc >= 0.0 and pp < 0.0:
        m = 2.0 * math.sqrt(-pp / 3.0)
        arg = max(-1.0, min(1.0, 3.0 * qq / (pp * m)))
        theta = math.acos(arg) / 3.0
        roots = [m * math.cos(theta - 2.0 * math.pi * k / 3.0) - shift for k in range(3)]
        return sorted(roots)
    root = math.sqrt(qq * qq / 4.0 + pp ** 3 / 27.0)
    t = math.copysign(abs(-qq / 2.0 + root) ** (1 / 3), -qq / 2.0 + root) + \
        math.copysign(abs(-qq / 2.0 - root) ** (1 / 3), -qq / 2.0 - root)
    return [t - shift]


def threshold_from_cubic() -> float:
    """The crossing in (0, 1), solved from the cubic 3p^3 - 12p^2 + 14p - 4 by the trigonometric form."""
    inside = [r for r in cubic_real_roots(*GAP_CUBIC_COEFFICIENTS) if 0.0 < r < 1.0]
    if len(inside) != 1:
        raise ArithmeticError(f"expected one root of the risk gap in (0, 1), got {inside}")
    return inside[0]


def threshold_summary() -> dict:
    """What `igat theory --json` prints about the threshold."""
    return {
        "closed_form": THRESHOLD_FORMULA,
        "value": THRESHOLD,
        "paper_value": PAPER_THRESHOLD,
        "polynomial": "r1 - r2 = (3/4)p^4 - 3p^3 + (7/2)p^2 - p = p (p - 2) (3p^2 - 6p + 2) / 4",
        "cubic_roots": cubic_real_roots(*GAP_CUBIC_COEFFICIENTS),
        "risks_at_threshold": {"single": single_risk(THRESHOLD), "ensemble": ensemble_risk(THRESHOLD)},
        "risks_at_paper_value": {"single": single_risk(PAPER_THRESHOLD), "ensemble": ensemble_risk(PAPER_THRESHOLD)},
    }
