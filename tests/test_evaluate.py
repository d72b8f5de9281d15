"""evaluate_ensemble: every attack under both combiners, the union, the surrogate for the max combiner, the eps
sweep, the sanity checks (each failing on a deliberately broken attack plugged in through `attack_factory`, and
passing on the real one), and the records the runner and `igat eval` write."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from igat_core.attacks import FGSM, MORA, PGD, Attack, LogitPGD, OutputBounds, Transfer, TransferSource
from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble
from igat_core.evaluate import (ATTACK_ORDER, ENSEMBLE_AWARE, AttackFactory, EnsembleEvaluation, EvalConfig,
                                SanityEvidence, attack_factory_for, correct_mask, evaluate_ensemble, evaluation_record,
                                learned_threshold, make_attack, relative_improvement, sanity_checks)
from igat_core.spec import EvalSpec
from igat_core.train import TrainConfig, fit
from tests.conftest import digits_config

SMALL = dict(eps=0.1, step=0.025, steps=10, batch_size=40, signhunter_queries=60, simba_queries=80,
             bandits_queries=60, autoattack_steps=3, square_queries=40, mora_steps=10, mora_restarts=2,
             sanity_pgd_steps=20, sanity_pgd_restarts=2, sanity_examples=12)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(digits_test):
    return digits_test.images[::10], digits_test.labels[::10]


@pytest.fixture(scope="module")
def full(trained_ensemble, examples, tmp_path_factory):
    config = EvalConfig(attacks=ATTACK_ORDER, eps_sweep=(0.2, 0.03, 0.1), eps_sweep_attack="pgd", **SMALL)
    return evaluate_ensemble(trained_ensemble, *examples, config, progress=False,
                             state_dir=tmp_path_factory.mktemp("state"),
                             attack_factory=attack_factory_for(copy.deepcopy(trained_ensemble), config))


def test_every_attack_under_both_combiners_with_union_and_cost(full):
    for combiner in ("average", "max"):
        acc = full.accuracy[combiner]
        assert set(acc) == {*ATTACK_ORDER, "union", "union_standard"}
        attacked = [v for a, v in acc.items() if a != "natural"]
        assert all(0.0 <= v <= acc["natural"] for v in attacked)
        assert acc["union"] == pytest.approx(min(acc.values()), abs=1e-9) or acc["union"] < min(acc.values())
        standard = [v for a, v in acc.items() if a not in (*ENSEMBLE_AWARE, "union", "union_standard")]
        assert acc["union"] <= acc["union_standard"] <= min(standard)
        assert acc["pgd"] < acc["natural"]
        cost = full.cost[combiner]
        assert 0 < cost["signhunter"] <= 60 and 0 < cost["simba"] <= 80 and 0 < cost["bandits"] <= 60
        assert cost["pgd"] >= 10


def test_sweep_runs_at_each_eps_in_the_given_order(full):
    assert full.sweep_eps == (0.2, 0.03, 0.1)
    for values in full.sweep.values():
        assert len(values) == 3 and values[0] <= values[2] <= values[1]


def test_sanity_checks_cover_every_requirement_and_pass_on_the_real_attacks(full):
    """At this tiny budget PGD-10 is not converged (PGD-20 with restarts breaks more of the 12 examples), on
    the max combiner SignHunter breaks one example of 36 more than it, and MORA (2 runs of 10 steps) beats
    AutoAttack at 3 steps by 5 to 9 points, so those three checks are only present here; the pair tests below show
    each of them passing and failing."""
    checks = {c.name: c for c in full.sanity}
    per_combiner = ("learned", "rescoring_agrees", "white_box_not_weaker_than_noise", "black_box_not_stronger",
                    "pgd_converged", "monotone_in_eps", "ensemble_aware_not_stronger")
    expected = {"perturbation_within_eps", "pixels_within_range",
                *(f"{check}_{combiner}" for check in per_combiner for combiner in ("average", "max"))}
    assert set(checks) == expected
    budget_bound = ("pgd_converged", "black_box_not_stronger", "ensemble_aware_not_stronger")
    failed = {name: c.detail for name, c in checks.items() if not c.passed and not name.startswith(budget_bound)}
    assert not failed


def test_a_margin_reached_exactly_passes_despite_float32_round_off():
    """80 and 78 of 100 examples as float32 percentages differ by 2.0000036: that gap is the margin, not over it;
    one example more is over it."""
    def converged(pgd: float, strong: float) -> bool:
        checks = sanity_checks(evaluation({"average": {"pgd": pgd}}), SanityEvidence(strong_pgd={
            "average": (pgd, strong, 100)}), EvalConfig())
        return by_name(checks)["pgd_converged_average"].passed

    pgd, strong = (100.0 * torch.tensor([True] * k + [False] * (100 - k)).float().mean().item() for k in (80, 78))
    assert pgd - strong > 2.0
    assert converged(pgd, strong) and not converged(80.0, 77.0)


def test_the_learned_threshold_is_twice_chance_or_three_standard_deviations_above_it():
    assert learned_threshold(10, 300) == pytest.approx(20.0)  # 10 + 3.09 * sqrt(0.09 / 300) * 100 = 15.35 < 20
    assert learned_threshold(10, 16) == pytest.approx(10.0 + 3.09 * 7.5)  # sd sqrt(0.09 / 16) = 7.5 points
    assert learned_threshold(2, 10_000) == pytest.approx(75.0)  # halfway from chance, as twice chance is 100
    assert learned_threshold(100, 10_000) == pytest.approx(2.0)


def test_an_untrained_ensemble_fails_the_learned_check_and_the_trained_one_passes(trained_ensemble, examples):
    """Fresh members are at chance: every attack check passes on them (nothing to attack), the learned one
    does not."""
    torch.manual_seed(0)
    untrained = Ensemble(trained_ensemble.config, trained_ensemble.num_members)
    config = EvalConfig(**{**SANITY, "attacks": ("natural", "pgd")})
    fresh = by_name(evaluate_ensemble(untrained, *examples, config, progress=False).sanity)
    trained = by_name(evaluate_ensemble(trained_ensemble, *examples, config, progress=False).sanity)
    assert not fresh["learned_average"].passed and trained["learned_average"].passed
    assert "classes" in fresh["learned_average"].detail
    assert all(c.passed for name, c in fresh.items() if name != "learned_average")


def recording(calls: list[tuple[str, str, int]]) -> AttackFactory:
    """make_attack, each attack noting (attack, combiner, examples) per call of its forward into `calls`."""
    def factory(name, model, config, generator, **kwargs):
        attack = make_attack(name, model, config, generator, **kwargs)
        forward = attack.forward
        attack.forward = lambda x, y: (calls.append((name, model.combiner, len(y))), forward(x, y))[1]
        return attack

    return factory


def test_max_combiner_also_attacks_the_average_surrogate_on_still_robust_examples(trained_ensemble, examples):
    calls: list[tuple[str, str, int]] = []
    x, y = examples[0][:20], examples[1][:20]
    config = EvalConfig(attacks=("natural", "pgd", "signhunter"), combiners=("max",), **{**SMALL, "sanity_examples": 0})
    evaluate_ensemble(trained_ensemble, x, y, config, progress=False, attack_factory=recording(calls))
    pgd = [c for c in calls if c[0] == "pgd"]
    assert [c[1] for c in pgd] == ["max", "average"] and pgd[1][2] <= pgd[0][2]
    assert [c[1] for c in calls if c[0] == "signhunter"] == ["max"]


def test_the_max_combiners_surrogate_attempt_reuses_the_average_combiners_adversarial_examples(
        trained_ensemble, examples):
    calls: list[tuple[str, str, int]] = []
    x, y = examples[0][:20], examples[1][:20]
    config = EvalConfig(attacks=("pgd",), combiners=("max", "average"), **{**SMALL, "sanity_examples": 0})
    evaluate_ensemble(trained_ensemble, x, y, config, progress=False, attack_factory=recording(calls))
    average_correct = int(correct_mask(trained_ensemble, x, y).sum())
    max_correct = int(correct_mask(trained_ensemble.with_combiner("max"), x, y).sum())
    assert [(c, n) for _, c, n in calls[:2]] == [("average", average_correct), ("max", max_correct)]
    assert sum(n for _, c, n in calls[2:]) <= max(0, max_correct - average_correct)
    calls.clear()
    evaluate_ensemble(trained_ensemble, x, y, EvalConfig(**{**config.__dict__, "combiners": ("max",)}),
                      progress=False, attack_factory=recording(calls))
    assert [c for _, c, _ in calls] == ["max", "average"]


def test_an_attack_gives_the_same_number_whatever_else_runs(trained_ensemble, examples):
    x, y = examples[0][:20], examples[1][:20]
    config = dict(SMALL, combiners=("average",), sanity_examples=0)
    alone = evaluate_ensemble(trained_ensemble, x, y, EvalConfig(attacks=("pgd",), **config), progress=False)
    together = evaluate_ensemble(trained_ensemble, x, y, EvalConfig(attacks=("natural", "cw", "pgd"), **config),
                                 progress=False)
    assert alone.accuracy["average"]["pgd"] == together.accuracy["average"]["pgd"]
    assert alone.accuracy["average"]["union"] == alone.accuracy["average"]["pgd"]


def evaluation(accuracy: dict, sweep: dict | None = None, sweep_eps: tuple = ()) -> EnsembleEvaluation:
    return EnsembleEvaluation(accuracy=accuracy, sweep=sweep or {}, sweep_eps=sweep_eps)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_black_box_beating_white_box_by_more_than_half_a_point_fails():
    acc = {"average": {"natural": 90.0, "pgd": 50.0, "autoattack": 45.0, "signhunter": 44.6, "simba": 44.4}}
    check = by_name(sanity_checks(evaluation(acc), SanityEvidence(), EvalConfig()))["black_box_not_stronger_average"]
    assert not check.passed and "simba 44.40" in check.detail and "signhunter" not in check.detail.split(":")[-1]


def test_the_thresholds_of_the_numeric_checks():
    evidence = SanityEvidence(OutputBounds(excess=1e-3, low=0.0, high=1.0), {"max": (50.0, 47.5, 200)},
                              {"max": 60.0}, {"max": {"pgd": (1, 80)}}, classes=10, examples=300)
    checks = by_name(sanity_checks(
        evaluation({"max": {"natural": 19.9, "pgd": 50.0, "mim": 61.5}}, {"max": [40.0, 60.0, 30.0]},
                   (0.03, 0.01, 0.02)), evidence, EvalConfig()))
    assert [name for name, c in checks.items() if c.passed] == ["pixels_within_range"]
    assert "mim 61.50" in checks["white_box_not_weaker_than_noise_max"].detail
    assert "19.90 on 300 examples against 20.00" in checks["learned_max"].detail
    evidence = SanityEvidence(OutputBounds(excess=1e-6, low=0.0, high=1.0), {"max": (50.0, 48.0, 200)},
                              {"max": 60.0}, {"max": {"pgd": (0, 80)}})
    ok = by_name(sanity_checks(evaluation({"max": {"pgd": 50.0, "mim": 61.0}}, {"max": [60.0, 50.0, 40.0]},
                                          (0.01, 0.02, 0.03)), evidence, EvalConfig()))
    assert all(c.passed for c in ok.values()) and len(ok) == 6


@pytest.mark.parametrize("mora, passed", [(48.0, True), (47.9, False)])
def test_an_ensemble_aware_attack_beating_autoattack_by_more_than_two_points_fails(mora, passed):
    acc = {"max": {"natural": 90.0, "pgd": 52.0, "autoattack": 50.0, "logit_pgd": 49.0, "mora": mora}}
    check = by_name(sanity_checks(evaluation(acc), SanityEvidence(), EvalConfig()))["ensemble_aware_not_stronger_max"]
    assert check.passed is passed and f"mora {mora:.2f} vs AutoAttack 50.00" in check.detail
    assert ("robustness under the paper's attacks is overstated" in check.detail) is not passed
    without_autoattack = {"max": {"pgd": 52.0, "mora": mora}}
    assert "ensemble_aware_not_stronger_max" not in by_name(sanity_checks(evaluation(without_autoattack),
                                                                          SanityEvidence(), EvalConfig()))


def test_config_from_spec_and_validation():
    spec = EvalSpec(attacks=["natural", "simba"], eps="4/255", eps_sweep=True, eps_sweep_values=["1/255", "2/255"],
                    signhunter_queries=100, cw_kappa=0)
    config = EvalConfig.from_spec(spec, seed=3)
    assert config.attacks == ("natural", "simba") and config.seed == 3 and config.cw_kappa == 0
    assert config.eps_sweep == pytest.approx((1 / 255, 2 / 255)) and config.signhunter_queries == 100
    assert EvalConfig.from_spec(EvalSpec()).eps_sweep == ()
    with pytest.raises(ValueError, match="unknown attacks"):
        EvalConfig(attacks=("natural", "deepfool"))
    with pytest.raises(ValueError):
        EvalSpec(attacks=["pgd", "pgd"])
    with pytest.raises(ValueError):
        EvalSpec(signhunter_queries=0)


def test_evaluation_record_is_json_with_models_checks_cost_and_sweep(full):
    config = EvalConfig(eps_sweep=(0.2, 0.03, 0.1), eps_sweep_attack="pgd")
    record = json.loads(json.dumps(evaluation_record({"base": full, "igat": full}, config, 36)))
    assert record["accuracy"]["igat"]["max"]["bandits"] == full.accuracy["max"]["bandits"]
    assert "igat.black_box_not_stronger_max" in record["sanity"]
    assert record["cost"]["base"]["average"]["simba"] == full.cost["average"]["simba"]
    assert record["eps_sweep"]["attack"] == "pgd" and record["eps_sweep"]["accuracy"]["base"]["max"]
    assert "eps_sweep" not in evaluation_record({"base": full}, EvalConfig(), 36)


def test_relative_improvement_is_table_2():
    base = {"average": {"pgd": 40.0, "cw": 0.0}}
    assert relative_improvement(base, {"average": {"pgd": 44.0, "cw": 1.0}}) == {"average": {"pgd": 10.0, "cw": None}}


@pytest.fixture(scope="module")
def bn_ensemble(digits_train, tmp_path_factory) -> Ensemble:
    """A one-member ResNet-20 (BatchNorm) trained for two epochs on digits, about 83% natural accuracy."""
    torch.manual_seed(0)
    ensemble = Ensemble(digits_config("resnet20"), members=1)
    fit(ensemble, Plain(), digits_train, TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=0),
        tmp_path_factory.mktemp("bn"), progress=False)
    return ensemble.eval()


def gradient_sign(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)
    return grad.sign()


class OvershootingFGSM(FGSM):
    """A signed-gradient step of 2 eps, clipped to [0,1] only: it steps outside the eps-ball."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.cost = torch.ones(len(images), dtype=torch.long)
        return (images + 2 * self.eps * gradient_sign(self.model, images, labels)).clamp(0.0, 1.0)


class UnclippedFGSM(FGSM):
    """A signed-gradient step of eps without the clip to [0,1]."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.cost = torch.ones(len(images), dtype=torch.long)
        return images + self.eps * gradient_sign(self.model, images, labels)


class DescendingPGD(PGD):
    """PGD with the gradient's sign flipped: it lowers the loss."""

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -super().loss(outputs, labels)


class ZeroGradientPGD(PGD):
    """PGD whose loss has a zero gradient (as under masked gradients): it stays at its random start."""

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.0 * super().loss(outputs, labels)


class CreepingPGD(PGD):
    """PGD with a step of eps / 100: far from converged after its steps."""

    def __init__(self, model: nn.Module, eps: float, steps: int, generator: torch.Generator):
        super().__init__(model, eps, eps / 100, steps, generator=generator)


class ShrinkingPGD(PGD):
    """PGD at the radius min(eps, 0.21 - eps), inside the eps-ball but weaker as eps grows past 0.105."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        declared = self.eps
        self.eps = min(declared, 0.21 - declared)
        try:
            return super().forward(images, labels)
        finally:
            self.eps = declared


class TrainModeLeavingPGD(PGD):
    """PGD that leaves the model in train mode, so the verdicts on its examples use BatchNorm batch statistics."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adv = super().__call__(images, labels)
        self.model.train()
        return adv


class UnprojectedMORA(MORA):
    """MORA without its projection: the random start and every step leave the eps-ball and [0,1]."""

    def project(self, x: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        return x


class OvershootingSurrogatePGD(PGD):
    """PGD whose output lies 2 eps beyond the ball, as the surrogate attack of a broken logit surrogate."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(images, labels) + 2 * self.eps


class OvershootingLogitPGD(LogitPGD):
    surrogate_attack = OvershootingSurrogatePGD


class ShiftedTransfer(Transfer):
    """Transfer whose examples are moved by eps / 2 past the source's, out of the eps-ball."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adv = super().forward(images, labels)
        return adv + torch.where(adv > images, 0.5, -0.5) * self.eps


def transfer_from_a_copy(cls: type[Transfer]) -> Build:
    return lambda model, eps, config, generator: cls(model, eps, TransferSource(copy.deepcopy(model), config.step,
                                                                                 config.steps))


Build = Callable[[nn.Module, float, EvalConfig, torch.Generator], Attack]


def replacing(name: str, build: Build | None) -> AttackFactory:
    """make_attack, except that the attack `name` is made by `build` (make_attack's own when None)."""
    def factory(attack, model, config, generator, *, eps=None, state_dir=None):
        if attack != name or build is None:
            return make_attack(attack, model, config, generator, eps=eps, state_dir=state_dir)
        return build(model, config.eps if eps is None else eps, config, generator)

    return factory


def pgd_like(cls: type[PGD]) -> Build:
    return lambda model, eps, config, generator: cls(model, eps, config.step, config.steps, generator=generator)


@dataclass(frozen=True)
class Case:
    """A sanity check, a broken attack that makes it fail, the real attack it passes on (make_attack's when None),
    the settings over SANITY and the fixture of the model."""

    check: str
    broken: Build
    real: Build | None = None
    settings: dict = field(default_factory=dict)
    model: str = "trained_ensemble"


SANITY = dict(SMALL, attacks=("pgd",), combiners=("average",), sanity_examples=0)


def FGSM_BUILD(model: nn.Module, eps: float, config: EvalConfig, generator: torch.Generator) -> Attack:  # noqa: N802
    return FGSM(model, eps)


CASES = {
    "steps_outside_eps": Case("perturbation_within_eps", lambda m, eps, c, g: OvershootingFGSM(m, eps), FGSM_BUILD),
    "pixels_outside_range": Case("pixels_within_range", lambda m, eps, c, g: UnclippedFGSM(m, eps), FGSM_BUILD),
    "leaves_train_mode": Case("rescoring_agrees_average", pgd_like(TrainModeLeavingPGD), model="bn_ensemble"),
    "updates_bn_statistics": Case("rescoring_agrees_average", lambda m, eps, c, g: PGD(
        m, eps, c.step, c.steps, model_mode="train", generator=g), model="bn_ensemble"),
    "sign_flipped_gradient": Case("white_box_not_weaker_than_noise_average", pgd_like(DescendingPGD),
                                  settings={"eps": 0.3, "step": 0.075}),
    "zero_gradient": Case("black_box_not_stronger_average", pgd_like(ZeroGradientPGD),
                          settings={"attacks": ("pgd", "signhunter")}),
    "not_converged": Case("pgd_converged_average", lambda m, eps, c, g: CreepingPGD(m, eps, c.steps, g),
                          settings={"eps": 0.3, "step": 0.075, "sanity_examples": 36}),
    "mora_steps_outside_eps": Case("perturbation_within_eps", lambda m, eps, c, g: UnprojectedMORA(
        m, eps, 5, 2, generator=g), lambda m, eps, c, g: MORA(m, eps, 5, 2, generator=g)),
    "logit_pgd_steps_outside_eps": Case("perturbation_within_eps", lambda m, eps, c, g: OvershootingLogitPGD(
        m, eps, c.step, c.steps, generator=g), lambda m, eps, c, g: LogitPGD(m, eps, c.step, c.steps, generator=g)),
    "transfer_steps_outside_eps": Case("perturbation_within_eps", transfer_from_a_copy(ShiftedTransfer),
                                       transfer_from_a_copy(Transfer)),
    "weaker_at_larger_eps": Case("monotone_in_eps_average", pgd_like(ShrinkingPGD),
                                 settings={"eps_sweep": (0.03, 0.1, 0.2), "eps_sweep_attack": "pgd"}),
}


def evaluate_case(case: Case, build: Build | None, request: pytest.FixtureRequest, examples
                  ) -> EnsembleEvaluation:
    model = copy.deepcopy(request.getfixturevalue(case.model))
    return evaluate_ensemble(model, *examples, EvalConfig(**{**SANITY, **case.settings}), progress=False,
                             attack_factory=replacing("pgd", build))


@pytest.mark.parametrize("name", CASES)
def test_a_broken_attack_fails_its_sanity_check(name, request, examples):
    case = CASES[name]
    check = by_name(evaluate_case(case, case.broken, request, examples).sanity)[case.check]
    assert not check.passed, check.detail


@pytest.mark.parametrize("name", CASES)
def test_the_real_attack_passes_every_sanity_check_in_the_same_setting(name, request, examples):
    case = CASES[name]
    checks = by_name(evaluate_case(case, case.real, request, examples).sanity)
    assert case.check in checks
    assert not [c for c in checks.values() if not c.passed]


def test_the_safety_projection_gives_an_attack_that_steps_outside_the_numbers_of_fgsm(request, examples):
    case = CASES["steps_outside_eps"]
    fgsm = evaluate_case(case, FGSM_BUILD, request, examples).accuracy
    assert fgsm["average"]["pgd"] < 90.0
    for broken in (OvershootingFGSM, UnclippedFGSM):
        assert evaluate_case(case, lambda m, eps, c, g, cls=broken: cls(m, eps), request, examples).accuracy == fgsm
