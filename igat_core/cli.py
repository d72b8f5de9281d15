"""`igat`: run experiments locally, and (through service.cli) serve and talk to the REST control plane."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="iGAT: interactive global adversarial training for ensemble defenses.")


@app.callback()
def _root() -> None:
    """iGAT: interactive global adversarial training for ensemble defenses."""


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="experiment spec")],
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/<name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Run every phase in-process; rerunning the same command resumes from the last checkpoint."""
    from igat_core.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        raise fail(str(exc), code=2) from None

    from igat_core.data import DatasetUnavailable
    from igat_core.report import accuracy_table, improvement_table
    from igat_core.runner import run_experiment

    out = out or Path("runs") / spec.name
    try:
        results = run_experiment(spec, out, progress=not quiet)
    except (DatasetUnavailable, RuntimeError, ValueError) as exc:
        raise fail(f"igat run failed: {exc}") from None
    typer.echo(f"\n{spec.name}: accuracy (%) on {results['evaluation']['n_examples']} test examples, "
               f"eps {results['evaluation']['eps'] * 255:.2f}/255\n")
    typer.echo(accuracy_table(results))
    table2 = improvement_table(results)
    if table2:
        typer.echo("\nRelative improvement by iGAT (%)\n" + table2)
    failed = [name for name, c in results["sanity"].items() if not c["passed"]]
    if failed:
        typer.secho(f"\nSANITY CHECKS FAILED: {', '.join(failed)}", fg=typer.colors.RED)
    typer.echo(f"\nresults: {out / 'results.json'}  report: {out / 'report.md'}")


def _register_service_commands() -> None:
    try:
        from service.cli import register
    except ImportError:
        return
    register(app)


_register_service_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
