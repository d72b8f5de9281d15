"""Score-based attacks: they see only the ensemble's output, spend at most their query budget per example, stay in
the eps-ball, and lower accuracy below natural accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igat_core.attacks import Bandits, SignHunter, SimBA
from igat_core.evaluate import correct_mask

EPS = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.images[::6], digits_test.labels[::6]


def make(name: str, model: nn.Module, queries: int):
    generator = torch.Generator().manual_seed(0)
    if name == "signhunter":
        return SignHunter(model, EPS, queries=queries)
    if name == "simba":
        return SimBA(model, EPS, queries=queries, generator=generator)
    return Bandits(model, EPS, queries=queries, generator=generator)


class Watched(nn.Module):
    """Records, per forward call, the batch size and whether autograd was recording."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((len(x), torch.is_grad_enabled()))
        return self.model(x)


@pytest.mark.parametrize("name,queries", [("signhunter", 120), ("simba", 200), ("bandits", 120)])
def test_black_box_attack_lowers_accuracy_within_eps_and_budget_without_gradients(trained_ensemble, batch, name,
                                                                                 queries):
    x, y = batch
    watched = Watched(trained_ensemble)
    attack = make(name, watched, queries)
    adv = attack(x, y)
    natural = correct_mask(trained_ensemble, x, y).float().mean().item()
    attacked = correct_mask(trained_ensemble, adv, y).float().mean().item()
    assert attacked < natural - 0.05
    assert (adv - x).abs().max().item() <= EPS + 1e-6
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    assert attack.raw_bounds.within_eps and attack.raw_bounds.within_range
    assert int(attack.cost.max()) <= queries
    assert not any(grad for _, grad in watched.calls)
    assert sum(size for size, _ in watched.calls) == int(attack.cost.sum())


def test_signhunter_spends_exactly_its_budget_on_examples_it_cannot_break(trained_ensemble, batch):
    x, y = batch
    budget = 37
    attack = SignHunter(trained_ensemble, 0.01, queries=budget)
    adv = attack(x, y)
    still_robust = correct_mask(trained_ensemble, adv, y)
    misclassified = ~correct_mask(trained_ensemble, x, y)
    assert still_robust.any()
    assert set(attack.cost[still_robust].tolist()) == {budget}
    assert set(attack.cost[misclassified].tolist()) <= {1}
    assert int(attack.cost.max()) <= budget


def test_signhunter_only_visits_vertices_and_never_lowers_its_loss():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    torch.manual_seed(0)
    x = torch.rand(5, 1, 4, 4) * 0.5 + 0.25
    y = model(x).argmax(1)
    adv = SignHunter(model, 0.05, queries=60)(x, y)
    assert torch.allclose((adv - x).abs(), torch.full_like(x, 0.05), atol=1e-6)


def test_simba_uses_each_coordinate_at_most_once(trained_ensemble, batch):
    x, y = batch
    adv = SimBA(trained_ensemble, EPS, queries=10_000, generator=torch.Generator().manual_seed(1))(x, y)
    delta = (adv - x).flatten()
    clipped = (adv.flatten() == 0) | (adv.flatten() == 1)
    steps = torch.isclose(delta.abs(), torch.tensor(EPS), atol=1e-6)
    assert bool((delta.eq(0) | steps | clipped).all())


def test_simba_queries_at_most_two_per_coordinate(trained_ensemble, batch):
    x, y = batch
    attack = SimBA(trained_ensemble, EPS, queries=10_000, generator=torch.Generator().manual_seed(1))
    attack(x, y)
    assert int(attack.cost.max()) <= 1 + 2 * x[0].numel()


def test_bandits_uses_a_data_prior_below_the_image_resolution(trained_ensemble, batch):
    x, y = batch
    seen: list[torch.Size] = []
    attack = Bandits(trained_ensemble, EPS, queries=10, generator=torch.Generator().manual_seed(0))
    original = attack._upsample
    attack._upsample = lambda prior, shape: (seen.append(prior.shape), original(prior, shape))[1]
    attack(x[:4], y[:4])
    assert seen and all(s[-2:] == (5, 5) for s in seen)


def test_budgets_and_eps_are_validated(trained_ensemble):
    with pytest.raises(ValueError, match="budget"):
        SignHunter(trained_ensemble, EPS, queries=0)
    with pytest.raises(ValueError, match="eps"):
        SimBA(trained_ensemble, 1.5)
    with pytest.raises(ValueError, match="loss"):
        SignHunter(trained_ensemble, EPS, loss="hinge")
