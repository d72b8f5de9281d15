"""Studies: the spec names the field of every problem, the plan is deterministic and shares one pretrained base per
(dataset, ensemble, base, seed), the statistics match hand-computed values, the tables count failed runs without
averaging them, and `igat study` trains each seed's base once and builds Table 3 over the seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from igat_core.cli import app
from igat_core.rundir import model_checkpoint, study_run_dir
from igat_core.stats import paired_difference, summarize
from igat_core.study import run_planned
from igat_core.study_report import render_study_report
from igat_core.study_results import RunOutcome, study_record
from igat_core.study_spec import StudySpecError, parse_study, plan_record, plan_study, shared_base_key
from tests.service_fixtures import TINY_EXPERIMENT

T_975_1 = 12.706204736174707
T_975_2 = 4.302652729911275
T_975_3 = 3.182446305284263

ABLATION = {"name": "abl", "experiment": TINY_EXPERIMENT, "grid": {"seed": [0, 1]},
            "arms": {"igat": {"controls": ["global_at"]}, "hard": {"igat.rule": "hard"}},
            "tables": ["table3", "table2"]}


def study(**changes) -> dict:
    return {**ABLATION, **changes}


def problems(data: dict) -> dict[str, str]:
    with pytest.raises(StudySpecError) as info:
        parse_study(data)
    return dict(info.value.problems)


# ------------------------------------------------------------------------------------------------- the spec


def test_a_bad_grid_value_is_named_by_its_path_and_index():
    found = problems(study(grid={"seed": [0], "igat.rule": ["soft", "hard", "median"]}))
    assert list(found) == ["grid.igat.rule[2]"] and "'soft', 'hard', 'random' or 'opposite'" in found[
        "grid.igat.rule[2]"]


def test_unknown_paths_fields_and_values_are_named():
    assert "no field 'colour' in igat" in problems(study(grid={"igat.colour": [1]}))["grid.igat.colour"]
    assert "seed is a value" in problems(study(grid={"seed.x": [1]}))["grid.seed.x"]
    assert "Extra inputs" in problems(study(grids={}))["grids"]
    assert "greater than or equal to 1" in problems(
        study(experiment={**TINY_EXPERIMENT, "ensemble": {"members": 0}}))["experiment.ensemble.members"]
    assert problems(study(grid={"seed": [0, 0]})) == {"grid.seed[1]": "repeats 0"}
    assert "at least 1 item" in problems(study(grid={"seed": []}))["grid.seed"]


def test_arms_may_change_only_settings_after_pretraining():
    found = problems(study(arms={"igat": {}, "other": {"base.method": "gal", "igat.rule": "hard"}}))
    assert list(found) == ["arms.other.base.method"] and "only igat.* and controls" in found["arms.other.base.method"]


def test_the_reference_arm_and_table3_need_arms():
    assert "'igat' is not an arm" in problems(study(arms={"soft": {}}))["reference_arm"]
    assert "add another arm" in problems(study(arms={"igat": {}}, tables=["table3"]))["tables"]


def test_a_problem_of_the_combination_names_the_override_that_made_it():
    found = problems(study(variants={"gal": {"base.method": "gal"}},
                           experiment={**TINY_EXPERIMENT, "base": {"method": "adp", "params": {"alpha": 2.0}}}))
    assert "unknown parameter 'alpha' for base method 'gal'" in found["variants.gal.base.method"]
    found = problems(study(arms={"igat": {"controls": ["global_at"], "igat.enabled": False}, "hard": {}}))
    assert "controls need igat.enabled" in found["experiments.abl-seed0-igat"] and len(found) == 1


def test_the_cli_refuses_a_bad_study_with_exit_2_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study(grid={"seed": [0], "igat.rule": ["soft", "hardest"]})))
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "invalid study spec" in result.output and "grid.igat.rule[1]" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_example_studies_plan():
    root = Path(__file__).resolve().parents[1] / "examples" / "studies"
    from igat_core.study_spec import load_study

    ablation, paper = plan_study(load_study(root / "ablation.yaml")), plan_study(load_study(root / "paper.yaml"))
    assert {p.spec.seed for p in ablation} == {0, 1, 2, 3, 4}
    assert {p.arm for p in ablation} == {"igat", "hard", "random", "opposite", "beta0"}
    assert sum(p.base_of is None for p in ablation) == 5
    assert {p.spec.base.method for p in paper} == {"adp", "dverge", "cldl", "soe", "gal", "trs"}
    assert all(p.spec.igat.enabled == (p.spec.base.method not in ("gal", "trs")) for p in paper)
    assert sum(p.base_of is None for p in paper) == len(paper) == 18


# ------------------------------------------------------------------------------------------------- the plan


def test_the_plan_is_ordered_named_and_shares_one_base_per_seed():
    plan = plan_study(parse_study(study(arms={"igat": {"controls": ["global_at"]}, "hard": {"igat.rule": "hard"},
                                              "beta0": {"igat.beta": 0}})))
    assert [(p.name, p.base_of) for p in plan] == [
        ("abl-seed0-igat", None), ("abl-seed0-hard", "abl-seed0-igat"), ("abl-seed0-beta0", "abl-seed0-igat"),
        ("abl-seed1-igat", None), ("abl-seed1-hard", "abl-seed1-igat"), ("abl-seed1-beta0", "abl-seed1-igat")]
    assert plan[1].spec.igat.rule == "hard" and plan[2].spec.igat.beta == 0 and plan[0].spec.controls == ["global_at"]
    assert plan[0].spec.name == "abl-seed0-igat" and plan[3].spec.seed == 1
    again = plan_study(parse_study(study(arms={"igat": {"controls": ["global_at"]}, "hard": {"igat.rule": "hard"},
                                               "beta0": {"igat.beta": 0}})))
    assert json.dumps(plan_record(parse_study(study()), again)) == json.dumps(plan_record(parse_study(study()), plan))


def test_methods_and_seeds_do_not_share_a_base_while_eval_and_igat_settings_do():
    plan = plan_study(parse_study(study(
        variants={"plain": {}, "pgd": {"base.method": "pgd_at"}},
        grid={"seed": [0, 1], "eval.n_examples": [8, 16], "igat.beta": [0.0, 5.0]}, arms={"igat": {}}, tables=[])))
    trainers = [p for p in plan if p.base_of is None]
    assert [(p.variant, p.spec.seed) for p in trainers] == [("plain", 0), ("plain", 1), ("pgd", 0), ("pgd", 1)]
    for p in plan:
        trainer = next(t for t in trainers if t.name == (p.base_of or p.name))
        assert (trainer.variant, trainer.spec.seed) == (p.variant, p.spec.seed)
    assert plan[0].name == "abl-plain-seed0-n_examples8-beta0.0-igat"
    assert shared_base_key(plan[0].spec) != shared_base_key(plan[-1].spec)


@pytest.mark.parametrize("field,value", [("precision", "bf16"), ("channels_last", True), ("threads", 2)])
def test_a_base_trained_with_other_arithmetic_is_not_shared(field, value):
    plan = plan_study(parse_study(study(experiment=TINY_EXPERIMENT, grid={"seed": [0]},
                                        variants={"ref": {}, "other": {f"resources.{field}": value},
                                                  "device": {"resources.device": "auto"}})))
    trainer = {p.variant: p.base_of or p.name for p in plan}
    assert trainer["other"] != trainer["ref"] and trainer["device"] == trainer["ref"]


def test_a_cldl_study_hands_each_base_with_its_method_state_to_the_other_arms(tmp_path, monkeypatch):
    experiment = {**TINY_EXPERIMENT, "base": {"method": "cldl", "train": {"epochs": 1, "batch_size": 64, "lr": 0.01}}}
    plan = plan_study(parse_study(study(experiment=experiment)))
    hard = plan[1]
    assert hard.base_of == plan[0].name and hard.spec.base.checkpoint is None
    import igat_core.runner

    handed: list = []
    monkeypatch.setattr(igat_core.runner, "run_experiment", lambda spec, out, progress: handed.append(spec) or {})
    missing = run_planned(hard, tmp_path, progress=False)
    assert missing.status == "failed" and "left no pretrained base" in missing.error and handed == []
    checkpoint = study_run_dir(tmp_path, plan[0].name) / model_checkpoint("base")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    assert run_planned(hard, tmp_path, progress=False).succeeded
    assert handed[0].base.checkpoint == str(checkpoint.resolve())
    assert handed[0].model_copy(update={"base": hard.spec.base}) == hard.spec


def test_the_arms_share_the_standard_transfer_source_their_base_experiment_trains(tmp_path, monkeypatch):
    transfer = {**TINY_EXPERIMENT["eval"], "attacks": ["natural", "transfer"], "transfer_from": "standard"}
    plan = plan_study(parse_study(study(experiment={**TINY_EXPERIMENT, "eval": transfer})))
    trainer, hard = plan[0], plan[1]
    assert hard.base_of == trainer.name and hard.shares_transfer_source and not trainer.shares_transfer_source
    untrained = {"eval.transfer_from": None, "eval.attacks": ["natural"]}
    own = plan_study(parse_study(study(experiment={**TINY_EXPERIMENT, "eval": transfer},
                                       variants={"none": untrained, "std": {}})))
    dependents = [p for p in own if p.variant == "std"]
    assert all(p.base_of and own[0].spec.eval.transfer_from is None for p in dependents)
    assert not any(p.shares_transfer_source for p in own)
    import igat_core.runner

    handed: list = []
    monkeypatch.setattr(igat_core.runner, "run_experiment", lambda spec, out, progress: handed.append(spec) or {})
    base_dir = study_run_dir(tmp_path, trainer.name)
    for model in ("base", "transfer_source"):
        (base_dir / model_checkpoint(model)).parent.mkdir(parents=True)
        if model == "base":
            (base_dir / model_checkpoint(model)).write_bytes(b"")
            missing = run_planned(hard, tmp_path, progress=False)
            assert "left no transfer source" in missing.error and "pretrained base" not in missing.error
    (base_dir / model_checkpoint("transfer_source")).write_bytes(b"")
    assert run_planned(hard, tmp_path, progress=False).succeeded
    assert handed[0].eval.transfer_from == str((base_dir / model_checkpoint("transfer_source")).resolve())
    assert handed[0].base.checkpoint == str((base_dir / model_checkpoint("base")).resolve())


# ------------------------------------------------------------------------------------------------ statistics


def test_mean_and_sample_std_by_hand():
    s = summarize([1.0, 2.0, 4.0])
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares sum to 42/9; divided by n - 1 = 2: 7/3
    assert s.n == 3 and s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(math.sqrt(7 / 3))
    assert summarize([5.0]).std is None and summarize([]).mean is None


def test_paired_t_interval_by_hand():
    d = paired_difference([3.0, 5.0, 9.0], [2.0, 3.0, 5.0])
    # differences 1, 2, 4: mean 7/3, sd sqrt(7/3); half-width t_{0.975,2} * sd / sqrt(3)
    half = T_975_2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert d.summary.mean == pytest.approx(7 / 3) and d.summary.std == pytest.approx(math.sqrt(7 / 3))
    assert d.low == pytest.approx(7 / 3 - half) and d.high == pytest.approx(7 / 3 + half)
    d4 = paired_difference([1.5, 0.0, 3.0, 2.5], [1.0, 1.0, 1.0, 1.0])
    # differences 0.5, -1, 2, 1.5: mean 0.75; squared deviations 0.0625 + 3.0625 + 1.5625 + 0.5625 = 5.25; / 3
    half = T_975_3 * math.sqrt(5.25 / 3) / 2
    assert (d4.low, d4.high) == (pytest.approx(0.75 - half), pytest.approx(0.75 + half))


def test_one_pair_has_no_interval():
    d = paired_difference([3.0], [1.0])
    assert d.summary.mean == 2.0 and d.low is d.high is None and d.record()["note"] == "one pair: no interval"
    assert paired_difference([], []).record()["note"] == "no pairs"
    with pytest.raises(ValueError, match="one length"):
        paired_difference([1.0], [])


# ----------------------------------------------------------------------------------------------- aggregation


def results_of(natural: dict[str, float], pgd: dict[str, float]) -> dict:
    return {"evaluation": {"eps": 0.1, "n_examples": 16,
                           **{m: {"average": {"natural": natural[m], "pgd": pgd[m]}} for m in natural}}}


def synthetic_outcomes() -> dict[str, RunOutcome]:
    """Three seeds; the reference arm igat (with global_at) failed at seed 2."""
    base_nat, base_pgd = [90.0, 92.0, 91.0], [40.0, 42.0, 41.0]
    outcomes = {}
    for seed, (igat_pgd, global_pgd, hard_pgd) in enumerate([(50.0, 48.0, 47.0), (54.0, 50.0, 52.0),
                                                             (None, None, 45.0)]):
        if igat_pgd is not None:
            outcomes[f"abl-seed{seed}-igat"] = RunOutcome.of_results(results_of(
                {"base": base_nat[seed], "global_at": 90.0, "igat": 91.0 + seed},
                {"base": base_pgd[seed], "global_at": global_pgd, "igat": igat_pgd}))
        outcomes[f"abl-seed{seed}-hard"] = RunOutcome.of_results(results_of(
            {"base": base_nat[seed], "igat": 89.0}, {"base": base_pgd[seed], "igat": hard_pgd}))
    outcomes["abl-seed2-igat"] = RunOutcome.failure("RuntimeError: out of memory")
    return outcomes


def one(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_tables_average_the_succeeded_runs_and_count_the_failed_one():
    spec = parse_study(study(grid={"seed": [0, 1, 2]}, tables=["table1", "table2", "table3"]))
    record = study_record(spec, plan_study(spec), synthetic_outcomes())
    assert record["counts"] == {"planned": 6, "succeeded": 5, "pending": 0, "failed": 1}
    row = one(record["table1"], model="igat", combiner="average", attack="pgd")
    # seeds 0, 1: 50 and 54: mean 52, sd sqrt((4 + 4) / 1)
    assert (row["mean"], row["std"], row["n"], row["failed"]) == (52.0, pytest.approx(math.sqrt(8)), 2, 1)
    assert row["failed_runs"] == ["abl-seed2-igat"]
    rel = one(record["table2"]["relative_improvement"], combiner="average", attack="pgd")
    # (50 - 40) / 40 x 100 = 25 and (54 - 42) / 42 x 100 = 200 / 7
    assert rel["mean"] == pytest.approx((25 + 200 / 7) / 2) and rel["n"] == 2 and rel["failed"] == 1
    vs_global = one(record["table2"]["paired"], comparison="igat - global_at", attack="pgd")
    # differences 2 and 4: mean 3, sd sqrt(2); half-width t_{0.975,1} * sqrt(2) / sqrt(2)
    assert vs_global["mean"] == pytest.approx(3.0) and vs_global["n"] == 2 and vs_global["failed"] == 1
    assert (vs_global["low"], vs_global["high"]) == (pytest.approx(3 - T_975_1), pytest.approx(3 + T_975_1))
    hard = one(record["table3"], arm="hard", attack="pgd")
    # 47, 52, 45: mean 48, squared deviations 1 + 16 + 9 = 26, / 2
    assert (hard["mean"], hard["std"], hard["n"], hard["failed"]) == (48.0, pytest.approx(math.sqrt(13)), 3, 0)
    difference = hard["difference"]
    # pairs of seeds 0, 1: 47 - 50 = -3, 52 - 54 = -2: mean -2.5, sd sqrt(0.5); half-width t * sqrt(0.5) / sqrt(2)
    assert difference["mean"] == pytest.approx(-2.5) and difference["n"] == 2
    assert difference["high"] == pytest.approx(-2.5 + T_975_1 * 0.5)
    assert difference["failed_runs"] == ["abl-seed2-igat"]
    assert one(record["table3"], arm="igat", attack="pgd")["failed"] == 1
    report = render_study_report(record)
    assert "abl-seed2-igat | igat | failed | RuntimeError: out of memory" in report
    assert "52.00 ± 2.83 (n=2; 1 failed)" in report


#: Per seed, accuracy[model] under the average combiner; seed 2 is an older run: no ensemble-aware attack, no
#: union_standard.
UNION_SEEDS = [
    {"base": {"natural": 90.0, "pgd": 40.0, "mora": 30.0, "union_standard": 38.0, "union": 28.0},
     "igat": {"natural": 91.0, "pgd": 50.0, "mora": 36.0, "union_standard": 48.0, "union": 35.0}},
    {"base": {"natural": 92.0, "pgd": 42.0, "mora": 34.0, "union_standard": 41.0, "union": 32.0},
     "igat": {"natural": 92.0, "pgd": 54.0, "mora": 40.0, "union_standard": 52.0, "union": 39.0}},
    {"base": {"natural": 91.0, "pgd": 41.0, "union": 41.0}, "igat": {"natural": 93.0, "pgd": 45.0, "union": 44.0}},
]


def union_record(dropped: frozenset[str] = frozenset()) -> dict:
    """The study of UNION_SEEDS (global_at not run), the `dropped` attacks taken out of every run."""
    spec = parse_study(study(grid={"seed": [0, 1, 2]}, tables=["table1", "table2"]))
    outcomes = {f"abl-seed{seed}-igat": RunOutcome.of_results({"evaluation": {"eps": 0.1, "n_examples": 16, **{
        m: {"average": {a: v for a, v in acc.items() if a not in dropped}} for m, acc in by_model.items()}}})
        for seed, by_model in enumerate(UNION_SEEDS)}
    return study_record(spec, plan_study(spec), outcomes)


def test_the_worst_case_union_and_the_union_without_ensemble_aware_attacks_over_seeds():
    record = union_record()
    union = one(record["table1"], model="igat", attack="union")
    # 35, 39, 44: mean 118/3; squares 1225 + 1521 + 1936 = 4682, minus 118^2 / 3: 122/3; / (n - 1) = 2: 61/3
    assert (union["mean"], union["std"], union["n"]) == (pytest.approx(118 / 3), pytest.approx(math.sqrt(61 / 3)), 3)
    standard = one(record["table1"], model="igat", attack="union_standard")
    # seeds 0, 1 only: 48, 52: mean 50, sd sqrt(8); the older seed 2 is named, not filled in
    assert (standard["mean"], standard["std"], standard["n"]) == (50.0, pytest.approx(math.sqrt(8)), 2)
    assert standard["missing_runs"] == ["abl-seed2-igat"] and union["missing_runs"] == []
    rel = one(record["table2"]["relative_improvement"], attack="union")
    # (35 - 28) / 28 = 25 %, (39 - 32) / 32 = 21.875 %, (44 - 41) / 41 = 300/41 %
    assert rel["mean"] == pytest.approx((25 + 21.875 + 300 / 41) / 3) and rel["n"] == 3
    paired = one(record["table2"]["paired"], comparison="igat - base", attack="union_standard")
    # differences 48 - 38 = 10 and 52 - 41 = 11
    assert (paired["mean"], paired["n"], paired["missing_runs"]) == (10.5, 2, ["abl-seed2-igat"])
    report = render_study_report(record)
    header = next(line for line in report.splitlines() if line.startswith("| method | model"))
    assert header.endswith("| average PGD | average MORA | average Union w/o ens.-aware | average Union |")
    assert "| iGAT | 92.00 ± 1.00 (n=3) | 49.67 ± 4.51 (n=3) | 38.00 ± 2.83 (n=2; 1 missing) | " \
           "50.00 ± 2.83 (n=2; 1 missing) | 39.33 ± 4.51 (n=3) |" in report
    assert "Union counts the ensemble-aware attacks too" in report


def test_a_study_without_union_standard_shows_the_union_it_has_and_no_empty_column():
    record = union_record(frozenset({"mora", "union_standard"}))
    assert {r["attack"] for r in record["table1"]} == {"natural", "pgd", "union"}
    report = render_study_report(record)
    assert "w/o ens.-aware" not in report and "ensemble-aware attacks too" not in report
    assert "| iGAT | 92.00 ± 1.00 (n=3) | 49.67 ± 4.51 (n=3) | 39.33 ± 4.51 (n=3) |" in report
    assert "Union: correct under natural and every attack that ran, the worst case over them." in report


def test_runs_not_yet_finished_are_pending_not_failed():
    spec = parse_study(study())
    record = study_record(spec, plan_study(spec), {"abl-seed0-igat": synthetic_outcomes()["abl-seed0-igat"]})
    assert record["counts"] == {"planned": 4, "succeeded": 1, "pending": 3, "failed": 0}
    hard = one(record["table3"], arm="hard", attack="natural")
    assert hard["n"] == 0 and hard["mean"] is None and hard["pending"] == 2 and hard["failed"] == 0


def test_a_run_that_raises_is_recorded_as_failed_and_the_study_goes_on(tmp_path, monkeypatch):
    import igat_core.runner

    def fake_run(spec, out, progress):
        if spec.name == "abl-seed1-igat":
            raise RuntimeError("disk full")
        checkpoint = Path(out) / model_checkpoint("base")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"")
        return synthetic_outcomes()[spec.name].results

    monkeypatch.setattr(igat_core.runner, "run_experiment", fake_run)
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(ABLATION, sort_keys=False))
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "[3/4] abl-seed1-igat: failed: RuntimeError: disk full" in result.output
    assert "[4/4] abl-seed1-hard: failed: its base experiment abl-seed1-igat left no pretrained base" in result.output
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["counts"] == {"planned": 4, "succeeded": 2, "pending": 0, "failed": 2}
    hard = one(record["table3"], arm="hard", attack="pgd")
    assert (hard["mean"], hard["n"], hard["failed_runs"]) == (47.0, 1, ["abl-seed1-hard"])
    assert hard["difference"]["note"] == "one pair: no interval"


# --------------------------------------------------------------------------------------------- end to end


def state_of(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())["phases"]


def metric_phases(run: Path) -> set[str]:
    return {json.loads(line)["phase"] for line in (run / "metrics.jsonl").read_text().splitlines()}


@pytest.mark.slow
def test_igat_study_trains_each_seed_once_and_builds_table3(tmp_path):
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(ABLATION, sort_keys=False))
    out = tmp_path / "study"
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "study.json").read_text())["experiments"]
    assert [(p["name"], p["base_of"]) for p in plan] == [
        ("abl-seed0-igat", None), ("abl-seed0-hard", "abl-seed0-igat"),
        ("abl-seed1-igat", None), ("abl-seed1-hard", "abl-seed1-igat")]
    for seed in (0, 1):
        trainer, loader = out / "runs" / f"abl-seed{seed}-igat", out / "runs" / f"abl-seed{seed}-hard"
        assert "loaded" not in state_of(trainer)["pretrain"] and "pretrain" in metric_phases(trainer)
        assert state_of(loader)["pretrain"]["loaded"] == str((trainer / model_checkpoint("base")).resolve())
        assert "pretrain" not in metric_phases(loader) and "global_at" in state_of(trainer)
    record = json.loads((out / "results.json").read_text())
    assert record["counts"]["succeeded"] == 4
    assert {(r["arm"], r["attack"]): r["n"] for r in record["table3"]} == {
        ("igat", "natural"): 2, ("igat", "pgd"): 2, ("hard", "natural"): 2, ("hard", "pgd"): 2}
    assert one(record["table3"], arm="hard", attack="pgd")["difference"]["low"] is not None
    assert one(record["table2"]["paired"], comparison="igat - global_at", attack="pgd")["n"] == 2
    assert (out / "report.md").read_text().startswith("# Study abl") and (out / "plots/study_table3.png").is_file()
    again = CliRunner().invoke(app, ["study", str(path), "--out", str(out), "--quiet"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["table3"] == record["table3"]
