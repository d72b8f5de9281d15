"""The transfer attack from an independent ensemble (issue 18, part 3): examples made once per image on the source,
the same examples for every model scored, an ensemble that hides its gradients broken by transfer but not by PGD,
and the spec's rules for `eval.transfer_from`."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from igat_core.attacks import PGD, Transfer, TransferSource
from igat_core.ensemble import Ensemble
from igat_core.evaluate import (BLACK_BOX, ENSEMBLE_AWARE, EvalConfig, attack_factory_for, correct_mask,
                                evaluate_ensemble)
from igat_core.spec import EvalSpec

pytestmark = pytest.mark.usefixtures("one_thread")
EPS, STEP, STEPS = 0.1, 0.025, 10


class RoundedInput(nn.Module):
    """A member that sees its input rounded to multiples of 1/1000: the same verdicts, and no input gradient."""

    def __init__(self, member: nn.Module):
        super().__init__()
        self.member = member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(torch.round(x * 1000) / 1000)


def gradient_hiding(ensemble: Ensemble) -> Ensemble:
    hidden = copy.deepcopy(ensemble)
    hidden.members = nn.ModuleList(RoundedInput(m) for m in hidden.members)
    return hidden.eval()


@pytest.fixture(scope="module")
def examples(digits_test):
    return digits_test.images[::9], digits_test.labels[::9]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * correct_mask(model, images, labels).float().mean().item()


def test_the_source_makes_each_image_once_and_every_model_gets_the_same_examples(trained_ensemble, examples):
    x, y = examples
    source = TransferSource(trained_ensemble, STEP, STEPS)
    first = source.examples(x, y, EPS)
    assert first.shape == (2, *x.shape) and len(source.made) == len(y)
    again = source.examples(x[5:].flip(0), y[5:].flip(0), EPS)
    assert len(source.made) == len(y) and torch.equal(again, first[:, 5:].flip(1))
    assert torch.equal(first[0], PGD(trained_ensemble, EPS, STEP, STEPS, random_start=False)(x, y))
    source.examples(x[:3], y[:3], EPS / 2)
    assert len(source.made) == len(y) + 3
    attack = Transfer(gradient_hiding(trained_ensemble), EPS, source)
    attack(x, y)
    assert attack.cost.tolist() == [2 * STEPS] * len(y)
    assert attack.raw_bounds.within_eps and attack.raw_bounds.within_range


def test_an_example_is_broken_when_either_source_example_breaks_it(trained_ensemble, examples):
    x, y = examples
    source = TransferSource(trained_ensemble, STEP, STEPS)
    pgd_examples, mim_examples = source.examples(x, y, EPS)
    target = gradient_hiding(trained_ensemble)
    adv = Transfer(target, EPS, source)(x, y)
    either = correct_mask(target, pgd_examples, y) & correct_mask(target, mim_examples, y)
    assert torch.equal(correct_mask(target, adv, y), either)


def test_transfer_breaks_an_ensemble_that_hides_its_gradients_from_pgd(trained_ensemble, examples):
    """Measured with these seeds (40 examples, eps 0.1): natural 97.5 %, PGD-10 on the rounded ensemble 97.5 %
    (zero input gradient), transfer from the unrounded ensemble 67.5 %, which its own PGD leaves at 67.5 %."""
    x, y = examples
    target = gradient_hiding(trained_ensemble)
    x_pgd = PGD(target, EPS, STEP, STEPS, generator=torch.Generator().manual_seed(0))(x, y)
    source = TransferSource(trained_ensemble, STEP, STEPS)
    x_transfer = Transfer(target, EPS, source)(x, y)
    natural, pgd, transfer = accuracy(target, x, y), accuracy(target, x_pgd, y), accuracy(target, x_transfer, y)
    assert natural > 90.0 and pgd >= natural - 5.0
    assert transfer < pgd - 25.0
    assert transfer <= accuracy(trained_ensemble, source.examples(x, y, EPS)[0], y) + 5.0


def test_evaluation_counts_transfer_as_ensemble_aware_and_runs_it_on_the_deployed_combiner(trained_ensemble,
                                                                                           examples):
    x, y = examples[0][:40], examples[1][:40]
    config = EvalConfig(attacks=("natural", "pgd", "transfer"), eps=EPS, step=STEP, steps=STEPS, batch_size=20,
                        sanity_examples=0)
    calls: list[tuple[str, str]] = []
    factory = attack_factory_for(trained_ensemble, config)

    def recording(name, model, *args, **kwargs):
        calls.append((name, model.combiner))
        return factory(name, model, *args, **kwargs)

    result = evaluate_ensemble(gradient_hiding(trained_ensemble), x, y, config, progress=False,
                               attack_factory=recording)
    assert "transfer" in ENSEMBLE_AWARE and "transfer" not in BLACK_BOX
    assert [c for n, c in calls if n == "transfer"] == ["average", "max"]
    for combiner, acc in result.accuracy.items():
        assert acc["transfer"] < acc["pgd"] - 20.0, combiner
        assert acc["union"] <= acc["transfer"] and acc["union_standard"] <= acc["pgd"]
        assert result.cost[combiner]["transfer"] == 2 * STEPS


def test_the_transfer_attack_needs_a_source():
    with pytest.raises(ValueError, match="needs a source ensemble"):
        Transfer.from_settings(nn.Identity(), EPS, EvalConfig(), torch.Generator())


@pytest.mark.parametrize(("fields", "message"), [
    ({"attacks": ["natural", "transfer"]}, "needs its source"),
    ({"attacks": ["natural", "pgd"], "eps_sweep": True, "eps_sweep_attack": "transfer"}, "needs its source"),
    ({"attacks": ["natural", "pgd"], "transfer_from": "standard"}, "no transfer attack runs"),
    ({"attacks": ["transfer"], "transfer_from": ""}, "must name a file"),
])
def test_eval_spec_refuses_a_transfer_attack_without_its_source_and_the_reverse(fields, message):
    with pytest.raises(ValidationError, match=message):
        EvalSpec.model_validate(fields)
    assert EvalSpec.model_validate({"attacks": ["transfer"], "transfer_from": "standard"}).transfer_from == "standard"
