"""The core commands of `igat`: run, eval and theory, in-process (no server, no database).

`python -m igat_core.cli` offers these alone; the installed `igat` adds the service's commands to them
(`service.cli.igat_app`), so this module never imports the service.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from igat_core.rundir import ENSEMBLE_FILE, PLOTS_DIR, REPORT_FILE, RESULTS_FILE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="iGAT: interactive global adversarial training for ensemble defenses.")


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="experiment spec")],
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/<name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Run every phase in-process; rerunning the same command resumes from the last checkpoint. Progress: one bar
    per phase on stderr, drawn from the run's events (igat_core.progress)."""
    from igat_core.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        raise fail(str(exc), code=2) from None

    from igat_core.data import DatasetUnavailable
    from igat_core.progress import ProgressBars
    from igat_core.report import accuracy_table, comparison_text
    from igat_core.runner import run_experiment

    out = out or Path("runs") / spec.name
    bars = None if quiet else ProgressBars(sys.stderr)
    try:
        results = run_experiment(spec, out, progress=False, listener=bars)
    except (DatasetUnavailable, RuntimeError, ValueError) as exc:
        raise fail(f"igat run failed: {exc}") from None
    finally:
        if bars is not None:
            bars.close()
    typer.echo(f"\n{spec.name}: accuracy (%) on {results['evaluation']['n_examples']} test examples, "
               f"eps {results['evaluation']['eps'] * 255:.2f}/255\n")
    typer.echo(accuracy_table(results))
    comparisons = comparison_text(results)
    if comparisons:
        typer.echo("\n" + comparisons)
    failed = [name for name, c in results["sanity"].items() if not c["passed"]]
    if failed:
        typer.secho(f"\nSANITY CHECKS FAILED: {', '.join(failed)}", fg=typer.colors.RED)
    typer.echo(f"\nresults: {out / RESULTS_FILE}  report: {out / REPORT_FILE}")


def _echo_now(line: str) -> None:
    """One line of a long job, flushed, so that it reaches a log file as it happens."""
    typer.echo(line)
    sys.stdout.flush()


@app.command()
def study(
    spec_path: Annotated[Path, typer.Argument(metavar="STUDY.yaml", help="study spec (examples/studies/)")],
    out: Annotated[Path | None, typer.Option("--out", help="study directory (default runs/<name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Run every experiment of a study in-process, one after another, then its Tables 1-3 over seeds
    (DIR/results.json, DIR/report.md); rerunning the same command resumes."""
    from igat_core.spec import SpecError
    from igat_core.study_spec import load_study, plan_study

    try:
        study_spec = load_study(spec_path)
    except SpecError as exc:
        raise fail(str(exc), code=2) from None
    tuned = [p.name for p in plan_study(study_spec) if p.spec.tune.enabled]
    if tuned:
        raise fail(f"{spec_path}: tune.enabled in {tuned[0]}: the alpha/beta search runs on Ray Tune; submit the "
                   "study to the service or set tune.enabled: false", code=2)

    from igat_core.study import run_study

    out = out or Path("runs") / study_spec.name
    try:
        record = run_study(study_spec, out, progress=not quiet, echo=_echo_now)
    except RuntimeError as exc:
        raise fail(f"igat study failed: {exc}") from None
    _print_study(record, out)
    if record["counts"]["failed"]:
        raise typer.Exit(1)


def _print_study(record: dict, out: Path) -> None:
    counts = record["counts"]
    typer.echo(f"\nstudy {record['name']}: {counts['planned']} runs, {counts['succeeded']} succeeded, "
               f"{counts['failed']} failed")
    for run in record["runs"]:
        if run["status"] != "succeeded":
            typer.secho(f"  {run['name']}: {run['status']}: {run['error']}", fg=typer.colors.RED)
    typer.echo(f"results: {out / RESULTS_FILE}  report: {out / REPORT_FILE}")


def _register_theory_commands() -> None:
    from igat_core.theory.cli import theory_app

    app.add_typer(theory_app, name="theory")


_register_theory_commands()


def _split_names(values: list[str] | None, transfer: bool = False) -> list[str] | None:
    """The attacks of --attacks; `all` is every attack (the transfer attack only with a `transfer` source)."""
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if names == ["all"]:
        from igat_core.evaluate import ATTACK_ORDER

        return [a for a in ATTACK_ORDER if transfer or a != "transfer"]
    return names


def _eval_spec(config: Path | None, overrides: dict):
    """The EvalSpec from --config (YAML of eval fields) with the command-line options on top."""
    import yaml

    from igat_core.spec import EvalSpec, SpecError, validation_problems

    data: dict = {}
    if config is not None:
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(str(config), [("(file)", str(exc).replace("\n", " "))]) from None
        if not isinstance(data, dict):
            raise SpecError(str(config), [("(root)", "expected a mapping of eval fields")])
        data = data.get("eval", data)
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    from igat_core.report import TABLE1_ATTACKS

    data.setdefault("attacks", list(TABLE1_ATTACKS))
    if "eps" in overrides and overrides["eps"] is not None and "step" not in data:
        from igat_core.spec import _parse_fraction

        try:
            data["step"] = float(_parse_fraction(overrides["eps"])) / 4
        except ValueError:
            pass
    try:
        return EvalSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError("(igat eval options)", [("eval." + p, r) for p, r in validation_problems(exc)]) from None


def _checkpoint_dataset(path: Path, model_config, requested: str | None) -> str:
    """--dataset, else the dataset the checkpoint records, else the only dataset of the checkpoint's shape."""
    from igat_core.data import DATASETS
    from igat_core.dataset_info import input_shape_mismatch

    expected = (model_config.in_channels, model_config.height, model_config.width_px, model_config.num_classes)
    name = requested or model_config.dataset
    if name is None:
        matches = [d for d in DATASETS if input_shape_mismatch(*expected, d) is None]
        if len(matches) != 1:
            raise ValueError(f"{path} does not record its dataset; pass --dataset NAME (one of {', '.join(DATASETS)})")
        typer.echo(f"{path} does not record its dataset; its input shape matches {matches[0]!r} (--dataset overrides)")
        name = matches[0]
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    mismatch = input_shape_mismatch(*expected, name)
    if mismatch:
        raise ValueError(f"{path} {mismatch}")
    return name


def _load_checkpoint(path: Path):
    from igat_core.ensemble import load_ensemble

    return load_ensemble(path)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help=f"a saved ensemble ({ENSEMBLE_FILE})")],
    out: Annotated[Path, typer.Option("--out", help=f"directory for {RESULTS_FILE}, {REPORT_FILE} and {PLOTS_DIR}/")],
    attacks: Annotated[list[str] | None, typer.Option(
        "--attacks", help="comma-separated or repeated: natural, pgd, cw, mim, autoattack, signhunter, simba, "
                          "bandits, mora, logit_pgd, transfer, or all (default: natural,pgd,cw,signhunter,"
                          "autoattack)")] = None,
    combiner: Annotated[str, typer.Option("--combiner", help="average, max or both")] = "both",
    eps: Annotated[str | None, typer.Option("--eps", help="L-inf radius, e.g. 8/255 (default: 8/255)")] = None,
    step: Annotated[str | None, typer.Option(
        "--step", help="PGD/CW/MIM step (default: eps/4 with --eps, else 2/255)")] = None,
    n_examples: Annotated[int | None, typer.Option(
        "--n-examples", help="equidistant test examples (default: 1000)")] = None,
    eps_sweep: Annotated[bool, typer.Option("--eps-sweep", help="also sweep eps (2..10/255, AutoAttack)")] = False,
    dataset: Annotated[str | None, typer.Option("--dataset", help="test data (default: the checkpoint's)")] = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="a second checkpoint (e.g. the base ensemble): adds its row and Table 2")] = None,
    transfer_from: Annotated[Path | None, typer.Option(
        "--transfer-from", help="an independently trained ensemble: adds the transfer attack (PGD and MIM examples "
                                "made on it)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML of eval settings (spec's eval section)")]
    = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Evaluate a saved ensemble under both combiners; writes DIR/results.json and DIR/report.md. Reruns resume."""
    from igat_core.spec import SpecError

    combiners = {"both": ["average", "max"], "average": ["average"], "max": ["max"]}
    if combiner not in combiners:
        raise fail(f"--combiner must be average, max or both, got {combiner!r}", code=2)
    try:
        spec = _eval_spec(config, {"attacks": _split_names(attacks, transfer_from is not None),
                                   "combiners": combiners[combiner], "eps": eps, "step": step,
                                   "n_examples": n_examples, "eps_sweep": eps_sweep or None, "batch_size": batch_size,
                                   "transfer_from": str(transfer_from) if transfer_from else None})
    except SpecError as exc:
        raise fail(str(exc), code=2) from None

    from igat_core.data import DatasetUnavailable

    try:
        models, name = _eval_models(checkpoint, baseline, dataset)
        source = _transfer_source(spec.transfer_from, name)
        torch_device = _device(device)
        record, seconds = _evaluate_models(models, name, spec, out, torch_device, seed, progress=not quiet,
                                           transfer=source)
    except (ValueError, RuntimeError, DatasetUnavailable) as exc:
        raise fail(f"igat eval: {exc}", code=2) from None
    from igat_core.results import results_record

    results = results_record(
        record, name=f"igat eval {checkpoint}", spec={"eval": spec.model_dump(mode="json")}, eps=spec.eps,
        timing={"evaluate": seconds}, device=torch_device, reference="baseline", target="model",
        artifacts={m: str(p) for m, p in (("model", checkpoint), ("baseline", baseline),
                                          ("transfer_source", spec.transfer_from)) if p is not None},
        provenance={"checkpoint": str(checkpoint), "dataset": name, "seed": seed,
                    "improvement_label": "model vs baseline"})
    _write_eval_results(results, out)
    _print_eval(results, checkpoint, name, out)


def _device(name: str):
    from igat_core.runner import resolve_device

    return resolve_device(name)


def _eval_models(checkpoint: Path, baseline: Path | None, dataset: str | None) -> tuple[dict, str]:
    """{"baseline"?, "model"} ensembles, and the dataset they are evaluated on."""
    models = {"model": _load_checkpoint(checkpoint)}
    if baseline is not None:
        models = {"baseline": _load_checkpoint(baseline), **models}
    name = _checkpoint_dataset(checkpoint, models["model"].config, dataset)
    if baseline is not None:
        _checkpoint_dataset(baseline, models["baseline"].config, name)
    return models, name


def _transfer_source(path: str | None, dataset: str):
    """The ensemble of --transfer-from (or the config's eval.transfer_from), checked against the dataset."""
    from igat_core.spec import STANDARD_TRANSFER_SOURCE

    if path is None:
        return None
    if path == STANDARD_TRANSFER_SOURCE:
        raise ValueError("eval.transfer_from: 'standard' trains a source inside `igat run`; igat eval takes the path "
                         "of a trained ensemble")
    source = _load_checkpoint(Path(path))
    _checkpoint_dataset(Path(path), source.config, dataset)
    return source


def _evaluate_models(models: dict, dataset: str, spec, out: Path, device, seed: int, *,
                     progress: bool, transfer=None) -> tuple[dict, float]:
    """The evaluation record of every model on the test examples (the transfer attack's examples made on the
    `transfer` source), and its seconds."""
    import time

    from igat_core.data import equidistant_indices, load_dataset
    from igat_core.evaluate import EvalConfig, attack_factory_for, evaluate_ensemble, evaluation_record
    from igat_core.rundir import EVAL_STATE_DIR

    test = load_dataset(dataset, "test")
    idx = equidistant_indices(len(test.labels), spec.n_examples)
    config = EvalConfig.from_spec(spec, seed)
    factory = attack_factory_for(transfer, config)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    evaluations = {m: evaluate_ensemble(e, test.images[idx], test.labels[idx], config, device=device,
                                        progress=progress, desc=f"evaluate {m}", state_dir=out / EVAL_STATE_DIR,
                                        attack_factory=factory)
                   for m, e in models.items()}
    return evaluation_record(evaluations, config, len(idx)), time.perf_counter() - started


def _write_eval_results(results: dict, out: Path) -> None:
    from igat_core.report import write_report
    from igat_core.rundir import write_json_atomic

    write_json_atomic(out / RESULTS_FILE, results)
    write_report(results, out)


def _print_eval(results: dict, checkpoint: Path, dataset: str, out: Path) -> None:
    from igat_core.report import accuracy_table, extra_table, failed_checks, improvement_table, sweep_table
    evaluation = results["evaluation"]
    typer.echo(f"\n{checkpoint} on {dataset}: accuracy (%) on {evaluation['n_examples']} test examples, "
               f"eps {evaluation['eps'] * 255:.2f}/255\n")
    for title, table in (("Table 1", accuracy_table(results)), ("Further attacks, union", extra_table(results)),
                         ("Table 2: relative improvement (%)", improvement_table(results)),
                         ("Accuracy against eps", sweep_table(results))):
        if table:
            typer.echo(f"{title}\n{table}\n")
    failed = failed_checks(results)
    if failed:
        typer.secho(f"SANITY CHECKS FAILED: {', '.join(failed)} (see {out / REPORT_FILE})", fg=typer.colors.RED)
    typer.echo(f"results: {out / RESULTS_FILE}  report: {out / REPORT_FILE}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
