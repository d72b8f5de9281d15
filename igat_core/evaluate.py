"""Robust accuracy of an ensemble under each combiner and attack, the per-example union, the eps sweep, and the
sanity checks that say whether the numbers can be trusted.

Every attack runs only on the examples the combiner classifies correctly. The max combiner masks gradients, so
under it every white-box attack is run twice, on the max ensemble and then, on the examples still standing, on
the smooth average surrogate; an example counts as broken when either attempt breaks it. The surrogate attempt
reuses the adversarial examples the average combiner's own evaluation found (the average combiner is evaluated
first) and attacks only the examples that evaluation did not attack. Black-box attacks query the deployed
combiner only. Each attack draws its randomness from a generator seeded by (seed, combiner, attack,
surrogate, eps), so an attack's number does not depend on which other attacks ran.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from igat_core.attacks import MIM, PGD, Attack, AutoAttack, Bandits, CWLinf, SignHunter, SimBA
from igat_core.ensemble import Ensemble

EPS_TOLERANCE = 1e-6
WHITE_BOX: tuple[str, ...] = ("pgd", "cw", "mim", "autoattack")
BLACK_BOX: tuple[str, ...] = ("signhunter", "simba", "bandits")
ATTACK_ORDER: tuple[str, ...] = ("natural", *WHITE_BOX, *BLACK_BOX)
BLACK_BOX_MARGIN = 0.5
PGD_CONVERGENCE_MARGIN = 2.0
STRONG_PGD = "pgd-strong"


@dataclass(frozen=True)
class EvalConfig:
    attacks: tuple[str, ...] = ("natural", "pgd")
    combiners: tuple[str, ...] = ("average", "max")
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 20
    batch_size: int = 500
    seed: int = 0
    cw_kappa: float = 50.0
    mim_decay: float = 1.0
    signhunter_queries: int = 500
    simba_queries: int = 10_000
    bandits_queries: int = 10_000
    autoattack_steps: int = 100
    square_queries: int = 5000
    eps_sweep: tuple[float, ...] = ()
    eps_sweep_attack: str = "autoattack"
    sanity_pgd_steps: int = 100
    sanity_pgd_restarts: int = 5
    sanity_examples: int = 500

    def __post_init__(self) -> None:
        unknown = [a for a in (*self.attacks, self.eps_sweep_attack) if a not in ATTACK_ORDER]
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; known: {', '.join(ATTACK_ORDER)}")
        if self.eps_sweep_attack == "natural":
            raise ValueError("the eps sweep needs an attack, not 'natural'")

    @classmethod
    def from_spec(cls, spec: Any, seed: int = 0) -> EvalConfig:
        """From an `EvalSpec` (igat_core.spec): every field of the same name, the sweep when `eps_sweep` is set."""
        values = {f.name: getattr(spec, f.name) for f in fields(cls) if hasattr(spec, f.name)}
        values["attacks"], values["combiners"] = tuple(spec.attacks), tuple(spec.combiners)
        values["eps_sweep"] = tuple(spec.eps_sweep_values) if getattr(spec, "eps_sweep", False) else ()
        return cls(**values, seed=seed)


@dataclass
class SanityCheck:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return {"passed": self.passed, "detail": self.detail}


@dataclass
class EnsembleEvaluation:
    """accuracy[combiner][attack] in percent; sweep[combiner] = accuracy at each eps of `sweep_eps`;
    cost[combiner][attack] = mean gradients or queries per attacked example."""

    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    sanity: list[SanityCheck] = field(default_factory=list)
    sweep_eps: tuple[float, ...] = ()
    sweep: dict[str, list[float]] = field(default_factory=dict)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class _Extremes:
    excess: float = float("-inf")
    low: float = 0.0
    high: float = 1.0

    def update(self, adv: torch.Tensor, images: torch.Tensor, eps: float) -> None:
        if len(adv):
            self.excess = max(self.excess, float((adv - images).abs().max()) - eps)
            self.low, self.high = min(self.low, float(adv.min())), max(self.high, float(adv.max()))


def _generator(config: EvalConfig, combiner: str, attack: str, surrogate: str, eps: float) -> torch.Generator:
    tag = zlib.crc32(f"{combiner}/{attack}/{surrogate}/{eps:.10f}".encode())
    return torch.Generator().manual_seed(config.seed * 1_000_003 + tag)


def make_attack(name: str, model: torch.nn.Module, config: EvalConfig, generator: torch.Generator, *,
                eps: float | None = None, state_dir: str | os.PathLike | None = None) -> Attack:
    eps = config.eps if eps is None else eps
    if name == "pgd":
        return PGD(model, eps, config.step, config.steps, random_start=True, generator=generator)
    if name == STRONG_PGD:
        return PGD(model, eps, config.step, config.sanity_pgd_steps, random_start=True,
                   restarts=config.sanity_pgd_restarts, generator=generator)
    if name == "cw":
        return CWLinf(model, eps, config.step, config.steps, kappa=config.cw_kappa, generator=generator)
    if name == "mim":
        return MIM(model, eps, config.step, config.steps, decay=config.mim_decay)
    if name == "autoattack":
        return AutoAttack(model, eps, steps=config.autoattack_steps, square_queries=config.square_queries,
                          seed=config.seed, state_dir=state_dir)
    if name == "signhunter":
        return SignHunter(model, eps, queries=config.signhunter_queries)
    if name == "simba":
        return SimBA(model, eps, queries=config.simba_queries, generator=generator)
    if name == "bandits":
        return Bandits(model, eps, queries=config.bandits_queries, generator=generator)
    raise ValueError(f"unknown attack {name!r}")


@torch.no_grad()
def correct_mask(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(images).argmax(dim=1) == labels


def surrogates_for(combiner: str, attack: str) -> list[str]:
    """The combiners an attack is run against for a `combiner` ensemble: the average surrogate joins white-box
    attacks on every combiner but the average."""
    white = attack in WHITE_BOX or attack == STRONG_PGD
    return [combiner] if combiner == "average" or not white else [combiner, "average"]


def natural_mask(ensemble: Ensemble, combiner: str, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, device: str | torch.device) -> torch.Tensor:
    target = ensemble.with_combiner(combiner)
    return torch.cat([correct_mask(target, images[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
                                   ).cpu() for s in range(0, len(labels), batch_size)])


class SurrogateMemo:
    """Adversarial examples found against the average ensemble, per (attack, eps) and example, so that the
    average-surrogate attempt of another combiner reuses them instead of attacking the same examples again."""

    SURROGATE = "average"

    def __init__(self, n: int):
        self.n = n
        self.found: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, attack: str, eps: float, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which of the examples `index` have a stored adversarial example, and those examples."""
        entry = self.found.get((attack, eps))
        if entry is None:
            return torch.zeros(len(index), dtype=torch.bool), None
        have = entry[0][index]
        return have, entry[1][index[have]]

    def store(self, attack: str, eps: float, index: torch.Tensor, adv: torch.Tensor) -> None:
        if (attack, eps) not in self.found:
            self.found[(attack, eps)] = (torch.zeros(self.n, dtype=torch.bool),
                                         torch.zeros(self.n, *adv.shape[1:], dtype=adv.dtype))
        have, stored = self.found[(attack, eps)]
        have[index] = True
        stored[index] = adv.detach().cpu()


def robust_mask(ensemble: Ensemble, combiner: str, attack: str, images: torch.Tensor, labels: torch.Tensor,
                natural: torch.Tensor, config: EvalConfig, *, eps: float | None = None,
                device: str | torch.device = "cpu", state_dir: str | os.PathLike | None = None,
                extremes: _Extremes | None = None, memo: SurrogateMemo | None = None, progress: bool = False,
                desc: str = "") -> tuple[torch.Tensor, float]:
    """Which examples keep their correct label under `attack` against the `combiner` ensemble, and the mean cost
    (gradients or queries) per attacked example. `natural` is the combiner's natural correctness. With `memo`,
    attacks on the average ensemble store their adversarial examples there and reuse those already stored."""
    eps = config.eps if eps is None else eps
    target = ensemble.with_combiner(combiner)
    attacks = {s: make_attack(attack, ensemble.with_combiner(s), config,
                              _generator(config, combiner, attack, s, eps), eps=eps, state_dir=state_dir)
               for s in surrogates_for(combiner, attack)}
    robust = natural.clone()
    spent, attacked = 0.0, int(natural.sum())
    starts = range(0, len(labels), config.batch_size)
    for start in tqdm(starts, desc=desc or attack, leave=False, disable=not progress):
        stop = start + config.batch_size
        x, y = images[start:stop].to(device), labels[start:stop].to(device)
        standing = robust[start:stop].clone()
        for surrogate, run in attacks.items():
            index = standing.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            remembered = memo is not None and surrogate == SurrogateMemo.SURROGATE and attack in WHITE_BOX
            adv = x[index].clone()
            have, found = memo.lookup(attack, eps, index + start) if remembered else (
                torch.zeros(len(index), dtype=torch.bool), None)
            if found is not None and bool(have.any()):
                adv[have.to(device)] = found.to(device, adv.dtype)
            need = (~have).to(device)
            if bool(need.any()):
                adv[need] = run(x[index[~have]], y[index[~have]])
                if run.cost is not None:
                    spent += float(run.cost.sum())
                if remembered:
                    memo.store(attack, eps, index[~have] + start, adv[need])
            if extremes is not None:
                extremes.update(adv, x[index], eps)
            standing[index] = correct_mask(target, adv, y[index]).cpu()
        robust[start:stop] = standing
    return robust, (spent / attacked if attacked else 0.0)


def _percent(mask: torch.Tensor) -> float:
    return 100.0 * float(mask.float().mean()) if len(mask) else 0.0


def evaluate_ensemble(ensemble: Ensemble, images: torch.Tensor, labels: torch.Tensor, config: EvalConfig, *,
                      device: str | torch.device = "cpu", progress: bool = True, desc: str = "evaluate",
                      state_dir: str | os.PathLike | None = None) -> EnsembleEvaluation:
    """Accuracy in percent per combiner and attack, `union` (correct under natural and every attack), the eps
    sweep when configured, and the sanity checks. `state_dir` lets an interrupted AutoAttack resume."""
    from igat_core.data import equidistant_indices

    ensemble = ensemble.to(device).eval()
    result = EnsembleEvaluation(sweep_eps=tuple(config.eps_sweep))
    extremes = _Extremes()
    strong: dict[str, tuple[float, float, int]] = {}
    state_dir = Path(state_dir) if state_dir is not None else None
    attacks = [a for a in ATTACK_ORDER if a in config.attacks and a != "natural"]
    memo = SurrogateMemo(len(labels)) if len(config.combiners) > 1 else None
    for combiner in sorted(config.combiners, key=lambda c: c != SurrogateMemo.SURROGATE):
        natural = natural_mask(ensemble, combiner, images, labels, config.batch_size, device)
        masks = {"natural": natural} if "natural" in config.attacks else {}
        costs: dict[str, float] = {}
        for attack in attacks:
            masks[attack], costs[attack] = robust_mask(
                ensemble, combiner, attack, images, labels, natural, config, device=device, state_dir=state_dir,
                extremes=extremes, memo=memo, progress=progress, desc=f"{desc} [{combiner}] {attack}")
        union = torch.stack([natural, *masks.values()]).all(dim=0)
        result.accuracy[combiner] = {**{a: _percent(m) for a, m in masks.items()}, "union": _percent(union)}
        result.cost[combiner] = costs
        if config.eps_sweep:
            result.sweep[combiner] = [
                _percent(robust_mask(ensemble, combiner, config.eps_sweep_attack, images, labels, natural, config,
                                     eps=eps, device=device, state_dir=state_dir, extremes=extremes, memo=memo,
                                     progress=progress,
                                     desc=f"{desc} [{combiner}] {config.eps_sweep_attack} eps {eps * 255:.1f}/255")[0])
                for eps in config.eps_sweep]
        if "pgd" in masks and config.sanity_examples > 0:
            subset = equidistant_indices(len(labels), config.sanity_examples)
            strong_mask, _ = robust_mask(ensemble, combiner, STRONG_PGD, images[subset], labels[subset],
                                         natural[subset], config, device=device, extremes=extremes,
                                         progress=progress, desc=f"{desc} [{combiner}] sanity PGD-"
                                                                 f"{config.sanity_pgd_steps}")
            strong[combiner] = (_percent(masks["pgd"][subset]), _percent(strong_mask), len(subset))
    result.sanity = sanity_checks(result, extremes, config, strong)
    return result


def sanity_checks(evaluation: EnsembleEvaluation, extremes: _Extremes, config: EvalConfig,
                  strong: dict[str, tuple[float, float, int]]) -> list[SanityCheck]:
    """The checks of attacks.md section 6 that this evaluation can answer; a failed check hides no number."""
    checks = []
    if extremes.excess > float("-inf"):
        checks.append(SanityCheck("perturbation_within_eps", extremes.excess <= EPS_TOLERANCE,
                                  f"largest L-inf perturbation exceeds its eps by {extremes.excess:+.2e} "
                                  f"(tolerance {EPS_TOLERANCE:.0e})"))
        checks.append(SanityCheck("pixels_within_range", extremes.low >= 0.0 and extremes.high <= 1.0,
                                  f"adversarial pixels span [{extremes.low:.4f}, {extremes.high:.4f}]"))
    for combiner, acc in evaluation.accuracy.items():
        if "natural" in acc:
            bad = [a for a, v in acc.items() if a not in ("natural", "union") and v > acc["natural"] + 1e-9]
            checks.append(SanityCheck(f"attacks_below_natural_{combiner}", not bad,
                                      "every attack at or below natural accuracy" if not bad
                                      else f"above natural accuracy: {', '.join(bad)}"))
        white = {a: v for a, v in acc.items() if a in WHITE_BOX}
        black = {a: v for a, v in acc.items() if a in BLACK_BOX}
        if white and black:
            strongest = min(white, key=white.__getitem__)
            beating = [f"{a} {v:.2f}" for a, v in black.items() if v < white[strongest] - BLACK_BOX_MARGIN]
            checks.append(SanityCheck(
                f"black_box_not_stronger_{combiner}", not beating,
                f"strongest white-box {strongest} {white[strongest]:.2f}; "
                + (f"black-box below it by more than {BLACK_BOX_MARGIN} points: {', '.join(beating)}" if beating
                   else f"no black-box attack more than {BLACK_BOX_MARGIN} points below it")))
        if combiner in strong:
            pgd20, pgd_strong, n = strong[combiner]
            checks.append(SanityCheck(
                f"pgd_converged_{combiner}", abs(pgd20 - pgd_strong) <= PGD_CONVERGENCE_MARGIN,
                f"on {n} examples PGD-{config.steps} {pgd20:.2f} vs PGD-{config.sanity_pgd_steps} with "
                f"{config.sanity_pgd_restarts} restarts {pgd_strong:.2f} (allowed gap {PGD_CONVERGENCE_MARGIN})"))
    for combiner, values in evaluation.sweep.items():
        pairs = sorted(zip(evaluation.sweep_eps, values))
        rises = [f"{a * 255:.1f}->{b * 255:.1f}/255: {u:.2f}->{v:.2f}"
                 for (a, u), (b, v) in zip(pairs, pairs[1:]) if v > u + 1e-9]
        checks.append(SanityCheck(f"monotone_in_eps_{combiner}", not rises,
                                  f"{config.eps_sweep_attack} accuracy non-increasing over eps" if not rises
                                  else f"{config.eps_sweep_attack} accuracy rises with eps: {'; '.join(rises)}"))
    return checks


def relative_improvement(base: dict[str, dict[str, float]], enhanced: dict[str, dict[str, float]]
                         ) -> dict[str, dict[str, float | None]]:
    """Table 2: (iGAT - original) / original x 100 per combiner and attack (None where the original is 0)."""
    return {
        combiner: {a: (None if base[combiner][a] == 0 else 100.0 * (enhanced[combiner][a] - base[combiner][a])
                       / base[combiner][a]) for a in base[combiner] if a in enhanced.get(combiner, {})}
        for combiner in base if combiner in enhanced
    }


def point_differences(reference: dict[str, dict[str, float]], enhanced: dict[str, dict[str, float]]
                      ) -> dict[str, dict[str, float]]:
    """enhanced - reference in accuracy points per combiner and attack (iGAT over a control or the base)."""
    return {combiner: {a: enhanced[combiner][a] - reference[combiner][a] for a in reference[combiner]
                       if a in enhanced.get(combiner, {})}
            for combiner in reference if combiner in enhanced}


def evaluation_record(evaluations: dict[str, EnsembleEvaluation], config: EvalConfig, n_examples: int) -> dict:
    """The JSON form of the evaluations of several models: accuracy[model][combiner][attack], sanity checks
    named `model.check`, mean cost per attacked example, and the eps sweep when it ran."""
    record: dict[str, Any] = {
        "accuracy": {m: e.accuracy for m, e in evaluations.items()},
        "sanity": {f"{m}.{c.name}": c.to_dict() for m, e in evaluations.items() for c in e.sanity},
        "n_examples": n_examples,
        "cost": {m: e.cost for m, e in evaluations.items()},
    }
    if config.eps_sweep:
        record["eps_sweep"] = {"attack": config.eps_sweep_attack, "eps": list(config.eps_sweep),
                               "accuracy": {m: e.sweep for m, e in evaluations.items()}}
    return record
