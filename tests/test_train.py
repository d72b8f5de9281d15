"""The training loop: it learns, checkpoints every epoch, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import torch

from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble
from igat_core.igat import IgatConfig, IgatObjective
from igat_core.train import TrainConfig, batch_indices, fit
from tests.conftest import digits_config


def fresh_ensemble(width: int = 8) -> Ensemble:
    torch.manual_seed(3)
    return Ensemble(digits_config(width=width), members=2)


def weights(ensemble: Ensemble) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in ensemble.parameters()])


def test_loss_falls_and_lr_follows_the_milestones(digits_train, tmp_path):
    calls = []
    config = TrainConfig(epochs=4, batch_size=32, lr=0.1, milestones=(3, 4), gamma=0.1)
    result = fit(fresh_ensemble(width=16), Plain(), digits_train, config, tmp_path, progress=False,
                 report=lambda m, d: calls.append((m, d)))
    losses = [m["loss"] for m in result.history]
    assert losses[-1] < losses[0] * 0.5
    assert [round(m["lr"], 6) for m in result.history] == [0.1, 0.1, 0.1, 0.01]
    assert [m["epoch"] for m, _ in calls] == [1, 2, 3, 4] and calls[0][1] == tmp_path
    assert (tmp_path / "last.pt").exists()


def test_resumed_training_matches_uninterrupted_training(digits_train, tmp_path):
    objective = IgatObjective(Plain(), IgatConfig(eps=0.1, step=0.05, steps=2))
    subset = type(digits_train)(digits_train.images[:256], digits_train.labels[:256], digits_train.info)
    full = fresh_ensemble()
    fit(full, objective, subset, TrainConfig(epochs=3, batch_size=64, lr=0.05, milestones=(2,)), tmp_path / "a",
        progress=False)
    interrupted = fresh_ensemble()
    fit(interrupted, objective, subset, TrainConfig(epochs=2, batch_size=64, lr=0.05, milestones=(2,)),
        tmp_path / "b", progress=False)
    resumed = fresh_ensemble()
    result = fit(resumed, objective, subset, TrainConfig(epochs=3, batch_size=64, lr=0.05, milestones=(2,)),
                 tmp_path / "b", progress=False)
    assert result.epochs_run == 1 and result.history[0]["epoch"] == 3
    assert torch.allclose(weights(resumed), weights(full), atol=1e-6)


def test_batches_shard_the_permutation_across_workers():
    g = torch.Generator().manual_seed(0)
    whole = torch.cat(batch_indices(10, 4, g, 0, 1))
    parts = [torch.cat(batch_indices(10, 4, torch.Generator().manual_seed(0), r, 2)) for r in (0, 1)]
    assert sorted(whole.tolist()) == list(range(10))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert set(parts[0].tolist()).isdisjoint(parts[1].tolist())
