"""White-box attacks and AutoAttack: agreement with torchattacks, strength on an undefended model, the eps-ball,
the reference settings of AutoAttack's components, its cascade and its resumable state."""

from __future__ import annotations

import copy

import pytest
import torch
import torchattacks

from igat_core.attacks import (ATTACKS, FGSM, MIM, PGD, Attack, AutoAttack, CWLinf, OutputBounds, TransferSource,
                               margin_loss)
from igat_core.evaluate import (ATTACK_ORDER, STRONG_PGD, EvalConfig, WithTransferSource, attack_factory_for,
                                correct_mask, make_attack)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.images[::3], digits_test.labels[::3]


def accuracy(model, images, labels) -> float:
    return 100.0 * correct_mask(model, images, labels).float().mean().item()


def test_pgd20_matches_torchattacks_pgd_within_one_point(trained_ensemble, digits_test):
    x, y = digits_test.images, digits_test.labels
    eps, step = 0.1, 0.025
    pgd = PGD(trained_ensemble, eps, step, 20, generator=torch.Generator().manual_seed(0))
    ours = accuracy(trained_ensemble, pgd(x, y), y)
    torch.manual_seed(0)
    theirs = accuracy(trained_ensemble, torchattacks.PGD(trained_ensemble, eps=eps, alpha=step, steps=20,
                                                         random_start=True)(x, y), y)
    assert 10.0 < theirs < accuracy(trained_ensemble, x, y) - 10.0
    assert abs(ours - theirs) <= 1.0


def test_undefended_model_falls_under_pgd20_and_square_at_large_eps(trained_ensemble, batch):
    x, y = batch
    assert accuracy(trained_ensemble, x, y) > 90.0
    pgd = PGD(trained_ensemble, eps=0.3, step=0.075, steps=20, generator=torch.Generator().manual_seed(0))
    assert accuracy(trained_ensemble, pgd(x, y), y) <= 5.0
    square = AutoAttack(trained_ensemble, eps=0.3, square_queries=300, components=("square",))
    assert accuracy(trained_ensemble, square(x, y), y) <= 5.0
    assert int(square.cost.max()) <= 300


@pytest.mark.parametrize("name", ["pgd", "cw", "mim"])
def test_white_box_attacks_stay_in_the_ball_and_lower_accuracy(trained_ensemble, batch, name):
    x, y = batch
    attack = ATTACKS[name](trained_ensemble, 0.1, step=0.025, steps=10)
    adv = attack(x, y)
    assert (adv - x).abs().max().item() <= 0.1 + 1e-6
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    assert attack.raw_bounds.within_eps and attack.raw_bounds.within_range
    assert accuracy(trained_ensemble, adv, y) < accuracy(trained_ensemble, x, y) - 20.0
    assert attack.cost.tolist() == [10] * len(y)


def test_margin_loss_is_positive_exactly_when_misclassified():
    outputs = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 0])
    assert margin_loss(outputs, labels).tolist() == [-1.0, 3.0]


def test_cw_loss_stops_pushing_below_minus_kappa():
    outputs = torch.tensor([[0.0, 60.0], [0.0, 10.0]], requires_grad=True)
    loss = CWLinf(torch.nn.Identity(), kappa=50.0).loss(outputs, torch.tensor([0, 0]))
    grad, = torch.autograd.grad(loss, outputs)
    assert loss.item() == pytest.approx(60.0)
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0


def test_mim_accumulates_l1_normalised_momentum():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.full((1, 1, 2, 2), 0.5), torch.tensor([0])
    adv = MIM(model, eps=0.1, step=0.01, steps=3, decay=1.0)(x, y)
    w = model[1].weight.detach()
    assert torch.allclose(adv.flatten(), (0.5 + 0.03 * (w[1] - w[0]).sign()))


def test_autoattack_components_use_the_reference_settings(trained_ensemble):
    attack = AutoAttack(trained_ensemble, eps=8 / 255)
    apgd, apgdt, fab, square = (attack._build(c, num_classes=10) for c in attack.components)
    assert (apgd.steps, apgd.n_restarts, apgd.loss, apgd.thr_decr) == (100, 1, "ce", 0.75)
    assert (apgdt.steps, apgdt.n_restarts, apgdt.n_target_classes) == (100, 1, 9)
    assert (fab.steps, fab.n_restarts, fab.multi_targeted, fab.n_target_classes) == (100, 1, True, 9)
    assert (square.n_queries, square.p_init, square.loss, square.rescale_schedule) == (5000, 0.8, "margin", False)
    assert attack._build("apgd-t", num_classes=5).n_target_classes == 4
    assert attack._build("apgd-t", num_classes=100).n_target_classes == 9


def test_autoattack_cascades_over_still_robust_examples_and_resumes(trained_ensemble, batch, tmp_path, monkeypatch):
    x, y = batch[0][:40], batch[1][:40]
    entered: list[tuple[str, int]] = []
    real = AutoAttack.run_component

    def spy(self, component, images, labels, num_classes):
        entered.append((component, len(labels)))
        if component == "square" and getattr(self, "crash", False):
            raise KeyboardInterrupt
        return real(self, component, images, labels, num_classes)

    monkeypatch.setattr(AutoAttack, "run_component", spy)

    def make() -> AutoAttack:
        return AutoAttack(trained_ensemble, 0.08, steps=5, square_queries=30, components=("apgd-ce", "square"),
                          state_dir=tmp_path)

    crashing = make()
    crashing.crash = True
    with pytest.raises(KeyboardInterrupt):
        crashing(x, y)
    natural = int(correct_mask(trained_ensemble, x, y).sum())
    assert entered[0] == ("apgd-ce", natural) and entered[1][0] == "square" and entered[1][1] < natural
    square_entered = entered[1][1]
    assert len(list(tmp_path.glob("*.pt"))) == 1

    entered.clear()
    resumed = make()
    adv = resumed(x, y)
    assert entered == [("square", square_entered)]
    assert int((resumed.cost == 5 + 30).sum()) == square_entered
    entered.clear()
    again = make()(x, y)
    assert entered == [] and torch.equal(adv, again)
    assert (adv - x).abs().max().item() <= 0.08 + 1e-6


def test_autoattack_is_at_least_as_strong_as_pgd20(trained_ensemble, batch):
    x, y = batch[0][:60], batch[1][:60]
    eps = 0.06
    pgd = accuracy(trained_ensemble, PGD(trained_ensemble, eps, eps / 4, 20,
                                         generator=torch.Generator().manual_seed(0))(x, y), y)
    aa = AutoAttack(trained_ensemble, eps, steps=20, square_queries=50, components=("apgd-ce", "apgd-t"))
    assert accuracy(trained_ensemble, aa(x, y), y) <= pgd + 100.0 / len(y)


def test_autoattack_leaves_the_global_random_state_alone(trained_ensemble, batch):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    AutoAttack(trained_ensemble, 0.05, steps=2, components=("apgd-ce",))(batch[0][:8], batch[1][:8])
    assert torch.equal(torch.rand(3), expected)


def test_autoattack_rejects_unknown_components(trained_ensemble):
    with pytest.raises(ValueError, match="components"):
        AutoAttack(trained_ensemble, components=("apgd-dlr",))


TINY = EvalConfig(eps=0.3, step=0.075, steps=5, signhunter_queries=40, simba_queries=40, bandits_queries=40,
                  autoattack_steps=3, square_queries=30, mora_steps=5, mora_restarts=2, sanity_pgd_steps=5,
                  sanity_pgd_restarts=2)


@pytest.mark.parametrize("name", [*(a for a in ATTACK_ORDER if a != "natural"), STRONG_PGD])
@pytest.mark.parametrize("combiner", ["average", "max"])
def test_every_attacks_own_output_stays_in_the_eps_ball_and_the_image_range(trained_ensemble, batch, name, combiner):
    x, y = batch[0][:40], batch[1][:40]
    factory = attack_factory_for(copy.deepcopy(trained_ensemble), TINY)
    attack = factory(name, trained_ensemble.with_combiner(combiner), TINY, torch.Generator().manual_seed(0))
    adv = attack(x, y)
    bounds = attack.raw_bounds
    assert bounds.within_eps and bounds.within_range, bounds
    assert float((adv - x).abs().max()) > 0.0


def test_fgsm_clips_to_the_image_range_itself(trained_ensemble, batch):
    attack = FGSM(trained_ensemble, 0.3)
    attack(*batch)
    assert attack.raw_bounds.within_range and attack.raw_bounds.within_eps


class Scaling(Attack):
    """Returns the images times `factor`."""

    def __init__(self, model: torch.nn.Module, eps: float, factor: float):
        super().__init__(model, eps)
        self.factor = factor

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return images * self.factor


def test_the_base_class_projects_the_output_but_records_what_forward_returned():
    x, y = torch.full((2, 1, 2, 2), 0.8), torch.zeros(2, dtype=torch.long)
    attack = Scaling(torch.nn.Identity(), 0.1, 1.5)
    adv = attack(x, y)
    assert torch.allclose(adv, torch.full_like(x, 0.9))
    assert attack.raw_bounds.excess == pytest.approx(0.3) and attack.raw_bounds.high == pytest.approx(1.2)
    assert not attack.raw_bounds.within_eps and not attack.raw_bounds.within_range
    nan = Scaling(torch.nn.Identity(), 0.1, float("nan"))
    nan(x, y)
    assert nan.raw_bounds == OutputBounds(float("inf"), float("-inf"), float("inf"))


def test_the_registry_builds_every_attack_the_spec_names_and_only_those():
    from typing import get_args

    from igat_core.attacks import ATTACKS
    from igat_core.spec import AttackName

    evaluated = set(get_args(AttackName)) - {"natural"}
    assert evaluated <= set(ATTACKS)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.LogSoftmax(dim=1))
    factory = WithTransferSource(TransferSource(model, TINY.step, TINY.steps))
    for name in evaluated:
        attack = factory(name, model, TINY, torch.Generator().manual_seed(0), eps=0.1)
        assert isinstance(attack, ATTACKS[name]) and attack.eps == 0.1
    with pytest.raises(ValueError, match="the transfer attack needs a source ensemble"):
        make_attack("transfer", model, TINY, torch.Generator())
    with pytest.raises(ValueError, match="unknown attack 'fgsm'"):
        make_attack("fgsm", model, TINY, torch.Generator())
