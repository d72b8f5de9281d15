"""The README's per-method table, from the committed results of the examples (results/examples/NAME.json).

One row per example and combiner: natural and PGD accuracy (%) of the base, the controls and iGAT, and iGAT's gain
in PGD points over `global_at`; the last column names the sanity checks that failed.

    .venv/bin/python scripts/example_table.py adp gal dverge trs soe cldl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path("results/examples")
MODELS = ("base", "continued", "global_at", "igat")
HEADER = ("| example | combiner | natural: base / continued / global_at / iGAT | PGD: base / continued / global_at / "
          "iGAT | iGAT - global_at (PGD) | failed sanity checks |\n|---|---|---:|---:|---:|---|")


def accuracies(results: dict, combiner: str, attack: str) -> str:
    evaluation = results["evaluation"]
    return " / ".join(f"{evaluation[m][combiner][attack]:.1f}" if m in evaluation else "-" for m in MODELS)


def failed_checks(results: dict, combiner: str) -> str:
    failed = [name for name, check in results["sanity"].items() if not check["passed"] and name.endswith(combiner)]
    return ", ".join(failed) or "none"


def pgd_gain(results: dict, combiner: str) -> str:
    gain = results.get("gain_points", {}).get("global_at", {})
    return f"{gain[combiner]['pgd']:+.1f}" if combiner in gain else "-"


def rows(name: str, results: dict) -> list[str]:
    method = results["spec"]["base"]["method"]
    return [f"| {name} ({method}) | {c} | {accuracies(results, c, 'natural')} | {accuracies(results, c, 'pgd')} | "
            f"{pgd_gain(results, c)} | {failed_checks(results, c)} |" for c in ("average", "max")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="examples, e.g. adp gal dverge trs soe cldl")
    args = parser.parse_args()
    lines = [HEADER]
    for name in args.names:
        path = RESULTS / f"{name}.json"
        if path.exists():
            lines += rows(name, json.loads(path.read_text()))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
