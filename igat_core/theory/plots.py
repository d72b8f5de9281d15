"""PNG plots for the report: the risk curves of Theorem 4.1 and the supplement's diagnostics (Tables 4-8)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from igat_core.figures import pyplot, save_figure


def plot_risks(path: str | Path, measured: Mapping[str, float | None] | None = None) -> Path:
    """r1(p) and r2(p) over [0, 1] with the exact threshold; optionally the measured risks at the measured p."""
    from igat_core.theory.risks import PAPER_THRESHOLD, THRESHOLD, ensemble_risk, single_risk

    plt = pyplot()
    ps = [k / 400 for k in range(401)]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(ps, [single_risk(p) for p in ps], label="single model r1(p)")
    ax.plot(ps, [ensemble_risk(p) for p in ps], label="ensemble of two r2(p)")
    ax.axvline(THRESHOLD, color="gray", ls="--", lw=1, label=f"p* = {THRESHOLD:.4f}")
    ax.axvline(PAPER_THRESHOLD, color="gray", ls=":", lw=1, label=f"paper {PAPER_THRESHOLD}")
    if measured and measured.get("p") is not None:
        p = measured["p"]
        for key, marker in (("single", "o"), ("average", "s"), ("max", "^")):
            if measured.get(key) is not None:
                ax.plot([p], [measured[key]], marker, label=f"measured {key}")
    ax.set_xlabel("p")
    ax.set_ylabel("expected 0-1 risk on an ambiguous pair")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_diagnostics(diagnostics: Mapping[str, Mapping], path: str | Path) -> Path:
    """One figure for models such as {"base": ..., "igat": ...}: the Table 5 histogram and Tables 4, 6, 7, 8."""
    plt = pyplot()
    models = [m for m, d in diagnostics.items() if d]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        hist = diagnostics[model]["correct_score_histogram"]
        xs = [i + k * width for i in range(len(hist["percent"]))]
        left.bar(xs, hist["percent"], width, label=model)
    if models:
        labels = diagnostics[models[0]]["correct_score_histogram"]["labels"]
        left.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=8)
    left.set_xlabel("member's true-class score when it is correct")
    left.set_ylabel("% of correct (member, example)")
    left.set_title("Table 5", fontsize=9)
    left.legend(fontsize=8)
    metrics = [("p", "p (T4)", 0.01), ("largest_wrong_score", "wrong (T6)", 1.0),
               ("small_wrong_score_rate", "A4.4 (T7)", 0.01), ("best_member_score_on_errors", "best (T8)", 1.0)]
    for k, model in enumerate(models):
        values = [(diagnostics[model].get(key) or 0.0) * scale for key, _, scale in metrics]
        right.bar([i + k * width for i in range(len(metrics))], values, width, label=model)
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], [t for _, t, _ in metrics], fontsize=8)
    right.set_ylim(0, 1)
    right.set_ylabel("rate or score")
    right.set_title("Tables 4, 6, 7, 8 on global adversarial examples", fontsize=9)
    right.legend(fontsize=8)
    return save_figure(fig, path)
