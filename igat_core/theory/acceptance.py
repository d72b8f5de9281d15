"""Empirical 0-1 risks on ambiguous pairs (eqs. 4, 5) and how often Assumption 4.4 holds there.

Inputs are member probabilities at the two examples of each pair: `first` and `second` are (M, P, C) for M
members and P pairs, with labels y_first, y_second (P,). Every example of a pair is judged against the other one.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

from igat_core.ensemble import combine_probs
from igat_core.theory.risks import THRESHOLD, ensemble_risk, single_risk

#: slack for the equalities of Assumption 4.4 part 2 (with two classes it holds with equality)
TOLERANCE = 1e-9


def true_and_best_other(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., P, C) scores -> the true-class score and the largest other-class score, each (..., P)."""
    index = labels.expand(*probs.shape[:-1]).unsqueeze(-1)
    true = probs.gather(-1, index).squeeze(-1)
    other = probs.scatter(-1, index, -torch.inf).amax(-1)
    return true, other


def errors(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (4) per example: 1 where the true-class score is strictly below the best other class."""
    true, other = true_and_best_other(probs, labels)
    return (true < other).double()


@dataclass
class PairScores:
    first: torch.Tensor
    second: torch.Tensor
    y_first: torch.Tensor
    y_second: torch.Tensor

    @property
    def members(self) -> int:
        return int(self.first.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.first.shape[-1])

    def pair_risk(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """R_0/1 on each two-example set D_2 = a (supplement eq. 45)."""
        return 0.5 * (errors(first, self.y_first) + errors(second, self.y_second))


def empirical_risks(scores: PairScores) -> dict:
    """Both sides of eq. (5): single members, and average / max ensembles of every pair of distinct members."""
    single = scores.pair_risk(scores.first, scores.second)
    out: dict = {"single": float(single.mean()), "single_per_member": single.mean(1).tolist()}
    duos = list(combinations(range(scores.members), 2))
    for combiner in ("average", "max"):
        if not duos:
            out[combiner] = None
            continue
        values = [scores.pair_risk(combine_probs(scores.first[list(d)], combiner),
                                   combine_probs(scores.second[list(d)], combiner)).mean() for d in duos]
        out[combiner] = float(torch.stack(values).mean())
    out["member_pairs"] = len(duos)
    out["inequality_holds"] = {c: (out[c] is not None and out[c] < out["single"]) for c in ("average", "max")}
    return out


def _role_checks(own: torch.Tensor, other_point: torch.Tensor, y: torch.Tensor, j: float
                 ) -> dict[str, torch.Tensor]:
    """Per (member, pair) checks for one role of the pair: `own` are scores at x_e, `other_point` at x_o."""
    bar = 0.5 + 1.0 / j
    true, best_other = true_and_best_other(own, y)
    correct = true >= best_other
    index = y.expand(*own.shape[:-1]).unsqueeze(-1)
    at_other = other_point.gather(-1, index).squeeze(-1)
    confident = (true >= bar) & (at_other <= bar)
    c = own.shape[-1]
    top, predicted = own.max(-1)
    limit = (1.0 - top) / (c - 1)
    excluded = torch.zeros_like(own, dtype=torch.bool)
    excluded.scatter_(-1, index, True)
    excluded.scatter_(-1, predicted.unsqueeze(-1), True)
    small_others = (own.masked_fill(excluded, -torch.inf) <= limit.unsqueeze(-1) + TOLERANCE).all(-1)
    true_not_small = correct | (true >= limit - TOLERANCE)
    return {"correct": correct, "confident": confident, "small_others": small_others,
            "true_not_small": true_not_small, "accepted": (~correct | confident) & small_others,
            "accepted_relaxed": (~correct | confident) & true_not_small}


def assumption_rates(scores: PairScores, j: float) -> dict:
    """Rates over (member, pair, example): p of the proof (correct), Assumption 4.4 part 1 (confident score
    >= 0.5 + 1/J and <= 0.5 + 1/J at the other example), part 2 (small other scores), and their conjunction
    (a correct example must be confident; every example needs part 2). The relaxed part 2 is the supplement's
    Table 7 form: a misclassified example needs h_y >= (1 - h_yhat) / (C - 1)."""
    a = _role_checks(scores.first, scores.second, scores.y_first, j)
    b = _role_checks(scores.second, scores.first, scores.y_second, j)
    both = {k: torch.cat([a[k], b[k]], dim=1).double() for k in a}
    correct = both["correct"]
    n_correct = float(correct.sum())
    rates = {
        "J": j,
        "score_bar": 0.5 + 1.0 / j,
        "p": float(correct.mean()),
        "part1": float(both["confident"].mean()),
        "part1_given_correct": float((both["confident"] * correct).sum() / n_correct) if n_correct else None,
        "part2": float(both["small_others"].mean()),
        "part2_relaxed": float(both["true_not_small"].mean()),
        "acceptance": float(both["accepted"].mean()),
        "acceptance_relaxed": float(both["accepted_relaxed"].mean()),
        "both_examples_correct": float((a["correct"] & b["correct"]).double().mean()),
        "p_per_member": correct.mean(1).tolist(),
        "acceptance_per_member": both["accepted"].mean(1).tolist(),
    }
    rates["members_above_threshold"] = sum(p > THRESHOLD for p in rates["p_per_member"])
    rates["theory"] = {"threshold": THRESHOLD, "single": single_risk(rates["p"]), "ensemble": ensemble_risk(rates["p"])}
    return rates
