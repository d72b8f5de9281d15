"""Cost of each ensemble-aware attack relative to PGD-20 on the same ensemble, in one process.

The ensemble: `--members` small CNNs, trained for `--epochs` epochs of plain cross-entropy per member on the
training split of `--dataset` (`--epochs 0` leaves them random); every case attacks the same first `--batch` test
examples. After one untimed run of each case, the repetitions interleave them (PGD-20, MORA, ..., PGD-20, ...) so
drift in machine load hits all alike. Per case: seconds per example (median over repetitions) and its ratio to
PGD-20 (median of the per-repetition ratios), gradients per example (the attack's `cost`, mean over examples and
repetitions) and its ratio to PGD-20's 20, and the accuracy under the attack. The attacks that stop on an example
once it is broken (MORA, the logit surrogates after their first) cost less the weaker the ensemble: read the
ratios with the accuracy beside them. The default eps 0.1 leaves about half of the digits standing under PGD-20
(at 8/255 nearly all of them stand, at 0.2 nearly none).

    .venv/bin/python -m bench.attack_cost --threads 1             # 3 small CNNs on digits, 100 examples
    .venv/bin/python -m bench.attack_cost --threads 1 --epochs 0  # random members
    .venv/bin/python -m bench.attack_cost --write BENCHMARKS.md   # also (re)write its section there
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.pgd_throughput import build, command_line, timed, write_section
from igat_core.attacks import MORA, PGD, Attack, LogitPGD, Transfer, TransferSource
from igat_core.data import load_dataset
from igat_core.ensemble import Ensemble

SECTION_START = "<!-- bench/attack_cost.py: start -->"
SECTION_END = "<!-- bench/attack_cost.py: end -->"
TRAIN_BATCH = 64
TRAIN_LR = 1e-3
INDEPENDENT_SEED = 1


@dataclass
class Target:
    """What every case attacks: the ensemble at `eps`; `independent` trains, on first use, another ensemble of the
    same architecture and data from another seed (a transfer attack's source)."""

    model: Ensemble
    eps: float
    args: argparse.Namespace

    @cached_property
    def independent(self) -> Ensemble:
        return trained_ensemble(self.args, INDEPENDENT_SEED)


class FirstScoredTransfer(Transfer):
    """The transfer attack with an empty source memory at each call: what the first model scored pays (making the
    examples on the source); every further model is scored on the remembered examples."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.source = TransferSource(self.source.model, self.source.step, self.source.steps, self.source.mim_decay)
        return super().forward(images, labels)


def transfer(cls: type[Transfer]) -> Callable[[Target, torch.Generator], Attack]:
    return lambda t, g: cls(t.model, t.eps, TransferSource(t.independent.with_combiner("average").eval(), t.eps / 4,
                                                           20))


#: (row label, the attack on a Target with its own generator). The first is the reference every ratio divides by;
#: one line adds a case.
CASES: list[tuple[str, Callable[[Target, torch.Generator], Attack]]] = [
    ("PGD-20 (reference; step eps/4, random start)",
     lambda t, g: PGD(t.model, t.eps, t.eps / 4, 20, random_start=True, generator=g)),
    ("mora, authors' defaults (100 steps x 5 restarts)", lambda t, g: MORA(t.model, t.eps, 100, 5, generator=g)),
    ("mora, cheap (20 steps x 1 restart)", lambda t, g: MORA(t.model, t.eps, 20, 1, generator=g)),
    ("logit_pgd (PGD-20 on the mean logits, then on each member)",
     lambda t, g: LogitPGD(t.model, t.eps, t.eps / 4, 20, generator=g)),
    ("transfer, first model scored (PGD-20 and MIM-20 made on an independent ensemble)", transfer(FirstScoredTransfer)),
    ("transfer, every further model (the remembered examples scored)", transfer(Transfer)),
]


def trained_ensemble(args: argparse.Namespace, seed: int) -> Ensemble:
    """`args.members` members from `seed`, each trained `args.epochs` epochs with cross-entropy on its logits."""
    model, _ = build(args.arch, args.members, args.dataset, torch.device(args.device), seed)
    train = load_dataset(args.dataset, "train")
    images, labels = train.images.to(args.device), train.labels.to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.epochs):
        for index in torch.randperm(len(labels), generator=generator).split(TRAIN_BATCH):
            logits = model.member_logits(images[index])
            loss = F.cross_entropy(logits.flatten(0, 1), labels[index].repeat(len(logits)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def run_case(attack: Attack, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[float, float,
                                                                                                         float]:
    """(seconds, gradients per example, accuracy %) of one call of `attack`."""
    adv: list[torch.Tensor] = []
    seconds = timed(lambda: adv.append(attack(images, labels)), device)
    assert attack.cost is not None
    with torch.no_grad():
        accuracy = 100.0 * (attack.model(adv[0]).argmax(dim=1) == labels).float().mean().item()
    return seconds, attack.cost.double().mean().item(), accuracy


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    target = Target(trained_ensemble(args, 0), args.eps, args)
    test = load_dataset(args.dataset, "test")
    images, labels = test.images[:args.batch].to(device), test.labels[:args.batch].to(device)
    attacks = {label: make(target, torch.Generator().manual_seed(i)) for i, (label, make) in enumerate(CASES)}
    for attack in attacks.values():
        run_case(attack, images, labels, device)
    runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in attacks}
    for _ in range(args.reps):
        for label, attack in attacks.items():
            runs[label].append(run_case(attack, images, labels, device))
    with torch.no_grad():
        natural = 100.0 * (target.model(images).argmax(dim=1) == labels).float().mean().item()
    return {"rows": summarize(runs, len(labels)), "natural": natural, "n": len(labels),
            "setting": setting(args, device)}


def summarize(runs: dict[str, list[tuple[float, float, float]]], n: int) -> list[dict]:
    """Per case: seconds per example, gradients per example, accuracy, and the ratios to the first case."""
    reference = next(iter(runs.values()))
    reference_gradients = statistics.fmean(g for _, g, _ in reference)
    rows = []
    for label, found in runs.items():
        gradients = statistics.fmean(g for _, g, _ in found)
        rows.append({"label": label, "seconds": statistics.median(s for s, _, _ in found) / n,
                     "time_ratio": statistics.median(s / r for (s, _, _), (r, _, _) in zip(found, reference)),
                     "gradients": gradients, "gradient_ratio": gradients / reference_gradients,
                     "accuracy": statistics.fmean(a for _, _, a in found)})
    return rows


def setting(args: argparse.Namespace, device: torch.device) -> str:
    members = f"{args.epochs} epochs of cross-entropy per member" if args.epochs else "random (untrained)"
    return (f"{args.arch} members, N = {args.members}, {members}; the first {args.batch} {args.dataset} test "
            f"examples; eps {args.eps:.4f}; device {device}; torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, {platform.processor() or platform.machine()}; {args.reps} interleaved repetitions after 1 "
            f"warm-up each; load average at the end {os.getloadavg()[0]:.1f}")


INTRO = "\n".join([
    "## Ensemble-aware attacks' cost relative to PGD-20 (bench/attack_cost.py)", "",
    "Seconds and gradients per example of each ensemble-aware attack against PGD-20 on the same ensemble and "
    "examples, same process, interleaved repetitions; the time ratio is the median of the per-repetition ratios. "
    "Attacks that stop on a broken example cost less on a weaker ensemble, so the accuracy under each attack "
    "stands beside its cost. Gradients are counted as each attack's `cost` counts them: one per example and "
    "step on whichever model the step differentiates (a single member's for the logit surrogates after the "
    "first), so they overstate the logit surrogates' share against time. Each table starts with the command that "
    "made it.",
])


def render(result: dict, command: str) -> str:
    return "\n".join([
        f"`{command}`", "", f"{result['setting']}; natural accuracy {result['natural']:.1f} %.", "",
        "| attack | ms / example | x PGD-20 (time) | gradients / example | x PGD-20 (gradients) | accuracy (%) |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {r['label']} | {1000 * r['seconds']:.2f} | {r['time_ratio']:.2f} | {r['gradients']:.1f} | "
          f"{r['gradient_ratio']:.2f} | {r['accuracy']:.1f} |" for r in result["rows"]),
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", default="small_cnn", choices=["small_cnn", "resnet20", "mlp"])
    parser.add_argument("--dataset", default="digits", help="an offline dataset: digits, mnist5k, synthetic")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the members (0: random)")
    parser.add_argument("--batch", type=int, default=100, help="test examples attacked")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--eps", type=float, default=0.1, help="0.1: PGD-20 leaves about half the digits standing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--write", type=Path, help="Markdown file whose attack-cost section is (re)written")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    section = render(result, command_line("bench.attack_cost", argv))
    print(section)
    if args.write is not None:
        write_section(args.write, section, SECTION_START, SECTION_END, INTRO)
    return result


if __name__ == "__main__":
    main()
