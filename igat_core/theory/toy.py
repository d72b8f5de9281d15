"""The toy example of supplement section 3: one 1-d, 2-class ambiguous pair and two members.

D = {(x_i = 0.3, y_i = 0), (x_j = 0.7, y_j = 1)}; h0 classifies x_i well, h1 classifies x_j well, h = h0.
Reading of the supplement's numbers (the printed text swaps the members' order for x_j and compares h0's
true-class score at x_i with h1's wrong-class score): h0(x_i) = (0.9, 0.1), h1(x_i) = (0.37, 0.63),
h0(x_j) = (0.64, 0.36), h1(x_j) = (0.11, 0.89). It is the only assignment of the printed numbers under which
h1 classifies x_j well and the single model h = h0 has risk 0.5; docs/theory.md gives the details.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POINTS: tuple[float, float] = (0.3, 0.7)
LABELS: tuple[int, int] = (0, 1)
#: MEMBER_SCORES[member][point] = (score of class 0, score of class 1)
MEMBER_SCORES: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.90, 0.10), (0.64, 0.36)),
    ((0.37, 0.63), (0.11, 0.89)),
)
PAPER_RISKS = {"max": 0.0, "average": 0.0, "single": 0.5}

Scores = tuple[tuple[float, ...], ...]


def zero_one_risk(scores: Scores, labels: tuple[int, ...]) -> float:
    """Eq. (4): the share of examples whose true-class score is strictly below the best other class."""
    errors = 0
    for row, y in zip(scores, labels, strict=True):
        other = max(s for c, s in enumerate(row) if c != y)
        errors += int(row[y] < other)
    return errors / len(labels)


def combine(members: tuple[Scores, ...], combiner: str) -> Scores:
    """Average or element-wise max of the members' scores, point by point."""
    if combiner == "average":
        reduce = lambda values: sum(values) / len(values)  # noqa: E731
    elif combiner == "max":
        reduce = max
    else:
        raise ValueError(f"combiner must be 'average' or 'max', got {combiner!r}")
    return tuple(tuple(reduce(col) for col in zip(*rows, strict=True)) for rows in zip(*members, strict=True))


@dataclass(frozen=True)
class ToyExample:
    points: tuple[float, ...] = POINTS
    labels: tuple[int, ...] = LABELS
    members: tuple[Scores, ...] = MEMBER_SCORES
    single_member: int = 0
    risks: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        risks = {c: zero_one_risk(combine(self.members, c), self.labels) for c in ("max", "average")}
        risks["single"] = zero_one_risk(self.members[self.single_member], self.labels)
        object.__setattr__(self, "risks", risks)

    def acceptable_j_range(self) -> tuple[float, float]:
        """J for which every member meets Assumption 4.4 part 1 on the pair: each member's confident score
        is >= 0.5 + 1/J and its score for that class at the other point is <= 0.5 + 1/J."""
        lows, highs = [], []
        for scores in self.members:
            good = max(range(len(self.labels)), key=lambda k: scores[k][self.labels[k]])
            other = 1 - good
            y = self.labels[good]
            lows.append(scores[other][y] - 0.5)
            highs.append(scores[good][y] - 0.5)
        low, high = max(lows), min(highs)
        return (1.0 / high, 1.0 / low if low > 0 else float("inf"))

    def to_dict(self) -> dict:
        names = ("h0", "h1")
        return {
            "points": [{"x": x, "y": y} for x, y in zip(self.points, self.labels, strict=True)],
            "scores": {names[m]: [list(s) for s in scores] for m, scores in enumerate(self.members)},
            "single_model": names[self.single_member],
            "risks": dict(self.risks),
            "paper_risks": dict(PAPER_RISKS),
            "acceptable_j": list(self.acceptable_j_range()),
        }
