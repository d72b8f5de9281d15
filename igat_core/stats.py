"""The statistics of a study over seeds: mean, sample standard deviation, and the paired difference of two models
or arms with its Student-t confidence interval. Torch-free (scipy for the t quantile)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """mean, sample standard deviation (ddof 1; None below two values) and the number of values."""

    mean: float | None
    std: float | None
    n: int

    def record(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def summarize(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(None, None, 0)
    mean = sum(values) / n
    if n == 1:
        return Summary(mean, None, 1)
    # sample variance: sum (x_i - mean)^2 / (n - 1)
    variance = sum((x - mean) ** 2 for x in values) / (n - 1)
    return Summary(mean, math.sqrt(variance), n)


def t_quantile(probability: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(probability, dof))


@dataclass(frozen=True)
class PairedDifference:
    """The differences a_i - b_i of paired values: their summary and the two-sided `confidence` t interval of
    their mean (None, with a note, for fewer than two pairs)."""

    summary: Summary
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    @property
    def note(self) -> str:
        if self.summary.n >= 2:
            return ""
        return "no pairs" if self.summary.n == 0 else "one pair: no interval"

    def record(self) -> dict:
        return {**self.summary.record(), "low": self.low, "high": self.high, "confidence": self.confidence,
                "note": self.note}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """mean(a_i - b_i) with its interval over the pairs (a_i, b_i): the two sequences are aligned pair by pair."""
    if len(a) != len(b):
        raise ValueError(f"paired values need sequences of one length, got {len(a)} and {len(b)}")
    summary = summarize([x - y for x, y in zip(a, b)])
    if summary.n < 2:
        return PairedDifference(summary, None, None, confidence)
    # paired t interval: mean(d) +- t_{(1+c)/2, n-1} * sd(d) / sqrt(n)
    half_width = t_quantile((1 + confidence) / 2, summary.n - 1) * summary.std / math.sqrt(summary.n)
    return PairedDifference(summary, summary.mean - half_width, summary.mean + half_width, confidence)
