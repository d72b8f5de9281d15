"""scripts/example_table.py: the README's per-method table and, beside it, the union without the ensemble-aware
attacks and the worst-case union of base, global_at and iGAT; results older than the ensemble-aware attacks show
what they hold ("-" for the union without them) and a missing results file is left out."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.example_table import tables

PASSED = {"passed": True}


def new_results() -> dict:
    """A run with MORA: union_standard (over natural and PGD) above the worst-case union (MORA too)."""
    def acc(natural: float, pgd: float, mora: float, standard: float, union: float) -> dict:
        return {"natural": natural, "pgd": pgd, "mora": mora, "union_standard": standard, "union": union}

    by_model = {"base": acc(90.0, 40.0, 30.0, 39.0, 28.0), "global_at": acc(91.0, 50.0, 35.0, 49.5, 33.0),
                "igat": acc(92.0, 51.0, 36.0, 50.25, 35.5)}
    return {"spec": {"base": {"method": "adp"}},
            "evaluation": {m: {"average": a, "max": a} for m, a in by_model.items()},
            "gain_points": {"global_at": {c: {"pgd": 1.0, "union_standard": 0.75, "union": 2.5}
                                          for c in ("average", "max")}},
            "sanity": {"igat.pgd_converged_max": {"passed": False}, "base.pixels_within_range": PASSED}}


def old_results() -> dict:
    """A run before the ensemble-aware attacks: no union_standard, no gain for it, no continued control."""
    acc = {"natural": 95.0, "pgd": 60.0, "union": 59.0}
    return {"spec": {"base": {"method": "gal"}},
            "evaluation": {"eps": 0.2, "base": {"average": acc}, "igat": {"average": {**acc, "union": 61.0}}},
            "gain_points": {"base": {"average": {"union": 2.0}}}, "sanity": {}}


def test_the_union_table_shows_both_unions_and_falls_back_for_older_results(tmp_path: Path):
    (tmp_path / "new.json").write_text(json.dumps(new_results()))
    (tmp_path / "old.json").write_text(json.dumps(old_results()))
    first, second = tables(["new", "absent", "old"], tmp_path).split("\n\n")
    assert first.splitlines()[2:] == [
        "| new (adp) | average | 90.0 / - / 91.0 / 92.0 | 40.0 / - / 50.0 / 51.0 | +1.0 | none |",
        "| new (adp) | max | 90.0 / - / 91.0 / 92.0 | 40.0 / - / 50.0 / 51.0 | +1.0 | igat.pgd_converged_max |",
        "| old (gal) | average | 95.0 / - / - / 95.0 | 60.0 / - / - / 60.0 | - | none |",
        "| old (gal) | max | - / - / - / - | - / - / - / - | - | none |"]
    assert second.splitlines()[0].startswith("| example | combiner | ensemble-aware attacks | union w/o them")
    assert second.splitlines()[2:] == [
        "| new (adp) | average | mora | 39.0 / 49.5 / 50.2 | 28.0 / 33.0 / 35.5 | +0.8 / +2.5 |",
        "| new (adp) | max | mora | 39.0 / 49.5 / 50.2 | 28.0 / 33.0 / 35.5 | +0.8 / +2.5 |",
        "| old (gal) | average | none | - / - / - | 59.0 / - / 61.0 | - / - |",
        "| old (gal) | max | none | - / - / - | - / - / - | - / - |"]
