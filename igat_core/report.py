"""results.json -> report.md and plots/: the sanity checks first, then the accuracy tables laid out as the paper's
Table 1 (rows: models; columns: natural, PGD, CW, SH, AA under each combiner) and Table 2 (relative improvement),
the supplement's extra attacks (SimBA, Bandits) and eps sweep (supplement Table 2), and accuracy against eps."""

from __future__ import annotations

from pathlib import Path

from igat_core.figures import pyplot, save_figure
from igat_core.rundir import PLOTS_DIR, REPORT_FILE

ATTACK_TITLES = {"natural": "Natural", "pgd": "PGD", "cw": "CW", "signhunter": "SH", "autoattack": "AA",
                 "mim": "MIM", "simba": "SimBA", "bandits": "Bandits", "mora": "MORA", "logit_pgd": "Logit-PGD",
                 "transfer": "Transfer", "union_standard": "Union w/o ens.-aware", "union": "Union"}
TABLE1_ATTACKS = ("natural", "pgd", "cw", "signhunter", "autoattack")
EXTRA_ATTACKS = ("mim", "simba", "bandits", "mora", "logit_pgd", "transfer", "union_standard", "union")
MODEL_TITLES = {"base": "base", "baseline": "baseline", "continued": "continued", "global_at": "global_at",
                "igat": "iGAT", "model": "model"}
COMBINERS = ("average", "max")
SWEEP_PLOT = f"{PLOTS_DIR}/accuracy_vs_eps.png"
DIAGNOSTICS_PLOT = f"{PLOTS_DIR}/diagnostics.png"


def _models(evaluation: dict) -> list[str]:
    return [m for m in MODEL_TITLES if isinstance(evaluation.get(m), dict)]


def _combiners(evaluation: dict) -> list[str]:
    return [c for c in COMBINERS if any(c in evaluation[m] for m in _models(evaluation))]


def _present(evaluation: dict, wanted: tuple[str, ...]) -> list[str]:
    seen = {a for m in _models(evaluation) for acc in evaluation[m].values() for a in acc}
    return [a for a in wanted if a in seen]


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _eps_title(eps: float) -> str:
    return f"{eps * 255:g}/255"


def _grid(results: dict, attacks: list[str]) -> str:
    evaluation = results["evaluation"]
    combiners = _combiners(evaluation)
    header = "| model | " + " | ".join(f"{c} {ATTACK_TITLES[a]}" for c in combiners for a in attacks) + " |"
    rows = [header, "|---|" + "---:|" * (len(combiners) * len(attacks))]
    for model in _models(evaluation):
        cells = [_cell(evaluation[model].get(c, {}).get(a)) for c in combiners for a in attacks]
        rows.append(f"| {MODEL_TITLES[model]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def accuracy_table(results: dict) -> str:
    """Table 1: one row per model, natural, PGD, CW, SH and AA accuracy (%) under each combiner (those that ran)."""
    attacks = _present(results["evaluation"], TABLE1_ATTACKS)
    return _grid(results, attacks) if attacks else ""


def extra_table(results: dict) -> str:
    """MIM, SimBA and Bandits (supplement Table 1), the ensemble-aware MORA, Logit-PGD and transfer, the per-example
    union without the ensemble-aware attacks and over every attack, Table 1's layout."""
    attacks = _present(results["evaluation"], EXTRA_ATTACKS)
    return _grid(results, attacks) if attacks else ""


def _comparison_grid(rows: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """One signed row per label, columns combiner x attack, from {label: values[combiner][attack]}."""
    first = next(iter(rows.values()))
    combiners = [c for c in COMBINERS if c in first]
    attacks = [a for a in (*TABLE1_ATTACKS, *EXTRA_ATTACKS) if any(a in first[c] for c in combiners)]
    header = "| | " + " | ".join(f"{c} {ATTACK_TITLES[a]}" for c in combiners for a in attacks) + " |"
    lines = [header, "|---|" + "---:|" * (len(combiners) * len(attacks))]
    for label, values in rows.items():
        cells = [_cell(values.get(c, {}).get(a), signed=True) for c in combiners for a in attacks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _target(results: dict) -> str:
    """The model the comparisons are of: the evaluated model that is no reference (iGAT in a run)."""
    references = results.get("improvement_over") or {}
    return next((m for m in _models(results["evaluation"]) if m not in references), "igat")


def improvement_table(results: dict) -> str:
    """Table 2: (target - reference) / reference x 100 for each combiner and attack, one row per reference (the
    base and each control model; `igat eval --baseline`: the baseline)."""
    target = MODEL_TITLES.get(_target(results), "iGAT")
    over = {f"{target} vs {MODEL_TITLES[m]}": values for m, values in (results.get("improvement_over") or {}).items()}
    if not over and results.get("improvement"):
        over = {results.get("improvement_label", "iGAT vs base"): results["improvement"]}
    return _comparison_grid(over) if over else ""


def gain_table(results: dict) -> str:
    """The target's accuracy minus each reference model's (base and controls), in points."""
    target = MODEL_TITLES.get(_target(results), "iGAT")
    gains = {f"{target} - {MODEL_TITLES[m]}": values for m, values in (results.get("gain_points") or {}).items()}
    return _comparison_grid(gains) if gains else ""


def comparison_text(results: dict) -> str:
    """Table 2 and iGAT's gains in points, as `igat run` and `make demo` print them below Table 1."""
    parts = []
    if table2 := improvement_table(results):
        parts.append("Relative improvement by iGAT (%)\n" + table2)
    if gains := gain_table(results):
        parts.append("iGAT's gain in accuracy points\n" + gains)
    return "\n\n".join(parts)


def sweep_table(results: dict) -> str:
    """Supplement Table 2: accuracy (%) under the sweep attack at each eps, one row per model and combiner."""
    sweep = results["evaluation"].get("eps_sweep")
    if not sweep:
        return ""
    header = "| model | combiner | " + " | ".join(_eps_title(e) for e in sweep["eps"]) + " |"
    rows = [header, "|---|---|" + "---:|" * len(sweep["eps"])]
    for model in MODEL_TITLES:
        for combiner, values in sweep["accuracy"].get(model, {}).items():
            rows.append(f"| {MODEL_TITLES[model]} | {combiner} | " + " | ".join(_cell(v) for v in values) + " |")
    return "\n".join(rows)


def verdict_table(results: dict) -> str:
    """results.json's `adaptive_verdict`: per model and combiner the strongest attack, its accuracy and how many
    points it lies below PGD and AutoAttack (those that ran)."""
    verdict = results.get("adaptive_verdict") or {}
    rows = ["| model | combiner | strongest attack | accuracy | below PGD | below AA |", "|---|---|---|---:|---:|---:|"]
    for model in MODEL_TITLES:
        for combiner, v in verdict.get(model, {}).items():
            below = [_cell(v["below"].get(a)) for a in ("pgd", "autoattack")]
            rows.append(f"| {MODEL_TITLES[model]} | {combiner} | {ATTACK_TITLES[v['strongest']]} | "
                        f"{_cell(v['accuracy'])} | " + " | ".join(below) + " |")
    return "\n".join(rows) if verdict else ""


def cost_table(results: dict) -> str:
    """Mean gradients (white-box) or forward queries (black-box) per attacked example."""
    cost = results.get("attack_cost") or {}
    attacks = [a for a in ATTACK_TITLES if any(a in by_c for by_m in cost.values() for by_c in by_m.values())]
    if not attacks:
        return ""
    rows = ["| model | combiner | " + " | ".join(ATTACK_TITLES[a] for a in attacks) + " |",
            "|---|---|" + "---:|" * len(attacks)]
    for model in MODEL_TITLES:
        for combiner, values in cost.get(model, {}).items():
            cells = [f"{values[a]:.0f}" if a in values else "" for a in attacks]
            rows.append(f"| {MODEL_TITLES[model]} | {combiner} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sanity_lines(results: dict) -> list[str]:
    return [f"- {'PASS' if c['passed'] else '**FAIL**'} `{name}`: {c['detail']}"
            for name, c in results["sanity"].items()]


def failed_checks(results: dict) -> list[str]:
    return [name for name, c in results.get("sanity", {}).items() if not c["passed"]]


def render_report(results: dict) -> str:
    evaluation = results["evaluation"]
    failed = failed_checks(results)
    parts = [f"# {results['name']}", ""]
    if failed:
        parts += [f"**SANITY CHECKS FAILED: {', '.join(failed)}. The numbers below are shown unchanged; read them "
                  "with the failed checks in mind.**", ""]
    parts += ["## Sanity checks", "", *(sanity_lines(results) or ["- (none ran)"]), ""]
    parts += [f"Accuracy (%) on {evaluation['n_examples']} equidistant test examples, L-inf eps = "
              f"{evaluation['eps']:.5f} ({_eps_title(evaluation['eps'])}).", ""]
    for title, table in (("Accuracy (Table 1 layout)", accuracy_table(results)),
                         ("Further attacks and the union over all attacks", extra_table(results)),
                         ("Adaptive evaluation: the strongest attack, in points below the paper's attacks",
                          verdict_table(results)),
                         ("Relative improvement, % (Table 2 layout)", improvement_table(results)),
                         ("Gain in accuracy points over the base and the equal-budget controls", gain_table(results))):
        if table:
            parts += [f"## {title}", "", table, ""]
    sweep = sweep_table(results)
    if sweep:
        attack = ATTACK_TITLES[evaluation["eps_sweep"]["attack"]]
        parts += [f"## Accuracy (%) against eps under {attack} (supplement Table 2 layout)", "", sweep, "",
                  f"![accuracy against eps]({SWEEP_PLOT})", ""]
    if results.get("diagnostics"):
        from igat_core.theory.diagnostics import diagnostics_table

        first = next(iter(results["diagnostics"].values()))
        parts += ["## Diagnostics on global adversarial examples (supplement Tables 4-8)", "",
                  f"{first['n_examples']} examples, PGD-{first['attack']['steps']} on the {first['combiner']} "
                  f"combiner at eps {first['attack']['eps']:.5f}.", "",
                  diagnostics_table(results["diagnostics"]), "", f"![diagnostics]({DIAGNOSTICS_PLOT})", ""]
    cost = cost_table(results)
    if cost:
        parts += ["## Mean gradients or queries per attacked example", "", cost, ""]
    if results.get("timing"):
        parts += ["## Timing (seconds)", "", *[f"- {p}: {s:.1f}" for p, s in results["timing"].items()], ""]
    if results.get("artifacts"):
        parts += [f"Checkpoints: {', '.join(f'`{p}`' for p in results['artifacts'].values())}", ""]
    return "\n".join(parts)


def plot_sweep(results: dict, path: str | Path) -> Path | None:
    """Accuracy against eps, one line per model and combiner; None when no sweep ran."""
    sweep = results["evaluation"].get("eps_sweep")
    if not sweep:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ticks = [e * 255 for e in sweep["eps"]]
    for model in MODEL_TITLES:
        for combiner, values in sweep["accuracy"].get(model, {}).items():
            ax.plot(ticks, values, marker="o", linestyle="-" if combiner == "average" else "--",
                    label=f"{MODEL_TITLES[model]} ({combiner})")
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel(f"accuracy under {ATTACK_TITLES[sweep['attack']]} (%)")
    ax.set_xticks(ticks)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def write_report(results: dict, out: str | Path) -> Path:
    out = Path(out)
    plot_sweep(results, out / SWEEP_PLOT)
    if results.get("diagnostics"):
        from igat_core.theory.plots import plot_diagnostics

        plot_diagnostics(results["diagnostics"], out / DIAGNOSTICS_PLOT)
    path = out / REPORT_FILE
    path.write_text(render_report(results))
    return path
