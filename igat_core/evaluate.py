"""Robust accuracy of an ensemble under each combiner and attack, the per-example union, the eps sweep, and the
sanity checks that say whether the numbers can be trusted.

Every attack runs only on the examples the combiner classifies correctly. The max combiner masks gradients, so
under it every white-box attack is run twice, on the max ensemble and then, on the examples still standing, on the
smooth average surrogate; an example counts as broken when either attempt breaks it. The surrogate attempt reuses
the adversarial examples the average combiner's own evaluation found (the average combiner is evaluated first) and
attacks only the examples that evaluation did not attack. Black-box attacks query the deployed combiner only. The
ensemble-aware attacks (`Attack.ensemble_aware`) are those the paper's evaluation lacks: MORA and the
member-logit surrogates read the members themselves and are white-box attacks like the others; the transfer attack
scores examples made on an independent source ensemble (`WithTransferSource`) and runs on the deployed combiner
only. Each attack draws its randomness from a generator seeded by (seed, combiner,
attack, surrogate, eps), so an attack's number does not depend on which other attacks ran. Attacks are built by
name by an `AttackFactory` (`make_attack` unless `evaluate_ensemble` is given another).

The sanity checks (attacks.md section 6), each of which a faulty attack or model makes fail:
- `perturbation_within_eps`, `pixels_within_range`: the raw output of every attack's own `forward`, before the
  base class's safety projection (`Attack.raw_bounds`), lies within eps of its image (1e-6 allowed for float
  round-off) and in [0,1].
- `rescoring_agrees_<combiner>`: a fresh forward pass, in eval mode, in reversed order and batches of half the
  size, over every example a verdict was taken on (each attack's adversarial examples right after the attack; the
  clean images after the combiner's last attack) agrees with the verdicts the evaluation counted. Contradictions
  within 0.05 of the decision boundary (top-2 log-probability margin) are round-off between batch compositions
  (TF32 convolutions on GPUs included) and not counted. It catches an attack that leaves the model in train mode
  or changes it (BN statistics), batch-dependent or stochastic outputs, and bookkeeping faults.
- `white_box_not_weaker_than_noise_<combiner>`: no white-box attack leaves more than 1 point more accuracy than
  uniform noise in the same eps-ball (10 draws per example; an example counts as broken when any draw breaks it)
  on the same examples. A sign-flipped, zero or detached gradient is no better than noise, and noise beating
  a gradient attack is the classic sign of gradient masking; the 1 point lets a correct attack miss an example
  or two that a lucky draw breaks.
- `black_box_not_stronger_<combiner>`: no black-box attack more than 0.5 points below the strongest white-box one.
- `pgd_converged_<combiner>`: PGD-`steps` within 2 points of PGD-`sanity_pgd_steps` with restarts, on
  `sanity_examples` equidistant examples.
- `ensemble_aware_not_stronger_<combiner>`: no ensemble-aware attack (MORA, the member-logit surrogates, transfer)
  more than 2 points below AutoAttack; when one is, the robustness under the paper's attacks is overstated.
- `monotone_in_eps_<combiner>`: the sweep's accuracy non-increasing in eps.
- `learned_<combiner>`: natural accuracy at least twice chance c = 1 / classes (halfway from c to 100 % when
  that is less) and above c by more than 3.09 binomial standard deviations over the evaluated examples (one-sided
  p < 0.001): an untrained or collapsed ensemble passes every attack check (it leaves nothing to attack), and
  this is the check it fails.
Accuracy under an attack is not compared with natural accuracy: attacks run only on naturally correct examples,
so it cannot exceed it.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Protocol, get_args

import torch
from tqdm.auto import tqdm

from igat_core.attacks import (ATTACKS, EPS_TOLERANCE, PGD, Attack, OutputBounds, Transfer, TransferSource, margin_loss,
                               project_linf)
from igat_core.attacks.base import Standing, StepCallback
from igat_core.ensemble import Ensemble
from igat_core.progress import AttackProgress, EvalProgress
from igat_core.spec import AttackName

ATTACK_ORDER: tuple[str, ...] = get_args(AttackName)
WHITE_BOX: tuple[str, ...] = tuple(a for a in ATTACK_ORDER if a in ATTACKS and ATTACKS[a].white_box)
BLACK_BOX: tuple[str, ...] = tuple(a for a in ATTACK_ORDER if a in ATTACKS and not ATTACKS[a].white_box
                                   and not ATTACKS[a].ensemble_aware)
ENSEMBLE_AWARE: tuple[str, ...] = tuple(a for a in ATTACK_ORDER if a in ATTACKS and ATTACKS[a].ensemble_aware)
PAPER_ATTACKS = ("pgd", "autoattack")
UNIONS = ("union", "union_standard")
OVERSTATED_MARGIN = 2.0
BLACK_BOX_MARGIN = 0.5
PGD_CONVERGENCE_MARGIN = 2.0
NOISE_MARGIN = 1.0
PERCENT_ROUNDOFF = 1e-4  # float32 accuracies in % are off by ~1e-6; a margin reached exactly is within it
NOISE_DRAWS = 10
LEARNED_Z = 3.09  # one-sided normal quantile at p = 0.001
RESCORE_TOLERANCE = 0.05
STRONG_PGD = "pgd-strong"
NOISE = "uniform-noise"


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
    mora_steps: int = 100
    mora_restarts: int = 5
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
class SanityEvidence:
    """What the sanity checks read besides the accuracies: the bounds of every attack's raw output; per combiner,
    (PGD-`steps` accuracy, strong PGD accuracy, examples) and accuracy under uniform noise; per combiner and attack
    run, the re-scoring's (contradicted verdicts, verdicts re-scored); the classes and examples evaluated."""

    bounds: OutputBounds = field(default_factory=OutputBounds)
    strong_pgd: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)
    rescoring: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    classes: int = 0
    examples: int = 0


@dataclass
class AttackOutcome:
    """`robust`: which examples keep their label; `cost`: mean gradients or queries per attacked example;
    `adversarial`: the example each verdict was taken on (the clean image where no attack ran)."""

    robust: torch.Tensor
    cost: float
    adversarial: torch.Tensor


class AttackFactory(Protocol):
    """Builds the attack `name` against `model` at `eps` (config.eps when None) with the settings of `config`."""

    def __call__(self, name: str, model: torch.nn.Module, config: EvalConfig, generator: torch.Generator, *,
                 eps: float | None = None, state_dir: str | os.PathLike | None = None) -> Attack: ...


def _generator(config: EvalConfig, combiner: str, attack: str, surrogate: str, eps: float) -> torch.Generator:
    tag = zlib.crc32(f"{combiner}/{attack}/{surrogate}/{eps:.10f}".encode())
    return torch.Generator().manual_seed(config.seed * 1_000_003 + tag)


def make_attack(name: str, model: torch.nn.Module, config: EvalConfig, generator: torch.Generator, *,
                eps: float | None = None, state_dir: str | os.PathLike | None = None) -> Attack:
    """The default `AttackFactory`: every attack of ATTACK_ORDER (from `attacks.ATTACKS`) and the sanity check's
    strong PGD."""
    eps = config.eps if eps is None else eps
    if name == STRONG_PGD:
        return PGD(model, eps, config.step, config.sanity_pgd_steps, random_start=True,
                   restarts=config.sanity_pgd_restarts, generator=generator)
    if name not in ATTACK_ORDER or name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}")
    return ATTACKS[name].from_settings(model, eps, config, generator, state_dir=state_dir)


@dataclass(frozen=True)
class WithTransferSource:
    """The `AttackFactory` of an evaluation with a transfer source: the transfer attack scores the examples made on
    `source`, every other attack is `make_attack`'s."""

    source: TransferSource

    def __call__(self, name: str, model: torch.nn.Module, config: EvalConfig, generator: torch.Generator, *,
                 eps: float | None = None, state_dir: str | os.PathLike | None = None) -> Attack:
        if name == Transfer.name:
            return Transfer(model, config.eps if eps is None else eps, self.source)
        return make_attack(name, model, config, generator, eps=eps, state_dir=state_dir)


def attack_factory_for(source: Ensemble | None, config: EvalConfig) -> AttackFactory:
    """`make_attack`, or with a transfer `source` ensemble (attacked under the average combiner) the factory whose
    transfer attack uses it with the evaluation's PGD budget."""
    if source is None:
        return make_attack
    model = source.with_combiner("average").eval()
    return WithTransferSource(TransferSource(model, config.step, config.steps, config.mim_decay))


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


@torch.no_grad()
def noise_mask(ensemble: Ensemble, combiner: str, images: torch.Tensor, labels: torch.Tensor,
               natural: torch.Tensor, config: EvalConfig, device: str | torch.device) -> torch.Tensor:
    """Which naturally correct examples keep their label under NOISE_DRAWS draws of uniform noise in the
    eps-ball, clipped to [0,1]; an example counts as broken when any draw breaks it."""
    target = ensemble.with_combiner(combiner)
    generator = _generator(config, combiner, NOISE, combiner, config.eps)
    robust = natural.clone()
    for start in range(0, len(labels), config.batch_size):
        x, y = images[start:start + config.batch_size], labels[start:start + config.batch_size].to(device)
        for _ in range(NOISE_DRAWS):
            noise = (2 * torch.rand(x.shape, generator=generator) - 1) * config.eps
            noisy = project_linf(x + noise, x, config.eps).to(device)
            robust[start:start + len(y)] &= correct_mask(target, noisy, y).cpu()
    return robust


@torch.no_grad()
def rescoring_disagreements(ensemble: Ensemble, combiner: str, examples: torch.Tensor, labels: torch.Tensor,
                            counted: torch.Tensor, scored: torch.Tensor, batch_size: int,
                            device: str | torch.device) -> int:
    """How many of the verdicts `counted` (True: correctly classified) on the `scored` examples a fresh forward
    pass contradicts: the `combiner` ensemble put in eval mode, the examples in reversed order, in batches of half
    the size. A contradiction within RESCORE_TOLERANCE of the decision boundary (the top-2 log-probability
    margin) is round-off between batch compositions and not counted."""
    target = ensemble.with_combiner(combiner).eval()
    contradicted = 0
    for chunk in scored.nonzero().squeeze(1).flip(0).split(max(1, batch_size // 2)):
        margin = margin_loss(target(examples[chunk].to(device)), labels[chunk].to(device)).cpu()
        wrong, right = margin > RESCORE_TOLERANCE, margin < -RESCORE_TOLERANCE
        contradicted += int((counted[chunk] & wrong).sum()) + int((~counted[chunk] & right).sum())
    return contradicted


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


def _attempt(run: Attack, attack: str, eps: float, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
             offset: int, memo: SurrogateMemo | None, bounds: OutputBounds | None,
             step: StepCallback | None = None) -> tuple[torch.Tensor, float]:
    """Adversarial examples for the examples `index` of the batch (x, y) that starts at `offset`: the memo's where
    it holds them, `run`'s elsewhere (stored in the memo, their raw bounds included in `bounds`; `run` reports its
    steps to `step`); and the cost."""
    adv = x[index].clone()
    have, found = (memo.lookup(attack, eps, index + offset) if memo is not None
                   else (torch.zeros(len(index), dtype=torch.bool), None))
    if found is not None and bool(have.any()):
        adv[have.to(adv.device)] = found.to(adv.device, adv.dtype)
    if bool(have.all()):
        return adv, 0.0
    need = ~have
    x_need, y_need = x[index[need]], y[index[need]]
    adv[need.to(adv.device)] = run(x_need, y_need) if step is None else run(x_need, y_need, step=step)
    if bounds is not None and run.raw_bounds is not None:
        bounds.include(run.raw_bounds)
    if memo is not None:
        memo.store(attack, eps, index[need] + offset, adv[need.to(adv.device)])
    return adv, float(run.cost.sum()) if run.cost is not None else 0.0


def attack_outcome(ensemble: Ensemble, combiner: str, attack: str, images: torch.Tensor, labels: torch.Tensor,
                   natural: torch.Tensor, config: EvalConfig, *, eps: float | None = None,
                   device: str | torch.device = "cpu", state_dir: str | os.PathLike | None = None,
                   bounds: OutputBounds | None = None, memo: SurrogateMemo | None = None, progress: bool = False,
                   desc: str = "", attack_factory: AttackFactory = make_attack,
                   events: AttackProgress | None = None) -> AttackOutcome:
    """Which examples keep their correct label under `attack` against the `combiner` ensemble, the mean cost
    (gradients or queries) per attacked example, and the examples the verdicts were taken on. `natural` is the
    combiner's natural correctness. With `memo`, attacks on the average ensemble store their adversarial examples
    there and reuse those already stored; `bounds` gathers the raw bounds of every attack call; `events` gets
    the progress (examples attacked, robust accuracy so far) while the attack runs and the accuracy at its end."""
    eps = config.eps if eps is None else eps
    target = ensemble.with_combiner(combiner)
    attacks = {s: attack_factory(attack, ensemble.with_combiner(s), config,
                                 _generator(config, combiner, attack, s, eps), eps=eps, state_dir=state_dir)
               for s in surrogates_for(combiner, attack)}
    outcome = AttackOutcome(natural.clone(), 0.0, images.clone())
    spent = 0.0
    for start in tqdm(range(0, len(labels), config.batch_size), desc=desc or attack, leave=False,
                      disable=not progress):
        x, y = images[start:start + config.batch_size].to(device), labels[start:start + config.batch_size].to(device)
        standing = outcome.robust[start:start + len(y)]
        for part, (surrogate, run) in enumerate(attacks.items()):
            index = standing.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            remembered = memo if surrogate == SurrogateMemo.SURROGATE and attack in WHITE_BOX else None
            step = _step_events(events, outcome.robust, start, len(y), index, part / len(attacks),
                                1 / len(attacks)) if events is not None else None
            adv, cost = _attempt(run, attack, eps, x, y, index, start, remembered, bounds, step)
            spent += cost
            outcome.adversarial[index + start] = adv.to(outcome.adversarial.device)
            standing[index] = correct_mask(target, adv, y[index]).cpu()
        if events is not None:
            events.update(start + len(y), partial(_percent, outcome.robust[:start + len(y)]))
    attacked = int(natural.sum())
    outcome.cost = spent / attacked if attacked else 0.0
    if events is not None:
        events.finish(_percent(outcome.robust))
    return outcome


def _step_events(events: AttackProgress, robust: torch.Tensor, start: int, size: int, index: torch.Tensor,
                 begun: float, share: float) -> StepCallback:
    """The step callback of an attempt on the examples `index` of the batch of `size` at `start`, a `share` of
    the batch's work of which `begun` was done before it. Examples attacked so far count the batch's finished
    share; the robust accuracy so far is over every example up to the batch's end, the attempt's examples counted
    as the attack's `standing` says (robust where it does not say, or where the memo answered for them)."""
    end = start + size
    elsewhere = int(robust[:end].sum()) - index.numel()

    def accuracy(standing: Standing | None) -> float:
        mask = standing() if standing is not None else torch.ones(0, dtype=torch.bool)
        return 100.0 * (elsewhere + index.numel() - len(mask) + int(mask.sum())) / end

    def step(fraction: float, standing: Standing | None) -> None:
        events.update(start + int((begun + share * fraction) * size), lambda: accuracy(standing))

    return step


def union_accuracies(natural: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """`union`: correct under natural and every attack (the worst case); when an ensemble-aware attack ran, also
    `union_standard`: the union without the ensemble-aware attacks."""
    found = {"union": _percent(torch.stack([natural, *masks.values()]).all(dim=0))}
    if any(a in ENSEMBLE_AWARE for a in masks):
        standard = [m for a, m in masks.items() if a not in ENSEMBLE_AWARE]
        found["union_standard"] = _percent(torch.stack([natural, *standard]).all(dim=0))
    return found


def _percent(mask: torch.Tensor) -> float:
    return 100.0 * float(mask.float().mean()) if len(mask) else 0.0


@dataclass
class _EnsembleRun:
    """One `evaluate_ensemble` call: its inputs, the surrogate memo, and the evidence its sanity checks read."""

    ensemble: Ensemble
    images: torch.Tensor
    labels: torch.Tensor
    config: EvalConfig
    device: str | torch.device
    progress: bool
    desc: str
    state_dir: Path | None
    attack_factory: AttackFactory
    memo: SurrogateMemo | None
    events: EvalProgress | None = None
    evidence: SanityEvidence = field(default_factory=SanityEvidence)

    def attack(self, combiner: str, attack: str, natural: torch.Tensor, *, eps: float | None = None,
               subset: torch.Tensor | None = None) -> AttackOutcome:
        """`attack` on every example (or on `subset`, without memo or state), its verdicts re-scored at once."""
        images, labels = self.images, self.labels
        if subset is not None:
            images, labels, natural = images[subset], labels[subset], natural[subset]
        label = attack if eps is None else f"{attack} eps {eps * 255:.1f}/255"
        outcome = attack_outcome(
            self.ensemble, combiner, attack, images, labels, natural, self.config, eps=eps, device=self.device,
            state_dir=self.state_dir if subset is None else None, bounds=self.evidence.bounds,
            memo=self.memo if subset is None else None, progress=self.progress,
            desc=f"{self.desc} [{combiner}] {label}", attack_factory=self.attack_factory,
            events=self.events.attack(combiner, label, len(labels)) if self.events is not None else None)
        self.rescore(combiner, label, outcome.adversarial, labels, outcome.robust, natural)
        return outcome

    def rescore(self, combiner: str, label: str, examples: torch.Tensor, labels: torch.Tensor,
                counted: torch.Tensor, scored: torch.Tensor) -> None:
        contradicted = rescoring_disagreements(self.ensemble, combiner, examples, labels, counted, scored,
                                               self.config.batch_size, self.device)
        self.evidence.rescoring.setdefault(combiner, {})[label] = (contradicted, int(scored.sum()))

    def strong_pgd(self, combiner: str, natural: torch.Tensor, pgd: torch.Tensor) -> tuple[float, float, int]:
        from igat_core.data import equidistant_indices

        subset = equidistant_indices(len(self.labels), self.config.sanity_examples)
        strong = self.attack(combiner, STRONG_PGD, natural, subset=subset).robust
        return _percent(pgd[subset]), _percent(strong), len(subset)

    def combiner(self, combiner: str, result: EnsembleEvaluation) -> None:
        """Every configured attack, the union, the eps sweep and the sanity evidence of one combiner."""
        config = self.config
        natural = natural_mask(self.ensemble, combiner, self.images, self.labels, config.batch_size, self.device)
        if self.events is not None and "natural" in config.attacks:
            self.events.attack(combiner, "natural", len(self.labels)).finish(_percent(natural))
        outcomes = {a: self.attack(combiner, a, natural) for a in ATTACK_ORDER
                    if a in config.attacks and a != "natural"}
        masks = {"natural": natural} if "natural" in config.attacks else {}
        masks.update({a: o.robust for a, o in outcomes.items()})
        result.accuracy[combiner] = {**{a: _percent(m) for a, m in masks.items()}, **union_accuracies(natural, masks)}
        result.cost[combiner] = {a: o.cost for a, o in outcomes.items()}
        if config.eps_sweep:
            result.sweep[combiner] = [_percent(self.attack(combiner, config.eps_sweep_attack, natural, eps=eps).robust)
                                      for eps in config.eps_sweep]
        if "pgd" in masks and config.sanity_examples > 0:
            self.evidence.strong_pgd[combiner] = self.strong_pgd(combiner, natural, masks["pgd"])
        if any(a in WHITE_BOX for a in masks):
            self.evidence.noise[combiner] = _percent(noise_mask(self.ensemble, combiner, self.images, self.labels,
                                                                natural, config, self.device))
        self.rescore(combiner, "natural", self.images, self.labels, natural, torch.ones_like(natural))


def evaluate_ensemble(ensemble: Ensemble, images: torch.Tensor, labels: torch.Tensor, config: EvalConfig, *,
                      device: str | torch.device = "cpu", progress: bool = True, desc: str = "evaluate",
                      state_dir: str | os.PathLike | None = None, attack_factory: AttackFactory = make_attack,
                      events: EvalProgress | None = None) -> EnsembleEvaluation:
    """Accuracy in percent per combiner and attack, `union` (correct under natural and every attack), the eps
    sweep when configured, and the sanity checks. `state_dir` lets an interrupted AutoAttack resume;
    `attack_factory` builds every attack by name; `events` gets the progress of every attack run (the sanity
    check's strong PGD and the sweep's included) and the natural accuracy."""
    run = _EnsembleRun(ensemble.to(device).eval(), images, labels, config, device, progress, desc,
                       Path(state_dir) if state_dir is not None else None, attack_factory,
                       SurrogateMemo(len(labels)) if len(config.combiners) > 1 else None, events)
    run.evidence.classes, run.evidence.examples = ensemble.config.num_classes, len(labels)
    result = EnsembleEvaluation(sweep_eps=tuple(config.eps_sweep))
    for combiner in sorted(config.combiners, key=lambda c: c != SurrogateMemo.SURROGATE):
        run.combiner(combiner, result)
    result.sanity = sanity_checks(result, run.evidence, config)
    return result


def sanity_checks(evaluation: EnsembleEvaluation, evidence: SanityEvidence, config: EvalConfig) -> list[SanityCheck]:
    """The checks of attacks.md section 6 that this evaluation can answer (the module docstring says what each one
    catches); a failed check hides no number."""
    checks = [] if evidence.bounds.empty else _bounds_checks(evidence.bounds)
    for combiner, acc in evaluation.accuracy.items():
        found = [_learned_check(combiner, acc, evidence),
                 _rescoring_check(combiner, evidence.rescoring.get(combiner, {})),
                 _noise_check(combiner, acc, evidence.noise.get(combiner)), _black_box_check(combiner, acc),
                 _pgd_check(combiner, evidence.strong_pgd.get(combiner), config),
                 _ensemble_aware_check(combiner, acc)]
        checks += [c for c in found if c is not None]
    checks += [_monotone_check(c, v, evaluation.sweep_eps, config) for c, v in evaluation.sweep.items()]
    return checks


def _bounds_checks(bounds: OutputBounds) -> list[SanityCheck]:
    return [SanityCheck("perturbation_within_eps", bounds.within_eps,
                        f"largest L-inf distance of an attack's raw output (before the safety projection) from its "
                        f"image exceeds eps by {bounds.excess:+.2e} (tolerance {EPS_TOLERANCE:.0e})"),
            SanityCheck("pixels_within_range", bounds.within_range,
                        f"the attacks' raw output pixels span [{bounds.low:.4f}, {bounds.high:.4f}]")]


def learned_threshold(classes: int, examples: int) -> float:
    """The natural accuracy (%) `learned_<combiner>` asks for: max(min(2c, (1 + c) / 2), c + 3.09 sd), chance
    c = 1 / classes and sd the binomial standard deviation of chance accuracy over the examples."""
    chance = 1.0 / classes
    floor = min(2.0 * chance, (1.0 + chance) / 2.0)
    return 100.0 * max(floor, chance + LEARNED_Z * math.sqrt(chance * (1.0 - chance) / examples))


def _learned_check(combiner: str, acc: dict[str, float], evidence: SanityEvidence) -> SanityCheck | None:
    if "natural" not in acc or evidence.classes < 2 or evidence.examples < 1:
        return None
    threshold = learned_threshold(evidence.classes, evidence.examples)
    return SanityCheck(
        f"learned_{combiner}", acc["natural"] >= threshold,
        f"natural accuracy {acc['natural']:.2f} on {evidence.examples} examples against {threshold:.2f} needed "
        f"(chance {100.0 / evidence.classes:.2f} with {evidence.classes} classes)")


def _rescoring_check(combiner: str, rescoring: dict[str, tuple[int, int]]) -> SanityCheck | None:
    if not rescoring:
        return None
    contradicted = [f"{label} {found} of {n}" for label, (found, n) in rescoring.items() if found]
    verdicts = sum(n for _, n in rescoring.values())
    return SanityCheck(
        f"rescoring_agrees_{combiner}", not contradicted,
        "a fresh eval-mode pass in another batch composition "
        + (f"contradicts the counted verdicts of {', '.join(contradicted)}" if contradicted
           else f"confirms all {verdicts} counted verdicts of its {len(rescoring)} attack runs and natural pass")
        + f" (contradictions within {RESCORE_TOLERANCE} of the decision boundary not counted)")


def _noise_check(combiner: str, acc: dict[str, float], noise: float | None) -> SanityCheck | None:
    white = {a: v for a, v in acc.items() if a in WHITE_BOX}
    if noise is None or not white:
        return None
    weaker = [f"{a} {v:.2f}" for a, v in white.items() if v > noise + NOISE_MARGIN + PERCENT_ROUNDOFF]
    weakest = max(white, key=white.__getitem__)
    return SanityCheck(
        f"white_box_not_weaker_than_noise_{combiner}", not weaker,
        f"uniform noise in the eps-ball ({NOISE_DRAWS} draws per example) leaves {noise:.2f}; "
        + (f"white-box attacks more than {NOISE_MARGIN} points above it: {', '.join(weaker)}" if weaker
           else f"no white-box attack more than {NOISE_MARGIN} points above it (weakest {weakest} "
                f"{white[weakest]:.2f})"))


def _black_box_check(combiner: str, acc: dict[str, float]) -> SanityCheck | None:
    white = {a: v for a, v in acc.items() if a in WHITE_BOX}
    black = {a: v for a, v in acc.items() if a in BLACK_BOX}
    if not white or not black:
        return None
    strongest = min(white, key=white.__getitem__)
    beating = [f"{a} {v:.2f}" for a, v in black.items() if v < white[strongest] - BLACK_BOX_MARGIN - PERCENT_ROUNDOFF]
    return SanityCheck(
        f"black_box_not_stronger_{combiner}", not beating,
        f"strongest white-box {strongest} {white[strongest]:.2f}; "
        + (f"black-box below it by more than {BLACK_BOX_MARGIN} points: {', '.join(beating)}" if beating
           else f"no black-box attack more than {BLACK_BOX_MARGIN} points below it"))


def _ensemble_aware_check(combiner: str, acc: dict[str, float]) -> SanityCheck | None:
    aware = {a: v for a, v in acc.items() if a in ENSEMBLE_AWARE}
    if "autoattack" not in acc or not aware:
        return None
    strongest = min(aware, key=aware.__getitem__)
    gap = acc["autoattack"] - aware[strongest]
    passed = gap <= OVERSTATED_MARGIN + PERCENT_ROUNDOFF
    return SanityCheck(
        f"ensemble_aware_not_stronger_{combiner}", passed,
        f"strongest ensemble-aware attack {strongest} {aware[strongest]:.2f} vs AutoAttack {acc['autoattack']:.2f} "
        f"({gap:+.2f} points below it, allowed {OVERSTATED_MARGIN})"
        + ("" if passed else "; the robustness under the paper's attacks is overstated"))


def _pgd_check(combiner: str, strong: tuple[float, float, int] | None, config: EvalConfig) -> SanityCheck | None:
    if strong is None:
        return None
    pgd, pgd_strong, n = strong
    return SanityCheck(
        f"pgd_converged_{combiner}", abs(pgd - pgd_strong) <= PGD_CONVERGENCE_MARGIN + PERCENT_ROUNDOFF,
        f"on {n} examples PGD-{config.steps} {pgd:.2f} vs PGD-{config.sanity_pgd_steps} with "
        f"{config.sanity_pgd_restarts} restarts {pgd_strong:.2f} (allowed gap {PGD_CONVERGENCE_MARGIN})")


def _monotone_check(combiner: str, values: list[float], sweep_eps: tuple[float, ...],
                    config: EvalConfig) -> SanityCheck:
    pairs = sorted(zip(sweep_eps, values))
    rises = [f"{a * 255:.1f}->{b * 255:.1f}/255: {u:.2f}->{v:.2f}"
             for (a, u), (b, v) in zip(pairs, pairs[1:]) if v > u + 1e-9]
    return SanityCheck(f"monotone_in_eps_{combiner}", not rises,
                       f"{config.eps_sweep_attack} accuracy non-increasing over eps" if not rises
                       else f"{config.eps_sweep_attack} accuracy rises with eps: {'; '.join(rises)}")


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
