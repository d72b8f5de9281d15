"""ExperimentSpec: defaults, fractions, bounds, the resolved thread count, and the CLI's refusal of bad specs
(exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from igat_core.spec import ExperimentSpec, SpecError, dump_spec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def test_paper_defaults():
    spec = ExperimentSpec()
    assert spec.igat.alpha is None and spec.igat.beta is None and spec.igat.rule == "soft"
    assert spec.igat.attack.eps == pytest.approx(8 / 255) and spec.igat.attack.step == pytest.approx(2 / 255)
    assert spec.igat.attack.steps == 20 and spec.igat.attack.random_start
    assert spec.igat.train.batch_size == 512 and spec.igat.train.lr == 0.01


def test_fractions_are_accepted_for_perturbations():
    spec = parse_spec({"eval": {"eps": "8/255", "step": "2 / 255"}})
    assert spec.eval.eps == pytest.approx(8 / 255) and spec.eval.step == pytest.approx(2 / 255)


def test_every_bad_field_is_named():
    with pytest.raises(SpecError) as info:
        parse_spec({"ensemble": {"members": 0, "combiner": "median"}, "igat": {"alpha": -1, "colour": 3},
                    "eval": {"eps": "eight"}})
    fields = {path for path, _ in info.value.problems}
    assert {"ensemble.members", "ensemble.combiner", "igat.alpha", "igat.colour", "eval.eps"} <= fields


def test_milestones_must_increase():
    with pytest.raises(SpecError, match="milestones"):
        parse_spec({"igat": {"train": {"epochs": 5, "lr": 0.1, "milestones": [4, 2]}}})


@pytest.mark.parametrize(("spec", "field", "reason"), [
    ({"controls": ["continued", "noise"]}, "controls.1", "'continued' or 'global_at'"),
    ({"controls": ["global_at", "global_at"]}, "(root)", "controls must not repeat"),
    ({"controls": ["continued"], "igat": {"enabled": False}}, "(root)", "controls need igat.enabled"),
])
def test_bad_controls_are_refused_naming_the_reason(spec, field, reason):
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert any(path == field and reason in message for path, message in info.value.problems), info.value.problems


def test_threads_default_to_the_whole_cpus_of_one_worker_and_are_written_into_the_resolved_spec():
    assert ExperimentSpec().resources.threads == 1
    resolved = {cpus: parse_spec({"resources": {"cpus_per_worker": cpus}}).resources.threads
                for cpus in (0.25, 1, 1.5, 2, 4.9, 16)}
    assert resolved == {0.25: 1, 1: 1, 1.5: 1, 2: 2, 4.9: 4, 16: 16}
    assert parse_spec({"resources": {"cpus_per_worker": 8, "threads": 3}}).resources.threads == 3
    written = yaml.safe_load(dump_spec(parse_spec({"resources": {"cpus_per_worker": 4}})))
    assert written["resources"]["threads"] == 4
    assert load_spec(ROOT / "examples" / "quickstart.yaml").resources.threads == 1
    with pytest.raises(SpecError) as info:
        parse_spec({"resources": {"threads": 0}})
    assert [path for path, _ in info.value.problems] == ["resources.threads"]



def test_engine_and_precision_default_to_the_member_loop_in_fp32_and_reach_the_training_configs():
    from igat_core.runner import fine_tune_config, igat_config

    default = ExperimentSpec()
    assert (default.resources.engine, default.resources.precision, default.resources.cuda_graphs) == \
        ("loop", "fp32", False)
    chosen = parse_spec({"resources": {"engine": "fused", "precision": "bf16", "cuda_graphs": True}})
    assert (igat_config(chosen).engine, igat_config(chosen).cuda_graphs) == ("fused", True)
    assert fine_tune_config(chosen).precision == "bf16" and fine_tune_config(default).precision == "fp32"
    for field, value in (("engine", "vmap"), ("precision", "fp16")):
        with pytest.raises(SpecError) as info:
            parse_spec({"resources": {field: value}})
        assert [path for path, _ in info.value.problems] == [f"resources.{field}"]


def test_examples_are_valid_specs():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        assert load_spec(path).name


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igat_core.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_rejects_a_bad_spec_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nensemble:\n  members: -3\nigat:\n  rule: greedy\n")
    proc = run_cli("run", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "ensemble.members" in proc.stderr and "igat.rule" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_cli_reports_unreadable_yaml_and_missing_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    for path in (broken, tmp_path / "missing.yaml"):
        proc = run_cli("run", str(path))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(path.name) in proc.stderr
