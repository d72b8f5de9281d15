"""Which normalisation of iGAT's terms alpha = 5, beta = 10 fit: the paper's (eq. 16) or the official code's.

`paper`: the alpha-term is the sum over members of each member's mean CE over its examples, every distributed
example is charged, and L_R is the max over members averaged over the natural and adversarial examples.
`code`: the alpha-term is the summed CE of the examples the ensemble misclassifies / B, and L_R is the sum over
members averaged over the adversarial examples only (github.com/xqsi/iGAT, research/igat_official.md).

For each seed, one base ensemble is trained from examples/adp.yaml (ADP+AT on mnist5k) and fine-tuned with each
form for the same budget; both are scored by natural and PGD-20 accuracy of the averaged ensemble on the whole
validation split (never the test split). Resumable: finished runs are skipped.

    .venv/bin/python scripts/loss_scale.py --seeds 0 1 2 --out runs/loss_scale --results results/loss_scale.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from igat_core.data import load_dataset
from igat_core.ensemble import load_ensemble
from igat_core.evaluate import EvalConfig, evaluate_ensemble
from igat_core.runner import BASE_CHECKPOINT, IGAT_CHECKPOINT, run_experiment
from igat_core.spec import ExperimentSpec, load_spec

FORMS = {
    "paper": {"global_loss_mean": "member", "misclassified_only": False, "regularizer": "paper",
              "regularizer_on": "both"},
    "code": {"global_loss_mean": "batch", "misclassified_only": True, "regularizer": "per_member",
             "regularizer_on": "adversarial"},
}


def form_spec(example: ExperimentSpec, form: str, seed: int, base_checkpoint: Path | None) -> ExperimentSpec:
    data = example.model_dump(mode="json")
    data.update(name=f"{example.name}-{form}-s{seed}", seed=seed, controls=[])
    data["igat"].update(FORMS[form])
    data["base"]["checkpoint"] = str(base_checkpoint) if base_checkpoint else None
    data["eval"].update(attacks=["natural"], combiners=["average"], n_examples=100, sanity_examples=0,
                        diagnostics_examples=0)
    return ExperimentSpec.model_validate(data)


def validation_scores(checkpoint: Path, spec: ExperimentSpec) -> dict[str, float]:
    val = load_dataset(spec.dataset.name, "val", val_fraction=spec.dataset.val_fraction, seed=spec.seed)
    config = EvalConfig(attacks=("natural", "pgd"), combiners=("average",), eps=spec.eval.eps, step=spec.eval.step,
                        steps=spec.eval.steps, seed=spec.seed, sanity_examples=0)
    result = evaluate_ensemble(load_ensemble(checkpoint), val.images, val.labels, config, progress=False)
    accuracy = result.accuracy["average"]
    return {"val_natural": accuracy["natural"], "val_pgd": accuracy["pgd"], "val_examples": len(val.labels)}


def measure(example: ExperimentSpec, seed: int, out: Path) -> dict[str, dict[str, float]]:
    scores = {}
    paper_dir = out / f"paper-s{seed}"
    for form in FORMS:
        run_dir = out / f"{form}-s{seed}"
        shared = paper_dir / BASE_CHECKPOINT if form != "paper" else None
        spec = form_spec(example, form, seed, shared)
        run_experiment(spec, run_dir, progress=False)
        if form == "paper":
            scores["base"] = validation_scores(run_dir / BASE_CHECKPOINT, spec)
        scores[form] = validation_scores(run_dir / IGAT_CHECKPOINT, spec)
    return scores


def spread(values: list[float]) -> float:
    """The sample standard deviation; 0 for a single seed."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summary(runs: dict[str, dict]) -> list[str]:
    lines = ["| model | val natural (mean +- std) | val PGD-20 (mean +- std) | seeds |", "|---|---:|---:|---:|"]
    for model in ("base", *FORMS):
        natural = [r[model]["val_natural"] for r in runs.values()]
        pgd = [r[model]["val_pgd"] for r in runs.values()]
        lines.append(f"| {model} | {statistics.mean(natural):.2f} +- {spread(natural):.2f} | "
                     f"{statistics.mean(pgd):.2f} +- {spread(pgd):.2f} | {len(natural)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", type=Path, default=Path("examples/adp.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/loss_scale"))
    parser.add_argument("--results", type=Path, default=Path("results/loss_scale.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    example = load_spec(args.example)
    record = json.loads(args.results.read_text()) if args.results.exists() else {"runs": {}}
    record.update(example=str(args.example), forms=FORMS, threads=args.threads, torch=torch.__version__)
    for seed in args.seeds:
        if str(seed) not in record["runs"]:
            record["runs"][str(seed)] = measure(example, seed, args.out)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(record, indent=2) + "\n")
        print(f"seed {seed}: {json.dumps(record['runs'][str(seed)])}", flush=True)
    print("\n".join(summary(record["runs"])))


if __name__ == "__main__":
    main()
