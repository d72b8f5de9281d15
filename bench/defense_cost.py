"""Training cost of each base method per batch, relative to plain ensemble training, measured in one process.

One "batch" is the method's loss, backward and optimiser step on random images of the given shape (the cost does
not depend on the pixel values). Each method runs `--warmup` untimed batches and then `--batches` timed ones;
the median seconds per batch is divided by plain training's median, which is measured before and after the other
methods (the mean of the two), so a drift in machine load shows up as the two plain numbers disagreeing.

    .venv/bin/python -m bench.defense_cost                       # ResNet-20, 3x32x32, batch 128, N = 3
    .venv/bin/python -m bench.defense_cost --threads 1 --batch 32  # steadier on a shared 2-core machine
    .venv/bin/python -m bench.defense_cost --arch small_cnn --width 16 --shape 1,28,28 --members 4
    .venv/bin/python -m bench.defense_cost --write BENCHMARKS.md  # also (re)write this script's section there
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from igat_core.defenses import build_method
from igat_core.ensemble import Ensemble
from igat_core.models import ModelConfig
from igat_core.train import TrainConfig, make_optimizer

SECTION_START = "<!-- bench/defense_cost.py: start -->"
SECTION_END = "<!-- bench/defense_cost.py: end -->"

#: (row label, method name, params): the authors' defaults; DVERGE at its cheapest and dearest layer
CASES: list[tuple[str, str, dict]] = [
    ("plain", "plain", {}),
    ("pgd_at (PGD-10 per member)", "pgd_at", {"steps": 10}),
    ("adp", "adp", {}),
    ("gal", "gal", {}),
    ("dverge, layer 1", "dverge", {"layer": 1}),
    ("dverge, logits layer", "dverge", {"layer": -1}),
    ("dverge, logits layer, round_robin", "dverge", {"layer": -1, "pairs": "round_robin"}),
    ("trs (plus_adv, 6 steps)", "trs", {}),
    ("soe (plus_adv, PGD-10 on the routed system)", "soe", {}),
    ("cldl", "cldl", {}),
]


def seconds_per_batch(name: str, params: dict, config: ModelConfig, members: int, x: torch.Tensor,
                      y: torch.Tensor, warmup: int, batches: int, optimizer: str) -> float:
    if params.get("layer") == -1:
        params = {**params, "layer": Ensemble(config, 1).members[0].num_feature_layers}
    method = build_method(name, params)
    torch.manual_seed(0)
    ensemble = Ensemble(method.configure_model(config), members).to(x.device).train()
    method.setup(ensemble)
    method.to(x.device)
    opt, _ = make_optimizer(ensemble, TrainConfig(epochs=1, lr=1e-3, optimizer=optimizer), method.parameters())
    generator = torch.Generator().manual_seed(0)
    method.start_epoch(ensemble, 1, 1, generator)
    times = []
    for i in range(warmup + batches):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = method.loss(ensemble, x, y, generator)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20", choices=["resnet20", "small_cnn", "mlp"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--shape", default="3,32,32", help="C,H,W of the images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); one thread "
                        "keeps a shared machine's contention out of the ratios")
    parser.add_argument("--only", default="", help="comma-separated row labels' method names to run (plain always)")
    parser.add_argument("--write", type=Path, help="Markdown file whose defense-cost section is (re)written")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    c, h, w = (int(v) for v in args.shape.split(","))
    config = ModelConfig(args.arch, args.classes, c, h, w, (0.5,) * c, (0.25,) * c, "relu", args.width)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, c, h, w, generator=g).to(args.device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
    only = {m for m in args.only.split(",") if m}
    cases = [case for case in CASES if not only or case[1] in only or case[1] == "plain"]

    def measure(label: str, name: str, params: dict) -> float:
        seconds = seconds_per_batch(name, params, config, args.members, x, y, args.warmup, args.batches,
                                    args.optimizer)
        print(f"{label:48s} {seconds:8.3f} s/batch", file=sys.stderr, flush=True)
        return seconds

    plain_before = measure("plain (before)", "plain", {})
    results = [(label, measure(label, name, params)) for label, name, params in cases if name != "plain"]
    plain_after = measure("plain (after)", "plain", {})
    plain = (plain_before + plain_after) / 2

    given = list(argv if argv is not None else sys.argv[1:])
    if "--write" in given:
        del given[given.index("--write"):given.index("--write") + 2]
    command = " ".join(["python -m bench.defense_cost", *given])
    model = "ResNet-20" if args.arch == "resnet20" else f"{args.arch} (width {args.width})"
    lines = [
        f"`{command}`",
        "",
        f"{model} members, N = {args.members}; images {c}x{h}x{w}; batch {args.batch}; {args.optimizer}; device "
        f"{args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; "
        f"median of {args.batches} timed batches after {args.warmup} warm-up; load average at the end "
        f"{os.getloadavg()[0]:.1f}.",
        "",
        "| method (authors' defaults) | s / batch | x plain |",
        "|---|---:|---:|",
        f"| plain (before / after the others) | {plain_before:.3f} / {plain_after:.3f} | 1.0 |",
        *(f"| {label} | {seconds:.3f} | {seconds / plain:.1f} |" for label, seconds in results),
    ]
    table = "\n".join(lines)
    print(table)
    if args.write is not None:
        write_section(args.write, table)
    return table


HEADER = """## Base-method training cost (bench/defense_cost.py)

Seconds per training batch (loss, backward, optimiser step) of each base method with its authors' defaults, and
the ratio to plain ensemble training measured in the same process on the same machine. The machine is shared, so
absolute seconds move with its load; the ratios are the result. Each table starts with the command that made it."""


def write_section(path: Path, table: str) -> None:
    """Put `table` into this script's section of `path` (replacing a table made by the same command); the rest
    of the file is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_START in text:
        before, rest = text.split(SECTION_START, 1)
        body, after = rest.split(SECTION_END, 1)
    else:
        before, body, after = text.rstrip("\n") + "\n\n", "", "\n"
    tables = [t.strip() for t in re.split(r"\n(?=`python -m bench\.defense_cost)", "\n" + body) if
              t.strip().startswith("`python")]
    command = table.splitlines()[0]
    tables = [t for t in tables if t.splitlines()[0] != command] + [table]
    section = "\n\n".join([HEADER, *tables])
    path.write_text(f"{before}{SECTION_START}\n{section}\n{SECTION_END}{after}")


if __name__ == "__main__":
    main()
