"""The fused member engine and bf16 against the member loop: one iGAT training step and one iGAT epoch.

Every setting trains the same iGAT objective (plain L_E, the global PGD of the paper's budget, the member pass
over cat(x, x_adv), backward, SGD step) from the same weights, in one process: `loop` (the reference, fp32),
`fused` (resources.engine: fused), `fused+bf16` (and precision: bf16), `loop+bf16`, `fused+graphs` (CUDA graphs of
the global PGD's step; CUDA only, untested before its first GPU run). Beside each time stand its equivalence to
the loop on one batch from the same weights: the largest difference of the member logits on cat(x, x_adv) and
the share of adversarial pixels equal to the loop's.

- step: median seconds of one training step over interleaved repetitions (loop, fused, ..., loop, fused, ...),
  after one untimed step each; the ratio is the median per-repetition ratio loop / setting (> 1: faster).
- epoch: one epoch over `--examples` training examples (CIFAR-10 from IGAT_DATA_ROOT when it is there, else random
  pixels of the dataset's shape), batch by batch until done or `--epoch-budget` seconds have passed; an epoch cut
  short is extrapolated from its batches and marked so.

The Markdown table is rewritten after every measurement, so a run stopped by its time limit keeps what it measured.

    .venv/bin/python -m bench.engine --smoke                      # CPU, tiny sizes: the script works
    bench/gpu.sh                                                  # the prepared GPU run (N = 8, batch 512, PGD-20)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.pgd_throughput import timed
from igat_core.data import DatasetUnavailable, Split, dataset_info, load_dataset
from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble
from igat_core.igat import GlobalBatch, IgatConfig, IgatObjective, global_batch
from igat_core.models import ModelConfig
from igat_core.train import TrainConfig, make_optimizer, step_precision

SETTINGS = ("loop", "fused", "fused+bf16", "loop+bf16", "fused+graphs")
SMOKE = {"arch": "resnet20", "members": 2, "batch": 8, "steps": 2, "examples": 16, "reps": 1, "device": "cpu"}


@dataclass
class Setting:
    name: str
    engine: str
    precision: str
    cuda_graphs: bool

    @classmethod
    def parse(cls, name: str) -> Setting:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
        return cls(name, name.split("+")[0], "bf16" if name.endswith("+bf16") else "fp32", name.endswith("graphs"))


@dataclass
class Row:
    setting: str
    step_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    logits_diff: float | None = None
    x_adv_equal: float | None = None
    epoch_s: float | None = None
    epoch_batches: str = ""
    engine_note: str = ""
    error: str = ""


class Trainer:
    """One setting's ensemble, objective and optimiser (weights copied from a shared start)."""

    def __init__(self, setting: Setting, start: Ensemble, args: argparse.Namespace, device: torch.device):
        self.setting, self.device = setting, device
        self.ensemble = copy.deepcopy(start).to(device).train()
        self.config = IgatConfig(eps=8 / 255, step=2 / 255, steps=args.steps, engine=setting.engine,
                                 cuda_graphs=setting.cuda_graphs)
        self.objective = IgatObjective(Plain(), self.config)
        self.train = TrainConfig(epochs=1, batch_size=args.batch, lr=0.01, precision=setting.precision)
        self.optimizer, _ = make_optimizer(self.ensemble, self.train)
        self.generator = torch.Generator().manual_seed(0)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with step_precision(self.setting.precision, self.device):
            out = self.objective(self.ensemble, x, y, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()

    def global_batch(self, x: torch.Tensor, y: torch.Tensor) -> GlobalBatch:
        with step_precision(self.setting.precision, self.device):
            return global_batch(self.ensemble, x, y, self.config, torch.Generator().manual_seed(5),
                                self.objective.engine)


def training_data(args: argparse.Namespace) -> tuple[Split, str]:
    try:
        split = load_dataset(args.dataset, "train", train_limit=args.examples)
        return split, f"{args.dataset} train"
    except (DatasetUnavailable, ValueError):
        info = dataset_info(args.dataset)
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(args.examples, info.channels, info.height, info.width, generator=generator)
        labels = torch.randint(0, info.num_classes, (args.examples,), generator=generator)
        return Split(images, labels, info), f"random pixels of {args.dataset}'s shape"


def start_ensemble(args: argparse.Namespace) -> Ensemble:
    info = dataset_info(args.dataset)
    config = ModelConfig(args.arch, info.num_classes, info.channels, info.height, info.width, info.mean, info.std,
                         width=16 if args.arch == "small_cnn" else 32, dataset=args.dataset)
    torch.manual_seed(0)
    return Ensemble(config, args.members)


def compare(row: Row, found: GlobalBatch, reference: GlobalBatch | None) -> None:
    """The setting's member logits on cat(x, x_adv) and its x_adv against the loop's, from the same weights."""
    if reference is not None:
        row.logits_diff = float((found.logits.detach().float() - reference.logits.detach().float()).abs().max())
        row.x_adv_equal = float((found.x_adv == reference.x_adv).float().mean())


def first_steps(rows: dict[str, Row], trainers: dict[str, Trainer], x: torch.Tensor, y: torch.Tensor) -> None:
    """Each setting's equivalence to the loop, then one untimed step; a setting that fails is dropped with its
    error in the table (an untested setting, CUDA graphs, must not stop the others)."""
    reference = trainers["loop"].global_batch(x, y) if "loop" in trainers else None
    for name in list(trainers):
        try:
            found = reference if name == "loop" else trainers[name].global_batch(x, y)
            compare(rows[name], found, reference)
            trainers[name].ensemble.zero_grad(set_to_none=True)
            trainers[name].step(x, y)
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            message = str(exc).splitlines()[0][:120] if str(exc) else ""
            rows[name].error = f"{type(exc).__name__}: {message}"
            del trainers[name]


def time_steps(rows: dict[str, Row], trainers: dict[str, Trainer], x: torch.Tensor, y: torch.Tensor, reps: int,
               device: torch.device, write: Callable[[], None]) -> None:
    for _ in range(reps):
        seconds = {name: timed(lambda t=trainer: t.step(x, y), device) for name, trainer in trainers.items()}
        for name, s in seconds.items():
            rows[name].step_s.append(s)
            if "loop" in seconds:
                rows[name].ratios.append(seconds["loop"] / s)
        write()


def time_epoch(row: Row, trainer: Trainer, data: Split, batch: int, budget_s: float, device: torch.device) -> None:
    order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(1)).split(batch)
    spent, done = 0.0, 0
    for idx in order:
        x, y = data.images[idx].to(device), data.labels[idx].to(device)
        spent += timed(lambda x=x, y=y: trainer.step(x, y), device)
        done += 1
        if spent > budget_s:
            break
    row.epoch_s = spent * len(order) / done
    row.epoch_batches = f"{done} of {len(order)} batches" + ("" if done == len(order) else ", extrapolated")


def render(rows: dict[str, Row], setting_line: str, command: str) -> str:
    lines = [f"`{command}`", "", setting_line + ".", "",
             "| setting | s / step (median) | x loop (median, range) | max abs diff logits | x_adv equal | "
             "s / epoch | engine |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows.values():
        if row.error:
            lines.append(f"| {row.setting} | failed: {row.error} | | | | | |")
            continue
        step = f"{statistics.median(row.step_s):.4f}" if row.step_s else ""
        ratio = (f"{statistics.median(row.ratios):.2f} ({min(row.ratios):.2f} - {max(row.ratios):.2f})"
                 if row.ratios else "")
        diff = "" if row.logits_diff is None else f"{row.logits_diff:.2e}"
        equal = "" if row.x_adv_equal is None else f"{100 * row.x_adv_equal:.2f} %"
        epoch = "" if row.epoch_s is None else f"{row.epoch_s:.1f} ({row.epoch_batches})"
        lines.append(f"| {row.setting} | {step} | {ratio} | {diff} | {equal} | {epoch} | {row.engine_note} |")
    return "\n".join(lines)


def engine_note(trainer: Trainer) -> str:
    engine = trainer.objective.engine
    if engine.kind == "loop":
        return "loop"
    fallbacks = "; ".join(f"{site}: {reason}" for site, reason in engine.fallbacks.items())
    return "fused" + (f" (loop where: {fallbacks})" if fallbacks else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", default="resnet20", choices=["small_cnn", "resnet20", "mlp"])
    parser.add_argument("--dataset", default="cifar10", help="its shape and classes; its data when it is there")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="PGD steps of the global attack")
    parser.add_argument("--examples", type=int, default=50_000, help="training examples of the timed epoch")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the timed step")
    parser.add_argument("--epoch-budget", type=float, default=120.0, help="seconds per setting's epoch, at most")
    parser.add_argument("--settings", default="loop,fused,fused+bf16", help=f"comma-separated, of {SETTINGS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes on the CPU: {SMOKE}")
    parser.add_argument("--out", type=Path, default=Path("bench/out/engine.md"), help="the Markdown table")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data, source = training_data(args)
    start = start_ensemble(args)
    settings = [Setting.parse(name) for name in args.settings.split(",")]
    rows = {s.name: Row(s.name) for s in settings}
    trainers = {setting.name: Trainer(setting, start, args, device) for setting in settings}
    command = shlex.join(["python", "-m", "bench.engine", *(argv if argv is not None else sys.argv[1:])])
    setting_line = (f"{args.arch} members, N = {args.members}; {len(data.labels)} training images "
                    f"{data.info.channels}x{data.info.height}x{data.info.width} ({source}); batch {args.batch}; "
                    f"iGAT with plain L_E, global PGD-{args.steps} (eps 8/255, step 2/255); SGD lr 0.01; device "
                    f"{device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}; torch "
                    f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; {args.reps} "
                    f"interleaved step repetitions after 1 warm-up; epoch budget {args.epoch_budget:g} s per setting")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        args.out.write_text(render(rows, setting_line, command) + "\n")

    x, y = data.images[:args.batch].to(device), data.labels[:args.batch].to(device)
    first_steps(rows, trainers, x, y)
    write()
    time_steps(rows, trainers, x, y, args.reps, device, write)
    for name, trainer in trainers.items():
        time_epoch(rows[name], trainer, data, args.batch, args.epoch_budget, device)
        rows[name].engine_note = engine_note(trainer)
        write()
    print(render(rows, setting_line, command))
    print(f"load average at the end {os.getloadavg()[0]:.1f}; table in {args.out}")
    return rows


if __name__ == "__main__":
    main()
