"""Robust accuracy of an ensemble under each combiner and attack, the per-example union, and sanity checks.

The max combiner masks gradients, so under it every white-box attack is also run on the smooth average
surrogate and an example counts as broken when either attempt breaks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from igat_core.attacks import PGD, Attack
from igat_core.ensemble import Ensemble

EPS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class EvalConfig:
    attacks: tuple[str, ...] = ("natural", "pgd")
    combiners: tuple[str, ...] = ("average", "max")
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 20
    batch_size: int = 500
    seed: int = 0


@dataclass
class SanityCheck:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return {"passed": self.passed, "detail": self.detail}


@dataclass
class EnsembleEvaluation:
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    sanity: list[SanityCheck] = field(default_factory=list)


def make_attack(name: str, model: torch.nn.Module, config: EvalConfig, generator: torch.Generator) -> Attack:
    if name == "pgd":
        return PGD(model, config.eps, config.step, config.steps, random_start=True, generator=generator)
    raise ValueError(f"unknown attack {name!r}")


@torch.no_grad()
def correct_mask(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(images).argmax(dim=1) == labels


def robust_mask(ensemble: Ensemble, combiner: str, attack: str, images: torch.Tensor, labels: torch.Tensor,
                config: EvalConfig, generator: torch.Generator, sanity: dict[str, float]) -> torch.Tensor:
    """Which examples keep their correct label under `attack` against the `combiner` ensemble."""
    target = ensemble.with_combiner(combiner)
    if attack == "natural":
        return correct_mask(target, images, labels)
    surrogates = [combiner] if combiner == "average" else [combiner, "average"]
    robust = torch.ones_like(labels, dtype=torch.bool)
    for surrogate in surrogates:
        adv = make_attack(attack, ensemble.with_combiner(surrogate), config, generator)(images, labels)
        sanity["max_perturbation"] = max(sanity.get("max_perturbation", 0.0), float((adv - images).abs().max()))
        sanity["min_pixel"] = min(sanity.get("min_pixel", 0.0), float(adv.min()))
        sanity["max_pixel"] = max(sanity.get("max_pixel", 1.0), float(adv.max()))
        robust &= correct_mask(target, adv, labels)
    return robust


def evaluate_ensemble(ensemble: Ensemble, images: torch.Tensor, labels: torch.Tensor, config: EvalConfig, *,
                      device: str | torch.device = "cpu", progress: bool = True, desc: str = "evaluate"
                      ) -> EnsembleEvaluation:
    """Accuracy in percent per combiner and attack, plus `union` (correct under natural and every attack)."""
    ensemble = ensemble.to(device).eval()
    generator = torch.Generator().manual_seed(config.seed)
    result = EnsembleEvaluation()
    extremes: dict[str, float] = {}
    n = len(labels)
    for combiner in config.combiners:
        masks = {a: torch.zeros(n, dtype=torch.bool) for a in config.attacks}
        starts = range(0, n, config.batch_size)
        for start in tqdm(starts, desc=f"{desc} [{combiner}]", leave=False, disable=not progress):
            x = images[start:start + config.batch_size].to(device)
            y = labels[start:start + config.batch_size].to(device)
            for attack in config.attacks:
                masks[attack][start:start + len(y)] = robust_mask(ensemble, combiner, attack, x, y, config,
                                                                  generator, extremes).cpu()
        union = torch.stack(list(masks.values())).all(dim=0)
        if "natural" not in masks:
            union &= correct_mask(ensemble.with_combiner(combiner), images.to(device), labels.to(device)).cpu()
        accuracy = {a: 100.0 * float(m.float().mean()) for a, m in masks.items()}
        accuracy["union"] = 100.0 * float(union.float().mean())
        result.accuracy[combiner] = accuracy
    result.sanity = sanity_checks(result.accuracy, extremes, config.eps)
    return result


def sanity_checks(accuracy: dict[str, dict[str, float]], extremes: dict[str, float], eps: float) -> list[SanityCheck]:
    checks = []
    if "max_perturbation" in extremes:
        worst = extremes["max_perturbation"]
        checks.append(SanityCheck("perturbation_within_eps", worst <= eps + EPS_TOLERANCE,
                                  f"largest L-inf perturbation {worst:.6f} vs eps {eps:.6f}"))
        lo, hi = extremes["min_pixel"], extremes["max_pixel"]
        checks.append(SanityCheck("pixels_within_range", lo >= 0.0 and hi <= 1.0,
                                  f"adversarial pixels span [{lo:.4f}, {hi:.4f}]"))
    for combiner, acc in accuracy.items():
        if "natural" in acc:
            attacked = {a: v for a, v in acc.items() if a not in ("natural", "union")}
            bad = [a for a, v in attacked.items() if v > acc["natural"] + 1e-9]
            checks.append(SanityCheck(f"attacks_below_natural_{combiner}", not bad,
                                      "every attack at or below natural accuracy" if not bad
                                      else f"above natural accuracy: {', '.join(bad)}"))
    return checks


def relative_improvement(base: dict[str, dict[str, float]], enhanced: dict[str, dict[str, float]]
                         ) -> dict[str, dict[str, float | None]]:
    """Table 2: (iGAT - original) / original x 100 per combiner and attack (None where the original is 0)."""
    return {
        combiner: {a: (None if base[combiner][a] == 0 else 100.0 * (enhanced[combiner][a] - base[combiner][a])
                       / base[combiner][a]) for a in base[combiner] if a in enhanced.get(combiner, {})}
        for combiner in base if combiner in enhanced
    }
