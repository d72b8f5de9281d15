"""A study's results.json -> its report.md and plots/: the runs that did not succeed first, then Table 1 (mean +-
std over seeds), Table 2 (relative improvement, paired differences with their intervals) and Table 3 (the
ablation arms against the reference arm), and bar plots with error bars (one standard deviation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from igat_core.figures import pyplot, save_figure
from igat_core.report import ATTACK_TITLES, MODEL_TITLES
from igat_core.rundir import PLOTS_DIR, REPORT_FILE, write_text_atomic
from igat_core.study_results import UNION_ORDER

TABLE1_PLOT = f"{PLOTS_DIR}/study_table1.png"
TABLE3_PLOT = f"{PLOTS_DIR}/study_table3.png"
UNION_NOTE = f"{ATTACK_TITLES['union']}: correct under natural and every attack that ran, the worst case over them."
UNION_STANDARD_NOTE = (f"{ATTACK_TITLES['union']} counts the ensemble-aware attacks too; "
                       f"{ATTACK_TITLES['union_standard']}: the same without them, from the runs in which one ran.")


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _excluded_text(row: dict) -> str:
    parts = [f"{row[k]} {k}" for k in ("failed", "pending") if row.get(k)]
    if row.get("missing_runs"):
        parts.append(f"{len(row['missing_runs'])} missing")
    return f"; {', '.join(parts)}" if parts else ""


def summary_cell(row: dict, signed: bool = False) -> str:
    """mean ± std (n), and the runs left out: `97.40 ± 0.31 (n=3; 1 failed)`."""
    spread = f" ± {row['std']:.2f}" if row.get("std") is not None else ""
    return f"{_number(row['mean'], signed)}{spread} (n={row['n']}{_excluded_text(row)})"


def difference_cell(row: dict) -> str:
    """mean difference [95 % interval] (n): `+1.20 [-0.53, +2.93] (n=3)`; no interval below two pairs."""
    interval = f" [{_number(row['low'], True)}, {_number(row['high'], True)}]" if row.get("low") is not None else ""
    return f"{_number(row['mean'], True)}{interval} (n={row['n']}{_excluded_text(row)})"


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1].replace("|", "\\|") if lines else ""


def _column(row: dict) -> str:
    return f"{row['combiner']} {ATTACK_TITLES.get(row['attack'], row['attack'])}"


def pivot(rows: Sequence[dict], keys: Sequence[str], cell) -> str:
    """A Markdown table: one line per distinct `keys` of the rows (a key empty in every row left out), one column
    per combiner x attack."""
    keys = [k for k in keys if any(r[k] not in ("", None) for r in rows)]
    columns = list(dict.fromkeys(_column(r) for r in rows))
    lines: dict[tuple, dict[str, str]] = {}
    for row in rows:
        lines.setdefault(tuple(row[k] for k in keys), {})[_column(row)] = cell(row)
    header = "| " + " | ".join([*keys, *columns]) + " |"
    out = [header, "|" + "---|" * len(keys) + "---:|" * len(columns)]
    for label, cells in lines.items():
        out.append("| " + " | ".join([*map(str, label), *(cells.get(c, "") for c in columns)]) + " |")
    return "\n".join(out)


def union_note(rows: Sequence[dict]) -> list[str]:
    """What the union columns hold, when the rows have one."""
    found = {r["attack"] for r in rows} & set(UNION_ORDER)
    if not found:
        return []
    return [" ".join([UNION_NOTE, *([UNION_STANDARD_NOTE] if "union_standard" in found else [])]), ""]


def runs_section(record: dict) -> list[str]:
    counts = record["counts"]
    lines = [f"{counts['planned']} runs planned: {counts['succeeded']} succeeded, {counts['failed']} failed, "
             f"{counts['pending']} pending. Reference arm: `{record['reference_arm']}`.", ""]
    bad = [r for r in record["runs"] if r["status"] != "succeeded"]
    if bad:
        lines += ["## Runs that did not succeed (counted in every row, never averaged)", "",
                  "| run | arm | status | error |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['arm']} | {r['status']} | {_last_line(r['error'])} |" for r in bad]
        lines.append("")
    return lines


def table1_section(rows: list[dict]) -> list[str]:
    shown = [{**r, "model": MODEL_TITLES.get(r["model"], r["model"])} for r in rows]
    return ["## Table 1: accuracy (%) over seeds, mean ± sample std (n)", "",
            pivot(shown, ("setting", "method", "model"), summary_cell), "", *union_note(rows),
            f"![Table 1]({TABLE1_PLOT})", ""]


def table2_section(table: dict) -> list[str]:
    lines = ["## Table 2: relative improvement by iGAT over the base, % (mean ± std over seeds)", "",
             pivot(table["relative_improvement"], ("setting", "method"), lambda r: summary_cell(r, True)), "",
             *union_note(table["relative_improvement"])]
    if table["paired"]:
        lines += ["### Paired differences in accuracy points, mean [95 % t interval] over seeds", "",
                  pivot(table["paired"], ("setting", "method", "comparison"), difference_cell), ""]
    return lines


def table3_section(rows: list[dict], reference_arm: str) -> list[str]:
    accuracy = pivot(rows, ("setting", "arm"), summary_cell)
    compared = [{**r["difference"], **{k: r[k] for k in ("setting", "arm", "combiner", "attack")}}
                for r in rows if r["difference"] is not None]
    lines = ["## Table 3: ablation arms, iGAT model, accuracy (%) over seeds", "", accuracy, ""]
    if compared:
        lines += [f"### Paired difference arm - {reference_arm}, accuracy points, mean [95 % t interval]", "",
                  pivot(compared, ("setting", "arm"), difference_cell), ""]
    return lines + [f"![Table 3]({TABLE3_PLOT})", ""]


def render_study_report(record: dict) -> str:
    parts = [f"# Study {record['name']}", ""]
    if record.get("description"):
        parts += [record["description"], ""]
    parts += runs_section(record)
    if record.get("table1"):
        parts += table1_section(record["table1"])
    if record.get("table2") and record["table2"]["relative_improvement"]:
        parts += table2_section(record["table2"])
    if record.get("table3"):
        parts += table3_section(record["table3"], record["reference_arm"])
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------- plots


def plot_bars(groups: list[str], series: dict[str, list[dict | None]], ylabel: str, path: str | Path) -> Path:
    """Grouped bars of each series' mean with one standard deviation as its error bar."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    for i, (label, rows) in enumerate(series.items()):
        means = [(r or {}).get("mean") or 0.0 for r in rows]
        errors = [(r or {}).get("std") or 0.0 for r in rows]
        ax.bar([g + i * width for g in range(len(groups))], means, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups, rotation=20,
                  ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_table1(rows: list[dict], path: str | Path) -> Path | None:
    """PGD accuracy (else the first attack) under the first combiner, per setting and model."""
    if not rows:
        return None
    attack = "pgd" if any(r["attack"] == "pgd" for r in rows) else rows[0]["attack"]
    chosen = [r for r in rows if r["attack"] == attack and r["combiner"] == rows[0]["combiner"]]
    groups = list(dict.fromkeys(r["setting"] or r["method"] for r in chosen))
    models = list(dict.fromkeys(r["model"] for r in chosen))
    found = {(r["setting"] or r["method"], r["model"]): r for r in chosen}
    series = {MODEL_TITLES.get(m, m): [found.get((g, m)) for g in groups] for m in models}
    label = f"{rows[0]['combiner']} {ATTACK_TITLES.get(attack, attack)} accuracy (%)"
    return plot_bars(groups, series, label, path)


def plot_table3(rows: list[dict], path: str | Path) -> Path | None:
    """Natural and PGD accuracy of each arm's iGAT model under the first combiner."""
    if not rows:
        return None
    chosen = [r for r in rows if r["combiner"] == rows[0]["combiner"]]
    groups = list(dict.fromkeys(f"{r['setting']} {r['arm']}".strip() for r in chosen))
    found = {(f"{r['setting']} {r['arm']}".strip(), r["attack"]): r for r in chosen}
    attacks = list(dict.fromkeys(r["attack"] for r in chosen))
    series = {ATTACK_TITLES.get(a, a): [found.get((g, a)) for g in groups] for a in attacks}
    return plot_bars(groups, series, f"{rows[0]['combiner']} combiner accuracy (%)", path)


def write_study_report(record: dict, out: str | Path) -> Path:
    out = Path(out)
    if record.get("table1"):
        plot_table1(record["table1"], out / TABLE1_PLOT)
    if record.get("table3"):
        plot_table3(record["table3"], out / TABLE3_PLOT)
    path = out / REPORT_FILE
    write_text_atomic(path, render_study_report(record))
    return path
