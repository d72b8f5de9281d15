"""The training attacks: PGD and FGSM stay in the eps-ball and [0,1], and are as strong as they should be."""

from __future__ import annotations

import pytest
import torch

from igat_core.attacks import FGSM, PGD
from igat_core.evaluate import correct_mask


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.images[:200], digits_test.labels[:200]


def test_pgd_stays_in_the_eps_ball_and_the_image_range(trained_ensemble, batch):
    x, y = batch
    for eps in (0.05, 0.2):
        attack = PGD(trained_ensemble, eps=eps, step=eps / 4, steps=10, generator=torch.Generator().manual_seed(0))
        adv = attack(x, y)
        assert (adv - x).abs().max().item() <= eps + 1e-6
        assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
        assert attack.raw_bounds.within_eps and attack.raw_bounds.within_range


def test_pgd_is_at_least_as_strong_as_fgsm(trained_ensemble, batch):
    x, y = batch
    eps = 0.1
    fgsm = correct_mask(trained_ensemble, FGSM(trained_ensemble, eps)(x, y), y).float().mean()
    pgd = correct_mask(trained_ensemble, PGD(trained_ensemble, eps, eps / 4, 20)(x, y), y).float().mean()
    natural = correct_mask(trained_ensemble, x, y).float().mean()
    assert pgd <= fgsm <= natural
    assert natural > 0.9


def test_undefended_model_falls_near_zero_at_large_eps(trained_ensemble, batch):
    x, y = batch
    adv = PGD(trained_ensemble, eps=0.3, step=0.05, steps=20)(x, y)
    assert correct_mask(trained_ensemble, adv, y).float().mean().item() <= 0.02


def test_attack_restores_training_mode_and_runs_bn_in_eval_by_default(trained_ensemble, batch):
    x, y = batch
    trained_ensemble.train()
    seen = []
    hook = trained_ensemble.members[0].register_forward_pre_hook(lambda m, _: seen.append(m.training))
    try:
        PGD(trained_ensemble, 0.1, 0.05, 2)(x[:4], y[:4])
        PGD(trained_ensemble, 0.1, 0.05, 2, model_mode="train")(x[:4], y[:4])
    finally:
        hook.remove()
        trained_ensemble.eval()
    assert seen[:2] == [False, False] and seen[2:] == [True, True]


def test_pgd_random_start_is_reproducible_with_a_generator(trained_ensemble, batch):
    x, y = batch
    a = PGD(trained_ensemble, 0.1, 0.025, 3, generator=torch.Generator().manual_seed(5))(x[:20], y[:20])
    b = PGD(trained_ensemble, 0.1, 0.025, 3, generator=torch.Generator().manual_seed(5))(x[:20], y[:20])
    assert torch.equal(a, b)


def test_images_outside_the_unit_range_are_rejected(trained_ensemble, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PGD(trained_ensemble)(x * 2 - 0.5, y)
