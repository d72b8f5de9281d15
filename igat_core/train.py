"""The one training loop every caller uses (the CLI runner and the Ray Train workers).

SGD with momentum and a multi-step learning-rate schedule; a checkpoint after every epoch; a rerun resumes from
the last one. Shuffling and the objective's randomness are seeded per epoch, so a resumed run draws the same
batches as an uninterrupted one. `report(metrics, checkpoint_dir)` is called after each epoch's checkpoint. A loss
that becomes NaN or infinite stops the phase at that batch, before its step, with `TrainingDiverged` (that epoch's
checkpoint is not written: the last one holds finite weights). `precision: bf16` runs each step's forward
passes (the objective, its attacks included) under bfloat16 autocast; evaluation never passes through here.

Data-parallel training (the Ray Train workers): every rank draws the same permutation, each global batch is
split across ranks, each rank's loss is the mean over its shard, and `gradient_sync` (for example an all-reduce
average) runs between backward and the optimiser step, so every rank takes the step of the global batch. Only
rank 0 writes checkpoints. Members are not wrapped in DDP: the objectives call ensemble methods
(member_logits, ...) that would bypass a DDP wrapper's forward.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from igat_core.data import Split, augment_crop_flip
from igat_core.defenses.base import LossOutput, MethodHooks
from igat_core.ensemble import Ensemble, atomic_torch_save, ensemble_from_checkpoint
from igat_core.progress import EventLog, TrainProgress
from igat_core.rundir import LAST_CHECKPOINT


class Objective(Protocol):
    def __call__(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput: ...


Report = Callable[[dict, Path], None]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
GradientSync = Callable[[Iterable[torch.nn.Parameter]], None]


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
    optimizer: str = "sgd"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def step_precision(precision: str, device: torch.device) -> AbstractContextManager:
    """The numeric precision of a training step's forward passes: bf16 is bfloat16 autocast on `device`'s type
    (the backward pass follows the forward's dtypes); fp32 changes nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class TrainingDiverged(RuntimeError):
    """The loss of a training phase became NaN or infinite."""

    def __init__(self, phase: str, epoch: int, batch: int, batches: int, loss: float, lr: float):
        self.phase, self.epoch, self.batch, self.batches, self.loss, self.lr = phase, epoch, batch, batches, loss, lr
        super().__init__(f"training diverged: the {phase} loss became {loss} at epoch {epoch}, batch {batch} of "
                         f"{batches}; the learning rate is likely too high (lr={lr:g}): lower it")

    def __reduce__(self):  # picklable with its fields (Ray sends a worker's exception to the driver)
        return type(self), (self.phase, self.epoch, self.batch, self.batches, self.loss, self.lr)


def divergence_in(exc: BaseException) -> TrainingDiverged | None:
    """The `TrainingDiverged` that `exc` wraps, if any (a Ray Train error carries the worker's exception as a
    cause, a ``cause`` attribute or among its ``worker_failures``), as a plain one."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        found = pending.pop()
        if not isinstance(found, BaseException) or id(found) in seen:
            continue
        seen.add(id(found))
        if isinstance(found, TrainingDiverged) and hasattr(found, "phase"):
            return TrainingDiverged(found.phase, found.epoch, found.batch, found.batches, found.loss, found.lr)
        failures = getattr(found, "worker_failures", None)
        pending += [found.__cause__, found.__context__, getattr(found, "cause", None),
                    *(failures.values() if isinstance(failures, dict) else ())]
    return None


@dataclass
class FitResult:
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63)


def make_optimizer(ensemble: Ensemble, config: TrainConfig, extra_parameters: Iterable[torch.nn.Parameter] = ()
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """One optimiser over the members and any method-owned parameters (CLDL's label-confusion model).

    `sgd` (with momentum) or `adam` (eps 1e-7, as the ADP/GAL/TRS/CLDL authors' PyTorch code).
    """
    params = [*ensemble.parameters(), *extra_parameters]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, eps=1e-7)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    return optimizer, scheduler


def load_last_checkpoint(checkpoint_dir: Path) -> dict | None:
    path = checkpoint_dir / LAST_CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def last_checkpoint_epoch(checkpoint_dir: Path) -> int:
    """The epoch of the last checkpoint (0 when none); memory-mapped, so the weights are not read."""
    path = checkpoint_dir / LAST_CHECKPOINT
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def restore_ensemble(checkpoint_dir: Path) -> Ensemble | None:
    """The ensemble saved by the last completed epoch, if any."""
    state = load_last_checkpoint(checkpoint_dir)
    return None if state is None else ensemble_from_checkpoint(state["ensemble"])


def batch_indices(n: int, batch_size: int, generator: torch.Generator, rank: int = 0,
                  world_size: int = 1) -> list[torch.Tensor]:
    """This rank's share of each batch of a seeded permutation of range(n).

    The permutation is cut into global batches of batch_size, and rank r takes elements r, r + world_size, ...
    of each, so every rank gets the same number of batches (a final batch smaller than world_size is dropped
    when world_size > 1, since some rank would get nothing).
    """
    order = torch.randperm(n, generator=generator)
    batches = order.split(max(1, batch_size))
    if world_size == 1:
        return list(batches)
    return [b[rank::world_size] for b in batches if len(b) >= world_size]


def fit(ensemble: Ensemble, objective: Objective, train: Split, config: TrainConfig, checkpoint_dir: str | Path, *,
        device: str | torch.device = "cpu", report: Report | None = None, rank: int = 0, world_size: int = 1,
        progress: bool = True, phase: str = "train", gradient_sync: GradientSync | None = None,
        events: TrainProgress | None = None) -> FitResult:
    """Train `ensemble` for config.epochs epochs, resuming from checkpoint_dir/last.pt when it exists.

    With world_size > 1 each rank trains on its shard of every global batch; `gradient_sync` is called with
    the optimised parameters after each backward pass (see the module docstring). `events` (rank 0's) gets the
    progress within each epoch; each epoch's metrics include `examples_per_s` (of the global batches).
    """
    checkpoint_dir = Path(checkpoint_dir)
    ensemble.to(device)
    hooks = objective if isinstance(objective, MethodHooks) else None
    if hooks is not None:
        hooks.setup(ensemble)
        hooks.to(device)
    optimizer, scheduler = make_optimizer(ensemble, config, hooks.parameters() if hooks is not None else ())
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    start_epoch = 0
    state = load_last_checkpoint(checkpoint_dir)
    if state is not None:
        restored = ensemble_from_checkpoint(state["ensemble"])
        ensemble.load_state_dict(restored.state_dict())
        if hooks is not None and state.get("method"):
            hooks.load_state_dict(state["method"])
            hooks.to(device)
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
        if hooks is not None:
            hooks.start_epoch(ensemble, epoch, config.epochs, generator)
        totals: dict[str, float] = {}
        seen = 0
        if events is not None:
            events.start_epoch()
        bar = tqdm(batches, desc=f"{phase} {epoch}/{config.epochs}", leave=False, disable=not progress or rank != 0)
        for number, idx in enumerate(bar, start=1):
            x, y = images[idx], labels[idx]
            if config.augment:
                x = augment_crop_flip(x, generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with step_precision(config.precision, torch.device(device)):
                out = objective(ensemble, x, y, generator)
            loss = float(out.loss.detach())
            if not math.isfinite(loss):
                bar.close()  # leaves the line the error is printed on clean
                raise TrainingDiverged(phase, epoch, number, len(batches), loss, optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if gradient_sync is not None:
                gradient_sync(parameters)
            optimizer.step()
            for key, value in {**out.metrics, "loss": loss}.items():
                totals[key] = totals.get(key, 0.0) + value * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss:.3f}")
            if events is not None:
                events.batch(epoch, number, len(batches), seen * world_size)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = {"phase": phase, "epoch": epoch, "lr": lr, **{k: v / max(seen, 1) for k, v in totals.items()}}
        metrics["seconds"] = time.perf_counter() - started
        metrics["examples_per_s"] = seen * world_size / max(metrics["seconds"], 1e-9)
        if rank == 0:
            atomic_torch_save({
                "epoch": epoch,
                "ensemble": ensemble.checkpoint_payload(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "method": hooks.state_dict() if hooks is not None else {},
            }, checkpoint_dir / LAST_CHECKPOINT)
        if report is not None:
            report(metrics, checkpoint_dir)
        result.history.append(metrics)
        result.epochs_run += 1
    return result


@dataclass
class FitRequest:
    """One training phase, as the runner hands it to a fit function (in-process, or Ray Train workers)."""

    phase: str
    ensemble: Ensemble
    objective: Objective
    train: Split
    config: TrainConfig
    checkpoint_dir: Path
    device: torch.device
    report: Report
    progress: bool = True
    log: EventLog | None = None

    def progress_events(self) -> TrainProgress | None:
        """The phase's progress events within its epochs, into `log` (none without one)."""
        return None if self.log is None else TrainProgress(self.log, self.phase, self.config.epochs)


FitFn = Callable[[FitRequest], None]


def local_fit(request: FitRequest) -> None:
    """The phase in this process; `request.ensemble` ends up trained."""
    fit(request.ensemble, request.objective, request.train, request.config, request.checkpoint_dir,
        device=request.device, report=request.report, progress=request.progress, phase=request.phase,
        events=request.progress_events())
