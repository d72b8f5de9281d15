"""REPRODUCTION.md against the committed study results (results/studies/NAME/): each study's results.json is what
its committed runs' results.json give, its spec is the example's (examples/studies/NAME.yaml), and every generated
block of REPRODUCTION.md is what scripts/reproduction.py renders from it; a changed run or a hand edit is caught."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from igat_core.rundir import RESULTS_FILE, STUDY_FILE, read_json, study_run_dir
from igat_core.study_spec import load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduction.py"
COMMITTED = sorted(p.parent.name for p in (ROOT / "results" / "studies").glob(f"*/{STUDY_FILE}"))


def reproduction():
    spec = importlib.util.spec_from_file_location("reproduction", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduction_md_has_one_generated_block_per_committed_study():
    assert "ablation" in COMMITTED
    assert sorted(reproduction().block_names((ROOT / "REPRODUCTION.md").read_text())) == COMMITTED


@pytest.mark.parametrize("name", COMMITTED)
def test_a_committed_study_is_its_runs_and_its_example_spec(name):
    study_dir = ROOT / "results" / "studies" / name
    committed = read_json(study_dir / STUDY_FILE)
    assert parse_study(committed["study"]) == load_study(ROOT / "examples" / "studies" / f"{name}.yaml")
    assert reproduction().study_record_of(study_dir) == read_json(study_dir / RESULTS_FILE)


def test_reproduction_md_shows_the_committed_tables():
    text = (ROOT / "REPRODUCTION.md").read_text()
    assert reproduction().rebuilt(text) == text


def test_a_changed_run_and_a_hand_edited_table_are_caught(tmp_path):
    """One run's iGAT PGD accuracy raised by 5 points moves its arm's mean by 5 / n and no longer matches the
    committed record; a hand-edited number in REPRODUCTION.md no longer matches its rendering."""
    module = reproduction()
    study_dir = tmp_path / "ablation"
    shutil.copytree(ROOT / "results" / "studies" / "ablation", study_dir)
    committed = read_json(study_dir / RESULTS_FILE)
    run = study_run_dir(study_dir, "ablation-seed0-hard") / RESULTS_FILE
    results = json.loads(run.read_text())
    results["evaluation"]["igat"]["average"]["pgd"] += 5.0
    run.write_text(json.dumps(results))
    changed = module.study_record_of(study_dir)
    assert changed != committed

    def hard_pgd(record: dict) -> dict:
        return next(r for r in record["table3"] if (r["arm"], r["combiner"], r["attack"]) == ("hard", "average", "pgd"))

    assert hard_pgd(changed)["mean"] == pytest.approx(hard_pgd(committed)["mean"] + 5.0 / hard_pgd(committed)["n"])
    text = (ROOT / "REPRODUCTION.md").read_text()
    cell = f"{hard_pgd(committed)['mean']:.2f} ± "
    assert cell in text
    assert module.rebuilt(text.replace(cell, "99.99 ± ", 1)) == text
    assert module.rebuilt(text.replace(cell, "99.99 ± ", 1)) != text.replace(cell, "99.99 ± ", 1)
