"""results.json -> report.md: the accuracy tables laid out as the paper's Tables 1 and 2."""

from __future__ import annotations

from pathlib import Path

ATTACK_TITLES = {"natural": "Natural", "pgd": "PGD", "cw": "CW", "signhunter": "SH", "autoattack": "AA",
                 "simba": "SimBA", "bandits": "Bandits", "union": "Union"}
MODEL_TITLES = {"base": "base", "igat": "iGAT"}


def _attacks(evaluation: dict) -> list[str]:
    seen: list[str] = []
    for model in MODEL_TITLES:
        for acc in evaluation.get(model, {}).values():
            seen += [a for a in acc if a not in seen]
    return [a for a in ATTACK_TITLES if a in seen]


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def accuracy_table(results: dict) -> str:
    """Table 1 shape: one row per model, natural and attacked accuracy (%) under each combiner."""
    evaluation = results["evaluation"]
    attacks = _attacks(evaluation)
    combiners = [c for c in ("average", "max") if any(c in evaluation.get(m, {}) for m in MODEL_TITLES)]
    header = "| model | " + " | ".join(f"{c} {ATTACK_TITLES[a]}" for c in combiners for a in attacks) + " |"
    rule = "|---|" + "---:|" * (len(combiners) * len(attacks))
    rows = [header, rule]
    for model, title in MODEL_TITLES.items():
        if model in evaluation:
            cells = [_cell(evaluation[model].get(c, {}).get(a)) for c in combiners for a in attacks]
            rows.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def improvement_table(results: dict) -> str:
    """Table 2 shape: (iGAT - base) / base x 100 per combiner and attack."""
    improvement = results.get("improvement") or {}
    if not improvement:
        return ""
    attacks = [a for a in ATTACK_TITLES if any(a in v for v in improvement.values())]
    header = "| combiner | " + " | ".join(ATTACK_TITLES[a] for a in attacks) + " |"
    rows = [header, "|---|" + "---:|" * len(attacks)]
    for combiner, values in improvement.items():
        rows.append(f"| {combiner} | " + " | ".join(_cell(values.get(a), signed=True) for a in attacks) + " |")
    return "\n".join(rows)


def sanity_lines(results: dict) -> list[str]:
    return [f"- {'PASS' if c['passed'] else 'FAIL'} `{name}`: {c['detail']}" for name, c in results["sanity"].items()]


def render_report(results: dict) -> str:
    evaluation = results["evaluation"]
    failed = [name for name, c in results["sanity"].items() if not c["passed"]]
    parts = [f"# {results['name']}", ""]
    if failed:
        parts += [f"**SANITY CHECKS FAILED: {', '.join(failed)}. Do not trust these numbers.**", ""]
    parts += [
        f"Accuracy (%) on {evaluation['n_examples']} equidistant test examples, L-inf eps = {evaluation['eps']:.5f} "
        f"({evaluation['eps'] * 255:.2f}/255).", "", "## Accuracy (Table 1 layout)", "", accuracy_table(results), "",
    ]
    table2 = improvement_table(results)
    if table2:
        parts += ["## Relative improvement by iGAT, % (Table 2 layout)", "", table2, ""]
    parts += ["## Sanity checks", "", *sanity_lines(results), "", "## Timing (seconds)", ""]
    parts += [f"- {phase}: {seconds:.1f}" for phase, seconds in results["timing"].items()]
    parts += ["", f"Checkpoints: {', '.join(f'`{p}`' for p in results['artifacts'].values())}", ""]
    return "\n".join(parts)


def write_report(results: dict, out: str | Path) -> Path:
    path = Path(out) / "report.md"
    path.write_text(render_report(results))
    return path
