"""One iGAT training step and its parts against the member-loop reference, in one process, from the same weights.

`igat` is the step as igat_core runs it with its two speed switches on (`resources.channels_last`: members and
inputs channels_last; `igat.reuse_natural_pass`: the natural half's logits kept from L_E's pass where the members
have no batch statistics; both off by default, as they change results at float round-off) and the PGD loop of
igat_core.attacks.pgd (always on: bit-exact). `reference` is the plain loop over members
as it ran before those changes: NCHW members, a second pass over the natural examples in the cat(x, x_adv)
forward, and the PGD loop that projects with `project_linf` each step (`ReferencePGD`). Both are copies of one
freshly initialised ensemble and see the same batch and generator seed. One step is L_E (the base loss), the
global PGD, the training forward (the cat(x, x_adv) pass and iGAT's terms) and the backward pass; no optimiser
step, so every repetition starts from the same weights. After one untimed step of each, the repetitions
interleave the two; each ratio is the median over repetitions of reference seconds / igat seconds (> 1: igat
faster). Beside it, the largest absolute difference between the two variants' outputs on the first repetition.

    .venv/bin/python -m bench.igat_step                          # the CPU protocol shape, then the paper's
    .venv/bin/python -m bench.igat_step --shape paper --batch 16 --reps 3 --threads 1
    .venv/bin/python -m bench.igat_step --shape cpu --nchw        # the wins other than channels_last, alone
    .venv/bin/python -m bench.igat_step --write BENCHMARKS.md    # also (re)write this script's section there
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from bench.pgd_throughput import write_section as write_marked_section
from igat_core import engine, igat
from igat_core.attacks import PGD
from igat_core.attacks.base import project_linf
from igat_core.defenses import build_method
from igat_core.ensemble import Ensemble
from igat_core.igat import GlobalBatch, IgatConfig, IgatObjective
from igat_core.models import ModelConfig

SECTION_START = "<!-- bench/igat_step.py: start -->"
SECTION_END = "<!-- bench/igat_step.py: end -->"
PARTS = ("global PGD", "L_E", "training forward", "backward", "step")


@dataclass(frozen=True)
class Shape:
    arch: str
    width: int
    members: int
    image: tuple[int, int, int]
    batch: int
    steps: int
    eps: float
    step: float
    label: str


SHAPES = {
    "cpu": Shape("small_cnn", 16, 4, (1, 28, 28), 128, 10, 0.2, 0.05, "the CPU protocol (examples/adp.yaml)"),
    "paper": Shape("resnet20", 32, 8, (3, 32, 32), 64, 20, 8 / 255, 2 / 255, "the paper's CIFAR-10 setting"),
}


class ReferencePGD(PGD):
    """igat's PGD loop before its in-place update and precomputed projection box (the reference's attack)."""

    def _one_run(self, images: torch.Tensor, labels: torch.Tensor, run: int = 0) -> torch.Tensor:
        x = images
        if self.random_start:
            noise = torch.rand(images.shape, generator=self.generator, device="cpu").to(images.device)
            x = (images + (2 * noise - 1) * self.eps).clamp(0.0, 1.0)
        for _ in range(self.steps):
            x = x.detach().requires_grad_(True)
            grad, = torch.autograd.grad(self.loss(self.model(x), labels), x)
            x = project_linf(x.detach() + self.step * grad.sign(), images, self.eps)
        return x.detach()


@dataclass
class Variant:
    name: str
    ensemble: Ensemble
    objective: IgatObjective
    attack: type[PGD]


@dataclass
class StepRecord:
    seconds: dict[str, float]
    loss: torch.Tensor
    base_loss: torch.Tensor
    batch: GlobalBatch
    grads: list[torch.Tensor]
    bn_stats: list[torch.Tensor] = field(default_factory=list)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_call(run: Callable, seconds: list[float], device: torch.device) -> Callable:
    def call(*args, **kwargs):
        start = clock(device)
        result = run(*args, **kwargs)
        seconds.append(clock(device) - start)
        return result
    return call


def timed_attack(attack: type[PGD], seconds: list[float], device: torch.device) -> type[PGD]:
    class Timed(attack):  # type: ignore[valid-type, misc]
        def __call__(self, images, labels, step=None):
            return timed_call(super().__call__, seconds, device)(images, labels, step)
    return Timed


def recorded(run: Callable, results: list) -> Callable:
    def call(*args, **kwargs):
        results.append(run(*args, **kwargs))
        return results[-1]
    return call


def run_step(v: Variant, x: torch.Tensor, y: torch.Tensor, seed: int) -> StepRecord:
    """One instrumented step of `v`: its objective's call (L_E, global PGD, training forward), then backward."""
    device = x.device
    pgd: list[float] = []
    base: list[float] = []
    batches: list[GlobalBatch] = []
    base_losses: list = []
    v.ensemble.zero_grad(set_to_none=True)
    with mock.patch.object(engine, "PGD", timed_attack(v.attack, pgd, device)), \
            mock.patch.object(igat, "global_batch", recorded(igat.global_batch, batches)), \
            mock.patch.object(v.objective.base, "loss", recorded(timed_call(v.objective.base.loss, base, device),
                                                                 base_losses)):
        start = clock(device)
        out = v.objective(v.ensemble, x, y, torch.Generator().manual_seed(seed))
        forward_done = clock(device)
    out.loss.backward()
    end = clock(device)
    seconds = {"global PGD": sum(pgd), "L_E": sum(base),
               "training forward": forward_done - start - sum(pgd) - sum(base),
               "backward": end - forward_done, "step": end - start}
    grads = [p.grad.detach().clone() for p in v.ensemble.parameters() if p.grad is not None]
    stats = [b.detach().clone() for name, b in v.ensemble.named_buffers() if "running" in name]
    return StepRecord(seconds, out.loss.detach(), base_losses[0].loss.detach(), batches[0], grads, stats)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if not a:
        return float("nan")
    return max(float((p.detach().float() - q.detach().float()).abs().max()) for p, q in zip(a, b, strict=True))


def equivalence(ours: StepRecord, ref: StepRecord) -> dict[str, str]:
    """Per part, the largest absolute differences igat - reference on what that part produces."""
    d = {
        "x_adv": max_diff([ours.batch.x_adv], [ref.batch.x_adv]),
        "L_E": max_diff([ours.base_loss], [ref.base_loss]),
        "logits": max_diff([ours.batch.logits], [ref.batch.logits]),
        "loss": max_diff([ours.loss], [ref.loss]),
        "grads": max_diff(ours.grads, ref.grads),
        "BN stats": max_diff(ours.bn_stats, ref.bn_stats),
    }
    shown = {k: ("n/a (no BN)" if v != v else f"{v:.2e}") for k, v in d.items()}
    moved = float((ours.batch.x_adv != ref.batch.x_adv).float().mean())
    return {"global PGD": f"x_adv {shown['x_adv']} ({moved:.2%} of the pixels differ)", "L_E": f"L_E {shown['L_E']}",
            "training forward": f"member logits on cat(x, x_adv) {shown['logits']}, loss {shown['loss']}",
            "backward": f"parameter gradients {shown['grads']}",
            "step": f"loss {shown['loss']}; BN running statistics {shown['BN stats']}"}


def variants(shape: Shape, base: str, channels_last: bool, device: torch.device) -> list[Variant]:
    c, h, w = shape.image
    config = ModelConfig(shape.arch, 10, c, h, w, (0.5,) * c, (0.25,) * c, "relu", shape.width)
    torch.manual_seed(0)
    reference = Ensemble(config, shape.members, channels_last=False).to(device).train()
    ours = copy.deepcopy(reference)
    ours.use_channels_last(channels_last)
    igat_config = IgatConfig(eps=shape.eps, step=shape.step, steps=shape.steps, reuse_natural_pass=True)
    off = IgatConfig(eps=shape.eps, step=shape.step, steps=shape.steps, reuse_natural_pass=False)
    return [Variant("igat", ours, IgatObjective(build_method(base, {}), igat_config), PGD),
            Variant("reference", reference, IgatObjective(build_method(base, {}), off), ReferencePGD)]


def measure(shape: Shape, base: str, reps: int, channels_last: bool, device: torch.device) -> dict:
    ours, ref = variants(shape, base, channels_last, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape.batch, *shape.image, generator=g).to(device)
    y = torch.randint(0, 10, (shape.batch,), generator=g).to(device)
    first = {v.name: run_step(v, x, y, seed=1) for v in (ours, ref)}
    seconds: dict[str, list[dict[str, float]]] = {"igat": [], "reference": []}
    for _ in range(reps):
        for v in (ours, ref):
            seconds[v.name].append(run_step(v, x, y, seed=1).seconds)
    ratios = {p: [r[p] / o[p] for o, r in zip(seconds["igat"], seconds["reference"])] for p in PARTS}
    return {"seconds": {name: {p: statistics.median(s[p] for s in runs) for p in PARTS}
                        for name, runs in seconds.items()},
            "ratios": ratios, "equivalence": equivalence(first["igat"], first["reference"]),
            "kept": ours.ensemble.batch_independent}


def setting(shape: Shape, base: str, reps: int, channels_last: bool, device: torch.device) -> str:
    c, h, w = shape.image
    model = "ResNet-20" if shape.arch == "resnet20" else f"{shape.arch} (width {shape.width})"
    layout = "channels_last" if channels_last else "NCHW (as the reference: the other wins alone)"
    return (f"{shape.label}: {model} members, N = {shape.members}; igat members {layout}; images {c}x{h}x{w} "
            f"(random pixels); batch {shape.batch}; base loss {base}; global PGD-{shape.steps}, eps {shape.eps:.4f}, "
            f"step {shape.step:.4f}, random start; device {device}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; {reps} interleaved "
            f"repetitions after 1 warm-up each; load average at the end {os.getloadavg()[0]:.1f}")


def render(result: dict, command: str, described: str) -> str:
    s, rows = result["seconds"], []
    kept = "kept from L_E's pass" if result["kept"] else "run again in cat(x, x_adv) (BatchNorm in train mode)"
    described = f"{described}; igat's natural half of the training forward {kept}"
    for part in PARTS:
        r = result["ratios"][part]
        rows.append(f"| {part} | {s['igat'][part]:.3f} | {s['reference'][part]:.3f} | {statistics.median(r):.3f} | "
                    f"{min(r):.3f} - {max(r):.3f} | {result['equivalence'][part]} |")
    return "\n".join([f"`{command}`", "", described + ".", "",
                      "| part | igat s | reference s | ratio (median) | ratio range | max abs difference |",
                      "|---|---:|---:|---:|---:|---|", *rows])


INTRO = "\n".join([
    "## One iGAT step against the member-loop reference (bench/igat_step.py)", "",
    "Seconds of one iGAT training step (L_E, global PGD, training forward on cat(x, x_adv), backward) as igat "
    "runs it with its speed switches on (`resources.channels_last`, `igat.reuse_natural_pass`: both off by "
    "default, as they change results at float round-off) and as the plain member loop ran it before the CPU wins "
    "(NCHW members, the natural examples run forward twice, the old PGD loop; with BatchNorm members igat runs "
    "them twice too), both from the same "
    "weights, same batch and seed, interleaved repetitions in one process. The ratio is reference / igat (> 1: "
    "igat faster); the last column is the largest absolute difference of what the part computes between the two "
    "(channels_last sums in another order, and PGD's sign turns that round-off into different pixels where an "
    "input gradient is near zero; `--nchw` leaves channels_last out). Each table starts with the command that "
    "made it.",
])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--base", default="plain", choices=["plain", "adp"], help="the base loss L_E")
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: the shape's own)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--nchw", action="store_true", help="igat's members NCHW too: the exact wins without "
                        "channels_last (same losses to the bit)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--write", type=Path, help="Markdown file whose iGAT-step section is (re)written")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = list(argv if argv is not None else sys.argv[1:])
    for option in ("--write", "--shape"):
        if option in given:
            del given[given.index(option):given.index(option) + 2]
    device, results = torch.device(args.device), []
    for name in (SHAPES if args.shape == "both" else [args.shape]):
        shape = SHAPES[name]
        if args.batch:
            shape = Shape(**{**shape.__dict__, "batch": args.batch})
        result = measure(shape, args.base, args.reps, not args.nchw, device)
        command = shlex.join([".venv/bin/python", "-m", "bench.igat_step", "--shape", name, *given])
        section = render(result, command, setting(shape, args.base, args.reps, not args.nchw, device))
        print(section, flush=True)
        if args.write is not None:
            write_section(args.write, section)
        results.append(result)
    return results


def write_section(path: Path, block: str) -> None:
    """(Re)write this script's section of `path` (`pgd_throughput.write_section`'s format, this script's marks)."""
    write_marked_section(path, block, SECTION_START, SECTION_END, INTRO)


if __name__ == "__main__":
    main()
