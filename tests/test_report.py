"""report.md: sanity checks first and never hiding numbers, Table 1 and Table 2 in the paper's layout, the further
attacks, the eps sweep table and its PNG; also what the runner's results phase hands the report."""

from __future__ import annotations

import json

import torch

from igat_core.report import (SWEEP_PLOT, accuracy_table, comparison_text, extra_table, improvement_table,
                              render_report, sweep_table, write_report)
from igat_core.runner import run_results
from igat_core.spec import parse_spec

ACC = {"natural": 90.0, "pgd": 40.0, "cw": 39.0, "signhunter": 55.0, "autoattack": 35.0, "simba": 70.0,
       "bandits": 60.0, "mim": 41.0, "union": 34.0}


def results(failed: bool = False, sweep: bool = True) -> dict:
    igat = {k: v + 1.0 for k, v in ACC.items()}
    evaluation = {"eps": 8 / 255, "n_examples": 100, "base": {"average": ACC, "max": ACC},
                  "igat": {"average": igat, "max": {**igat, "autoattack": 40.0}}}
    if sweep:
        evaluation["eps_sweep"] = {"attack": "autoattack", "eps": [2 / 255, 4 / 255, 8 / 255],
                                   "accuracy": {"base": {"average": [70.0, 55.0, 35.0], "max": [65.0, 50.0, 30.0]},
                                                "igat": {"average": [72.0, 57.0, 36.0]}}}
    return {
        "name": "demo", "evaluation": evaluation,
        "improvement": {"average": {"natural": 1.11, "pgd": 2.5, "cw": None},
                        "max": {"natural": 1.11, "pgd": -2.5}},
        "sanity": {"base.perturbation_within_eps": {"passed": True, "detail": "ok"},
                   "igat.black_box_not_stronger_max": {"passed": not failed, "detail": "signhunter 20.00"}},
        "attack_cost": {"base": {"average": {"pgd": 20.0, "signhunter": 312.4}}},
        "timing": {"evaluate": 12.0}, "artifacts": {"base_checkpoint": "checkpoints/base/ensemble.pt"},
    }


def test_table_1_has_the_papers_columns_per_combiner_and_a_row_per_model():
    lines = accuracy_table(results()).splitlines()
    assert lines[0] == ("| model | average Natural | average PGD | average CW | average SH | average AA | "
                        "max Natural | max PGD | max CW | max SH | max AA |")
    assert lines[2].startswith("| base | 90.00 | 40.00 | 39.00 | 55.00 | 35.00 | 90.00")
    assert lines[3].startswith("| iGAT | 91.00") and lines[3].endswith("| 40.00 |")


def test_further_attacks_table_holds_mim_simba_bandits_and_union():
    header = extra_table(results()).splitlines()[0]
    assert header == ("| model | average MIM | average SimBA | average Bandits | average Union | max MIM | max SimBA | "
                      "max Bandits | max Union |")


def test_table_2_is_one_row_of_signed_improvements_with_missing_values_marked():
    lines = improvement_table(results()).splitlines()
    assert lines[0] == "| | average Natural | average PGD | average CW | max Natural | max PGD | max CW |"
    assert lines[2] == "| iGAT vs base | +1.11 | +2.50 | n/a | +1.11 | -2.50 | n/a |"


def test_table_2_and_the_gains_have_a_row_per_reference_model_when_controls_ran():
    with_controls = results()
    with_controls["improvement_over"] = {"base": {"average": {"pgd": 2.5}}, "continued": {"average": {"pgd": 5.0}},
                                         "global_at": {"average": {"pgd": -1.25}}}
    with_controls["gain_points"] = {"base": {"average": {"pgd": 1.0}}, "continued": {"average": {"pgd": 2.0}},
                                    "global_at": {"average": {"pgd": -0.5}}}
    assert improvement_table(with_controls).splitlines()[2:] == [
        "| iGAT vs base | +2.50 |", "| iGAT vs continued | +5.00 |", "| iGAT vs global_at | -1.25 |"]
    text = render_report(with_controls)
    assert "| iGAT - global_at | -0.50 |" in text and "Gain in accuracy points" in text
    assert "iGAT's gain in accuracy points" in comparison_text(with_controls)


def test_report_puts_sanity_checks_first_and_flags_failures_without_hiding_numbers():
    text = render_report(results(failed=True))
    assert text.index("SANITY CHECKS FAILED") < text.index("## Sanity checks") < text.index("Table 1")
    assert "**FAIL** `igat.black_box_not_stronger_max`" in text
    assert "| iGAT | 91.00" in text
    assert "SANITY CHECKS FAILED" not in render_report(results())


def test_sweep_table_and_plot(tmp_path):
    table = sweep_table(results()).splitlines()
    assert table[0] == "| model | combiner | 2/255 | 4/255 | 8/255 |"
    assert "| iGAT | average | 72.00 | 57.00 | 36.00 |" in table
    write_report(results(), tmp_path)
    assert (tmp_path / SWEEP_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.md").read_text()
    assert f"]({SWEEP_PLOT})" in text and "supplement Table 2" in text
    assert "312" in text


def test_no_sweep_means_no_plot(tmp_path):
    write_report(results(sweep=False), tmp_path)
    assert not (tmp_path / "plots").exists()
    assert "against eps" not in (tmp_path / "report.md").read_text()


def test_runner_results_carry_sweep_cost_and_sanity_into_the_report(tmp_path):
    spec = parse_spec({"name": "r", "eval": {"eps": 0.1, "attacks": ["natural", "pgd", "simba"], "eps_sweep": True}})
    run = results()
    record = {"accuracy": {"base": run["evaluation"]["base"], "igat": run["evaluation"]["igat"]},
              "sanity": run["sanity"], "n_examples": 100, "cost": run["attack_cost"],
              "eps_sweep": run["evaluation"]["eps_sweep"]}
    (tmp_path / "evaluation.json").write_text(json.dumps(record))
    (tmp_path / "state.json").write_text(json.dumps({"phases": {"evaluate": {"done": True, "seconds": 3.0}}}))
    out = run_results(spec, tmp_path, torch.device("cpu"))
    assert out["evaluation"]["eps_sweep"]["attack"] == "autoattack"
    assert out["evaluation"]["igat"]["max"]["autoattack"] == 40.0
    assert out["improvement"]["average"]["pgd"] == (41.0 - 40.0) / 40.0 * 100
    assert out["attack_cost"] == run["attack_cost"] and out["sanity"] == run["sanity"]
    write_report(out, tmp_path)
    assert (tmp_path / SWEEP_PLOT).is_file()
    del record["eps_sweep"], record["cost"]
    (tmp_path / "evaluation.json").write_text(json.dumps(record))
    older = run_results(spec, tmp_path, torch.device("cpu"))
    assert "eps_sweep" not in older["evaluation"] and older["attack_cost"] == {}


def test_every_attack_of_the_spec_has_a_title_and_a_table():
    from typing import get_args

    from igat_core.report import ATTACK_TITLES, EXTRA_ATTACKS, TABLE1_ATTACKS
    from igat_core.spec import AttackName

    assert set(ATTACK_TITLES) == {*get_args(AttackName), "union", "union_standard"}
    assert sorted((*TABLE1_ATTACKS, *EXTRA_ATTACKS)) == sorted(ATTACK_TITLES)
