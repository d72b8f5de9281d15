"""The one training loop every caller uses (the CLI runner and the Ray Train workers).

SGD with momentum and a multi-step learning-rate schedule; a checkpoint after every epoch; a rerun resumes from
the last one. Shuffling and the objective's randomness are seeded per epoch, so a resumed run draws the same
batches as an uninterrupted one. `report(metrics, checkpoint_dir)` is called after each epoch's checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from igat_core.data import Split, augment_crop_flip
from igat_core.defenses.base import LossOutput
from igat_core.ensemble import Ensemble, atomic_torch_save, ensemble_from_checkpoint


class Objective(Protocol):
    def __call__(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput: ...


Report = Callable[[dict, Path], None]
LAST_CHECKPOINT = "last.pt"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: bool = False
    seed: int = 0


@dataclass
class FitResult:
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63)


def make_optimizer(ensemble: Ensemble, config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    return optimizer, scheduler


def load_last_checkpoint(checkpoint_dir: Path) -> dict | None:
    path = checkpoint_dir / LAST_CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_ensemble(checkpoint_dir: Path) -> Ensemble | None:
    """The ensemble saved by the last completed epoch, if any."""
    state = load_last_checkpoint(checkpoint_dir)
    return None if state is None else ensemble_from_checkpoint(state["ensemble"])


def batch_indices(n: int, batch_size: int, generator: torch.Generator, rank: int = 0,
                  world_size: int = 1) -> list[torch.Tensor]:
    """A seeded permutation of range(n), sharded by rank, cut into batches of batch_size // world_size."""
    order = torch.randperm(n, generator=generator)[rank::world_size]
    per_worker = max(1, batch_size // world_size)
    return list(order.split(per_worker))


def fit(ensemble: Ensemble, objective: Objective, train: Split, config: TrainConfig, checkpoint_dir: str | Path, *,
        device: str | torch.device = "cpu", report: Report | None = None, rank: int = 0, world_size: int = 1,
        progress: bool = True, phase: str = "train") -> FitResult:
    """Train `ensemble` for config.epochs epochs, resuming from checkpoint_dir/last.pt when it exists."""
    checkpoint_dir = Path(checkpoint_dir)
    ensemble.to(device)
    optimizer, scheduler = make_optimizer(ensemble, config)
    start_epoch = 0
    state = load_last_checkpoint(checkpoint_dir)
    if state is not None:
        restored = ensemble_from_checkpoint(state["ensemble"])
        ensemble.load_state_dict(restored.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
    result = FitResult(epochs_run=0)
    images, labels = train.images, train.labels
    generator = torch.Generator()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        ensemble.train()
        generator.manual_seed(epoch_seed(config.seed, epoch))
        batches = batch_indices(len(labels), config.batch_size, generator, rank, world_size)
        totals: dict[str, float] = {}
        seen = 0
        bar = tqdm(batches, desc=f"{phase} {epoch}/{config.epochs}", leave=False, disable=not progress or rank != 0)
        for idx in bar:
            x, y = images[idx], labels[idx]
            if config.augment:
                x = augment_crop_flip(x, generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = objective(ensemble, x, y, generator)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            for key, value in {**out.metrics, "loss": float(out.loss.detach())}.items():
                totals[key] = totals.get(key, 0.0) + value * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = {"phase": phase, "epoch": epoch, "lr": lr, **{k: v / max(seen, 1) for k, v in totals.items()}}
        metrics["seconds"] = time.perf_counter() - started
        if rank == 0:
            atomic_torch_save({
                "epoch": epoch,
                "ensemble": ensemble.checkpoint_payload(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }, checkpoint_dir / LAST_CHECKPOINT)
        if report is not None:
            report(metrics, checkpoint_dir)
        result.history.append(metrics)
        result.epochs_run += 1
    return result
