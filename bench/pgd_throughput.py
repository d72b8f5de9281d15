"""PGD-20 throughput of igat's PGD against torchattacks' PGD on the same ensemble, in one process.

Both attack the ensemble's log-probability output with the same eps, step eps/4, 20 steps and a random start.
After one untimed run of each, every repetition times igat, torchattacks and igat's PGD once more (a second,
identical instance), in an order that alternates between repetitions, so drift in machine load and any
first-or-second bias hit both alike. The result is the median over repetitions of the per-repetition ratio of
examples per second, igat / torchattacks (> 1: igat is faster), beside the same ratio of igat against itself:
the noise floor a difference has to exceed.

    .venv/bin/python -m bench.pgd_throughput                               # small CNN x 3 on 1x8x8, batch 500
    .venv/bin/python -m bench.pgd_throughput --arch resnet20 --dataset cifar10 --batch 128
    .venv/bin/python -m bench.pgd_throughput --write BENCHMARKS.md           # also (re)write its section there
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

SECTION_START = "<!-- bench/pgd_throughput.py: start -->"
SECTION_END = "<!-- bench/pgd_throughput.py: end -->"


def build(arch: str, members: int, dataset: str, device: torch.device, seed: int = 0):
    from igat_core.data import dataset_info
    from igat_core.ensemble import Ensemble
    from igat_core.models import ModelConfig

    info = dataset_info(dataset)
    config = ModelConfig(arch, info.num_classes, info.channels, info.height, info.width, info.mean, info.std,
                         width=16 if arch == "small_cnn" else 32, dataset=dataset)
    torch.manual_seed(seed)
    return Ensemble(config, members).to(device).eval(), info


def timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


ORDERS = (("igat", "torchattacks", "igat again"), ("igat again", "torchattacks", "igat"))


def measure(args: argparse.Namespace) -> dict:
    import torchattacks

    from igat_core.attacks import PGD

    device = torch.device(args.device)
    model, info = build(args.arch, args.members, args.dataset, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, info.channels, info.height, info.width, generator=generator).to(device)
    labels = torch.randint(0, info.num_classes, (args.batch,), generator=generator).to(device)
    ours, again = (PGD(model, args.eps, args.eps / 4, 20, random_start=True,
                       generator=torch.Generator().manual_seed(1)) for _ in range(2))
    theirs = torchattacks.PGD(model, eps=args.eps, alpha=args.eps / 4, steps=20, random_start=True)
    runs = {"igat": lambda: ours(images, labels), "torchattacks": lambda: theirs(images, labels),
            "igat again": lambda: again(images, labels)}
    for run in runs.values():
        timed(run, device)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.reps):
        for name in ORDERS[rep % 2]:
            seconds[name].append(timed(runs[name], device))
    ratios = [t / o for o, t in zip(seconds["igat"], seconds["torchattacks"])]
    noise = [t / o for o, t in zip(seconds["igat"], seconds["igat again"])]
    return {
        "igat": args.batch / statistics.median(seconds["igat"]),
        "torchattacks": args.batch / statistics.median(seconds["torchattacks"]),
        "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
        "noise": statistics.median(noise), "noise_low": min(noise), "noise_high": max(noise),
        "setting": (f"{args.arch} members, N = {args.members}; images {info.channels}x{info.height}x{info.width} "
                    f"({args.dataset} shape, random pixels); batch {args.batch}; eps {args.eps:.4f}, step eps/4, "
                    f"20 steps, random start; device {device}; torch {torch.__version__}, torchattacks "
                    f"{torchattacks.__version__}, {torch.get_num_threads()} threads, "
                    f"{platform.processor() or platform.machine()}; {args.reps} repetitions in alternating order "
                    f"after 1 warm-up each; load average at the end {os.getloadavg()[0]:.1f}"),
    }


INTRO = "\n".join([
    "## PGD-20 throughput against torchattacks (bench/pgd_throughput.py)", "",
    "Examples per second of `igat_core.attacks.PGD` and `torchattacks.PGD` on the same ensemble (its "
    "log-probability output), same process, repetitions in alternating order. The ratio is the median of the "
    "per-repetition ratios igat / torchattacks (> 1: igat faster); the A/A ratio is igat against a second, "
    "identical igat PGD timed in the same repetitions, the noise floor of the first. The machine is shared, so "
    "the absolute numbers move with its load. Each table starts with the command that made it.",
])
RUN_SEPARATOR = "\n\n<!-- run -->\n"


def render(result: dict, command: str) -> str:
    return "\n".join([
        f"`{command}`", "", result["setting"] + ".", "",
        "| igat ex/s | torchattacks ex/s | ratio (median) | ratio range | A/A ratio (median) | A/A range |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {result['igat']:.1f} | {result['torchattacks']:.1f} | {result['ratio']:.3f} | "
        f"{result['low']:.3f} - {result['high']:.3f} | {result['noise']:.3f} | "
        f"{result['noise_low']:.3f} - {result['noise_high']:.3f} |",
    ])


def write_section(path: Path, block: str, start: str = SECTION_START, end: str = SECTION_END,
                  intro: str = INTRO) -> None:
    """(Re)write the section of `path` between the marks `start` and `end` (this script's by default): the block
    for the same command is replaced, others are kept, and the section starts with `intro`."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        inside, after = rest.split(end, 1)
        blocks = inside.strip("\n").split(RUN_SEPARATOR)[1:]
    else:
        before, after, blocks = text.rstrip("\n") + "\n\n", "\n", []
    command = block.splitlines()[0]
    blocks = [b for b in blocks if b.splitlines()[0] != command] + [block]
    section = RUN_SEPARATOR.join([intro, *blocks])
    path.write_text(f"{before}{start}\n{section}\n{end}{after}")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran `module` with `argv` (the process's own when None), less `--write PATH`."""
    given = list(argv if argv is not None else sys.argv[1:])
    if "--write" in given:
        del given[given.index("--write"):given.index("--write") + 2]
    return shlex.join([".venv/bin/python", "-m", module, *given])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", default="small_cnn", choices=["small_cnn", "resnet20", "mlp"])
    parser.add_argument("--dataset", default="digits", help="only its image shape and class count are used")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--write", type=Path, help="Markdown file whose PGD-throughput section is (re)written")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    section = render(result, command_line("bench.pgd_throughput", argv))
    print(section)
    if args.write is not None:
        write_section(args.write, section)
    return result


if __name__ == "__main__":
    main()
