"""`igat theory`: the threshold and the toy example, ambiguous pairs, the Monte-Carlo check, diagnostics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

theory_app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                         help="Theorem 4.1: exact threshold, toy example, ambiguous pairs, diagnostics (Tables 4-8).")

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]
DatasetOption = Annotated[str | None, typer.Option("--dataset", help="dataset (default: inferred from the checkpoint)")]


def summary() -> dict:
    from igat_core.theory import ToyExample, threshold_summary

    return {"threshold": threshold_summary(), "toy_example": ToyExample().to_dict()}


@theory_app.callback(invoke_without_command=True)
def theory(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Print the exact threshold of Theorem 4.1 and the risks of the supplement's toy example."""
    if ctx.invoked_subcommand is not None:
        return
    data = summary()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    t, toy = data["threshold"], data["toy_example"]
    typer.echo(f"threshold p* = {t['closed_form']} = {t['value']:.12f} (paper: {t['paper_value']})")
    typer.echo(f"  {t['polynomial']}")
    typer.echo(f"  r1(p*) = r2(p*) = {t['risks_at_threshold']['single']:.12f}; ensemble bound below r1 for p > p*")
    r = toy["risks"]
    typer.echo(f"toy example (supplement section 3): 0-1 risk max {r['max']:g}, average {r['average']:g}, "
               f"single h = h0 {r['single']:g}; members acceptable for J in "
               f"[{toy['acceptable_j'][0]:.3f}, {toy['acceptable_j'][1]:.3f}]")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def infer_dataset(config) -> str:
    """The dataset whose shape, class count and normalisation match a checkpoint's model config."""
    from igat_core.data import DATASETS, dataset_info

    for name in DATASETS:
        info = dataset_info(name)
        if ((info.channels, info.height, info.width, info.num_classes) ==
                (config.in_channels, config.height, config.width_px, config.num_classes)
                and tuple(info.mean) == tuple(config.mean)):
            return name
    raise typer.BadParameter("cannot infer the dataset from the checkpoint; pass --dataset")


def _load(checkpoint: Path, dataset: str | None, split: str, n_examples: int | None):
    from igat_core.data import equidistant_indices, load_dataset
    from igat_core.ensemble import CheckpointError, load_ensemble

    try:
        ensemble = load_ensemble(checkpoint)
    except CheckpointError as exc:
        typer.secho(str(exc), err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    name = dataset or infer_dataset(ensemble.config)
    data = load_dataset(name, split)
    images, labels = data.images, data.labels
    if n_examples is not None:
        idx = equidistant_indices(len(labels), n_examples)
        images, labels = images[idx], labels[idx]
    return ensemble, name, images, labels


@theory_app.command()
def diagnose(
    checkpoint: Annotated[Path, typer.Argument(help="saved ensemble (igat checkpoint)")],
    dataset: DatasetOption = None,
    split: Annotated[str, typer.Option(help="split to attack")] = "test",
    n_examples: Annotated[int, typer.Option("--n-examples", help="examples, spread evenly over the split")] = 500,
    eps: Annotated[float, typer.Option(help="L-inf radius of the global PGD attack")] = 8 / 255,
    step: Annotated[float | None, typer.Option(help="PGD step (default eps / 4)")] = None,
    steps: Annotated[int, typer.Option(help="PGD steps")] = 20,
    combiner: Annotated[str, typer.Option(help="combiner attacked (the supplement uses average)")] = "average",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the PGD random start and curvature probes")] = 0,
    plot: Annotated[Path | None, typer.Option(help="also write the diagnostics plot (PNG) here")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Supplement Tables 4-8 and the curvature of an ensemble on its global adversarial examples."""
    from igat_core.theory.diagnostics import diagnostics_table, ensemble_diagnostics
    from igat_core.theory.plots import plot_diagnostics

    ensemble, name, images, labels = _load(checkpoint, dataset, split, n_examples)
    result = ensemble_diagnostics(ensemble, images, labels, combiner=combiner, eps=eps,
                                  step=step if step is not None else eps / 4, steps=steps, device=_device(device),
                                  seed=seed)
    result["dataset"] = name
    if plot is not None:
        plot_diagnostics({checkpoint.stem: result}, plot)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{checkpoint} on {name} ({result['n_examples']} {split} examples), PGD eps {eps:.4g} on the "
               f"{combiner} ensemble: accuracy {result['natural_accuracy']:.2f}% -> "
               f"{result['adversarial_accuracy']:.2f}%\n")
    typer.echo(diagnostics_table({checkpoint.stem: result}))
    if plot is not None:
        typer.echo(f"\nplot: {plot}")


@theory_app.command()
def pairs(
    checkpoint: Annotated[Path, typer.Argument(help="saved ensemble whose members form the family H (MLPs)")],
    dataset: DatasetOption = None,
    split: Annotated[str, typer.Option(help="split D that the pairs come from")] = "test",
    count: Annotated[int, typer.Option("--pairs", help="choose the largest J that leaves this many pairs")] = 20,
    j: Annotated[float | None, typer.Option("--j", help="use this J instead")] = None,
    xi: Annotated[float, typer.Option(help="the constant xi of eq. 10")] = 0.0,
    b_source: Annotated[str, typer.Option("--b-source", help="pinv (proof) or factor (main text)")] = "pinv",
    radius: Annotated[float, typer.Option(help="finite-difference radius of eq. 2 (L2)")] = 0.5,
    quantile: Annotated[float, typer.Option(help="quantile over data for lambda~ and B (1 = max)")] = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """List the ambiguous pairs A(D) of Definition 4.3 for the members of a checkpoint."""
    from igat_core.theory.curvature import CurvatureConfig
    from igat_core.theory.pairs import ambiguous_pairs, estimate_constants
    from igat_core.theory.serialize import jsonable

    ensemble, name, images, labels = _load(checkpoint, dataset, split, None)
    if ensemble.config.architecture != "mlp":
        typer.secho(f"note: Theorem 4.1 is stated for MLPs; members are {ensemble.config.architecture}", err=True)
    estimates = estimate_constants(list(ensemble.members), images, labels, ensemble.config.num_classes,
                                   curvature=CurvatureConfig(radius), quantile=quantile, xi=xi,
                                   b_source=b_source)  # type: ignore[arg-type]
    found = ambiguous_pairs(images, labels, estimates.constants, j=j, min_pairs=count,
                            max_pairs=None if j is None else 10_000)
    data = jsonable({"dataset": name, "split": split, **estimates.to_dict(), "ambiguous_pairs": found.to_dict(labels)})
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    c = estimates.constants
    typer.echo(f"lambda~ {c.curvature:.4g}, B_0 {c.factor_norm:.4g}, B {c.pinv_norm:.4g} (using {c.b_source}), "
               f"xi {c.xi:g}, K = B sqrt(C (lambda~^2 - xi)) = {c.lipschitz():.4g}")
    typer.echo(f"J = {found.j:.4g}, radius {found.radius:.4g}, {len(found)} pairs; Definition 4.3 (J > 2) "
               f"{'met' if found.definition_met else 'NOT met'}")
    for row in found.rows(labels):
        typer.echo(f"  ({row['i']}, {row['j']})  y = ({row['y_i']}, {row['y_j']})  distance {row['distance']:.4f}")


@theory_app.command()
def montecarlo(
    dataset: Annotated[str, typer.Option(help="dataset")] = "digits",
    out: Annotated[Path, typer.Option(help="directory for montecarlo.json, montecarlo.md, risks.png")] = Path(
        "runs/theory-montecarlo"),
    members: Annotated[int, typer.Option(help="MLP members, one seed each")] = 8,
    epochs: Annotated[int, typer.Option(help="training epochs per member")] = 15,
    width: Annotated[int, typer.Option(help="hidden units per layer")] = 32,
    count: Annotated[int, typer.Option("--pairs", help="ambiguous pairs (J is chosen to leave this many)")] = 100,
    adversarial: Annotated[bool, typer.Option("--adversarial/--plain", help="PGD adversarial training")] = True,
    eps: Annotated[float, typer.Option(help="eps of adversarial training; curvature radius eps * sqrt(d)")] = 0.1,
    xi: Annotated[float, typer.Option(help="the constant xi of eq. 10")] = 0.0,
    b_source: Annotated[str, typer.Option("--b-source", help="pinv (proof) or factor (main text)")] = "pinv",
    seed: Annotated[int, typer.Option(help="first member's seed")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Train MLP members and check eq. (5), p and Assumption 4.4 on the ambiguous pairs; write the table."""
    from igat_core.theory.montecarlo import MonteCarloConfig, run_montecarlo, write_montecarlo

    config = MonteCarloConfig(dataset=dataset, members=members, epochs=epochs, width=width, pairs=count,
                              adversarial=adversarial, eps=eps, step=eps / 4, xi=xi,
                              b_source=b_source, seed=seed)  # type: ignore[arg-type]
    result = run_montecarlo(config)
    paths = write_montecarlo(result, out)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    typer.echo(result.table())
    typer.echo("\nwritten: " + ", ".join(str(p) for p in paths))
