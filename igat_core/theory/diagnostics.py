"""The supplement's diagnostics (section 4, Tables 4-8) of a trained ensemble on its global adversarial examples.

Global adversarial examples X~ come from PGD on the combined ensemble (the supplement attacks the average
combiner). With h^i the members' softmax outputs on X~ and y the labels:

- p (Table 4): E_{i, x} 1[h^i_y(x) > max_{c != y} h^i_c(x)], in percent.
- correct_score_histogram (Table 5): h^i_y(x) over the (member, example) pairs counted in p, in percent per bin.
- largest_wrong_score (Table 6): E_{i, x} max_{c != y} h^i_c(x).
- small_wrong_score_rate (Table 7): E 1[h^i_y(x) >= (1 - h^i_yhat(x)) / (C - 1)] over the (member, example) pairs
  the member misclassifies (yhat = the member's prediction), in percent.
- best_member_score_on_errors (Table 8): E_{x: yhat_h(x) != y} max_i h^i_y(x), over the examples the combined
  ensemble misclassifies.
- curvature: eq. (2) of each member's and of the combined ensemble's cross-entropy at the natural examples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from igat_core.attacks import PGD
from igat_core.ensemble import Ensemble, combine_probs
from igat_core.theory.acceptance import TOLERANCE
from igat_core.theory.curvature import CurvatureConfig, default_radius, pointwise_curvature, summarize
from igat_core.theory.serialize import jsonable

SCORE_BIN_EDGES: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SCORE_BIN_LABELS: tuple[str, ...] = ("<0.5", "0.5-0.6", "0.6-0.7", "0.7-0.8", "0.8-0.9", "0.9-1.0")


def _percent(mask: torch.Tensor) -> float | None:
    return None if mask.numel() == 0 else 100.0 * float(mask.double().mean())


def score_histogram(scores: torch.Tensor) -> dict:
    """Percent of scores per Table 5 bin: [0, 0.5), [0.5, 0.6), ..., [0.9, 1.0]."""
    bins = torch.bucketize(scores.double(), torch.tensor(SCORE_BIN_EDGES[1:-1], dtype=torch.float64), right=True)
    counts = torch.bincount(bins, minlength=len(SCORE_BIN_LABELS)).double()
    total = float(counts.sum())
    percent = (100.0 * counts / total).tolist() if total else [0.0] * len(SCORE_BIN_LABELS)
    return {"labels": list(SCORE_BIN_LABELS), "edges": list(SCORE_BIN_EDGES), "percent": percent,
            "count": int(total)}


def score_diagnostics(member_probs: torch.Tensor, labels: torch.Tensor, combiner: str = "average",
                      ensemble_predictions: torch.Tensor | None = None) -> dict:
    """Tables 4-8 from (N, B, C) member probabilities on the adversarial examples and their labels (B,).

    The ensemble's predictions (Table 8) come from `combiner` over the members, unless given (any combiner)."""
    n, b, c = member_probs.shape
    probs = member_probs.double()
    y = labels.expand(n, b)
    true = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    wrong = probs.scatter(-1, y.unsqueeze(-1), -torch.inf).amax(-1)
    correct = true > wrong
    top, predicted = probs.max(-1)
    missed = predicted != y
    small_wrong = true >= (1.0 - top) / (c - 1) - TOLERANCE
    if ensemble_predictions is None:
        ensemble_predictions = combine_probs(probs, combiner).argmax(-1)
    ensemble_missed = ensemble_predictions != labels
    best_true = true.amax(0)
    return {
        "p": _percent(correct),
        "p_per_member": [_percent(correct[i]) for i in range(n)],
        "correct_score_histogram": score_histogram(true[correct]),
        "largest_wrong_score": float(wrong.mean()) if wrong.numel() else None,
        "small_wrong_score_rate": _percent(small_wrong[missed]),
        "best_member_score_on_errors": float(best_true[ensemble_missed].mean()) if ensemble_missed.any() else None,
        "ensemble_errors": int(ensemble_missed.sum()),
    }


def global_adversarial_examples(ensemble: Ensemble, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                                step: float, steps: int, device: str | torch.device = "cpu", seed: int = 0,
                                batch_size: int = 256) -> torch.Tensor:
    """PGD (random start) on the ensemble with its own combiner, batch by batch; returned on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    attack = PGD(ensemble, eps, step, steps, random_start=True, generator=generator)
    out = []
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size].to(device), labels[start:start + batch_size].to(device)
        out.append(attack(x, y).cpu())
    return torch.cat(out) if out else images.clone()


@torch.no_grad()
def _predictions(ensemble: Ensemble, images: torch.Tensor, device: str | torch.device,
                 batch_size: int) -> torch.Tensor:
    return torch.cat([ensemble(images[s:s + batch_size].to(device)).argmax(-1).cpu()
                      for s in range(0, len(images), batch_size)])


@torch.no_grad()
def _member_probs(ensemble: Ensemble, images: torch.Tensor, device: str | torch.device,
                  batch_size: int) -> torch.Tensor:
    chunks = [ensemble.member_probs(images[s:s + batch_size].to(device)).cpu()
              for s in range(0, len(images), batch_size)]
    return torch.cat(chunks, dim=1)


def ensemble_diagnostics(ensemble: Ensemble, images: torch.Tensor, labels: torch.Tensor, *, combiner: str = "average",
                         eps: float = 8 / 255, step: float = 2 / 255, steps: int = 20,
                         device: str | torch.device = "cpu", seed: int = 0, batch_size: int = 256,
                         curvature_radius: float | None = None, curvature: bool = True,
                         adversarial: torch.Tensor | None = None) -> dict:
    """Supplement Tables 4-8 and the curvature for one ensemble: a JSON-serialisable dict.

    Rates (p, the histogram, small_wrong_score_rate, accuracies) are percentages; scores are in [0, 1].
    `adversarial` reuses global adversarial examples already made against this combiner (the attack is skipped;
    eps, step and steps are then only recorded)."""
    target = ensemble.with_combiner(combiner).to(device).eval()
    if adversarial is None:
        adv = global_adversarial_examples(target, images, labels, eps=eps, step=step, steps=steps, device=device,
                                          seed=seed, batch_size=batch_size)
    elif adversarial.shape != images.shape:
        raise ValueError(f"adversarial examples {tuple(adversarial.shape)} do not match images {tuple(images.shape)}")
    else:
        adv = adversarial.cpu()
    attacked = _member_probs(target, adv, device, batch_size)
    adv_predictions = _predictions(target, adv, device, batch_size)
    result = {
        "combiner": combiner,
        "attack": {"name": "pgd", "eps": eps, "step": step, "steps": steps, "random_start": True, "seed": seed,
                   "given": adversarial is not None},
        "n_examples": int(len(labels)),
        "members": target.num_members,
        "natural_accuracy": _percent(_predictions(target, images, device, batch_size) == labels),
        "adversarial_accuracy": _percent(adv_predictions == labels),
        **score_diagnostics(attacked, labels, combiner, adv_predictions),
    }
    if curvature:
        radius = curvature_radius or default_radius(eps, images)
        config = CurvatureConfig(radius, seed=seed, batch_size=batch_size)
        members = [pointwise_curvature(m, images, labels, config) for m in target.members]
        result["curvature"] = {
            "radius": radius,
            "members": summarize(torch.cat(members)),
            "per_member_max": [float(v.max()) for v in members if v.numel()],
            "ensemble": summarize(pointwise_curvature(target, images, labels, config)),
        }
    return jsonable(result)


def diagnostics_table(diagnostics: Mapping[str, Mapping | None]) -> str:
    """Markdown with one column per model (e.g. base, igat) and one row per supplement table."""
    models = [m for m, d in diagnostics.items() if d]
    if not models:
        return ""

    def cell(value: object, percent: bool = False) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}%" if percent else f"{value:.3f}"

    rows = [("p: members correct on global adversarial examples (Table 4)", "p", True),
            ("expected largest wrong-class score (Table 6)", "largest_wrong_score", False),
            ("h_y >= (1 - h_yhat) / (C - 1) when a member errs (Table 7)", "small_wrong_score_rate", True),
            ("best member's true-class score on ensemble errors (Table 8)", "best_member_score_on_errors", False),
            ("ensemble accuracy on them", "adversarial_accuracy", True)]
    lines = ["| quantity | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for title, key, percent in rows:
        lines.append(f"| {title} | " + " | ".join(cell(diagnostics[m].get(key), percent) for m in models) + " |")
    for k, label in enumerate(SCORE_BIN_LABELS):
        values = [diagnostics[m]["correct_score_histogram"]["percent"][k] for m in models]
        lines.append(f"| true-class score {label} when correct (Table 5) | "
                     + " | ".join(cell(v, True) for v in values) + " |")
    if all("curvature" in diagnostics[m] for m in models):
        lines.append("| member curvature lambda, median / max (eq. 2) | " + " | ".join(
            f"{cell(diagnostics[m]['curvature']['members']['median'])} / "
            f"{cell(diagnostics[m]['curvature']['members']['max'])}" for m in models) + " |")
    return "\n".join(lines)
