"""The README's per-method tables, from the committed results of the examples (results/examples/NAME.json).

The first table has one row per example and combiner: natural and PGD accuracy (%) of the base, the controls and
iGAT, and iGAT's gain in PGD points over `global_at`; the last column names the sanity checks that failed. The
second table reads the same runs under the strongest evaluation: the per-example union without the ensemble-aware
attacks (MORA, member-logit PGD, ...) and the union over every attack (the worst case) of the base, `global_at` and
iGAT, and iGAT's gain over `global_at` under both. Results older than the ensemble-aware attacks have no
union without them: that cell shows "-", and the worst case is then over the attacks that ran.

    .venv/bin/python scripts/example_table.py adp gal dverge trs soe cldl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from igat_core.evaluate import ENSEMBLE_AWARE

RESULTS = Path("results/examples")
MODELS = ("base", "continued", "global_at", "igat")
UNION_MODELS = ("base", "global_at", "igat")
COMBINERS = ("average", "max")
HEADER = ("| example | combiner | natural: base / continued / global_at / iGAT | PGD: base / continued / global_at / "
          "iGAT | iGAT - global_at (PGD) | failed sanity checks |\n|---|---|---:|---:|---:|---|")
UNION_HEADER = ("| example | combiner | ensemble-aware attacks | union w/o them: base / global_at / iGAT | union, "
                "worst case: base / global_at / iGAT | iGAT - global_at: w/o them / worst case |\n"
                "|---|---|---|---:|---:|---:|")


def accuracies(results: dict, combiner: str, attack: str, models: tuple[str, ...] = MODELS) -> str:
    """`a / b / ...` of the models' accuracy, "-" where a model or the attack is absent."""
    evaluation = results["evaluation"]
    values = [evaluation.get(m, {}).get(combiner, {}).get(attack) for m in models]
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values)


def failed_checks(results: dict, combiner: str) -> str:
    failed = [name for name, check in results["sanity"].items() if not check["passed"] and name.endswith(combiner)]
    return ", ".join(failed) or "none"


def gain(results: dict, combiner: str, attack: str) -> str:
    """iGAT - global_at in points for `attack`, "-" when the results do not hold it."""
    value = results.get("gain_points", {}).get("global_at", {}).get(combiner, {}).get(attack)
    return "-" if value is None else f"{value:+.1f}"


def ensemble_aware_attacks(results: dict, combiner: str) -> str:
    """The ensemble-aware attacks that ran under `combiner`; "none" for results without any."""
    ran = {a for by_c in results["evaluation"].values() if isinstance(by_c, dict) for a in by_c.get(combiner, {})}
    return ", ".join(a for a in ENSEMBLE_AWARE if a in ran) or "none"


def label(name: str, results: dict) -> str:
    return f"{name} ({results['spec']['base']['method']})"


def rows(name: str, results: dict) -> list[str]:
    return [f"| {label(name, results)} | {c} | {accuracies(results, c, 'natural')} | "
            f"{accuracies(results, c, 'pgd')} | {gain(results, c, 'pgd')} | {failed_checks(results, c)} |"
            for c in COMBINERS]


def union_rows(name: str, results: dict) -> list[str]:
    return [f"| {label(name, results)} | {c} | {ensemble_aware_attacks(results, c)} | "
            f"{accuracies(results, c, 'union_standard', UNION_MODELS)} | "
            f"{accuracies(results, c, 'union', UNION_MODELS)} | {gain(results, c, 'union_standard')} / "
            f"{gain(results, c, 'union')} |" for c in COMBINERS]


def tables(names: list[str], results_dir: Path = RESULTS) -> str:
    """Both tables over the examples in `names` that have a results file, in that order."""
    found = [(n, json.loads(p.read_text())) for n in names if (p := results_dir / f"{n}.json").exists()]
    first = [HEADER, *(line for n, r in found for line in rows(n, r))]
    second = [UNION_HEADER, *(line for n, r in found for line in union_rows(n, r))]
    return "\n".join([*first, "", *second])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="examples, e.g. adp gal dverge trs soe cldl")
    args = parser.parse_args()
    print(tables(args.names))


if __name__ == "__main__":
    main()
