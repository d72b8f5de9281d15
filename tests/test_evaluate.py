"""evaluate_ensemble: every attack under both combiners, the union, the surrogate for the max combiner, the eps
sweep, the sanity checks, and the records the runner and `igat eval` write."""

from __future__ import annotations

import json

import pytest

import igat_core.evaluate as ev
from igat_core.evaluate import (ATTACK_ORDER, EnsembleEvaluation, EvalConfig, _Extremes, correct_mask,
                                evaluate_ensemble, evaluation_record, relative_improvement, sanity_checks)
from igat_core.spec import EvalSpec

SMALL = dict(eps=0.1, step=0.025, steps=10, batch_size=40, signhunter_queries=60, simba_queries=80,
             bandits_queries=60, autoattack_steps=3, square_queries=40, sanity_pgd_steps=20,
             sanity_pgd_restarts=2, sanity_examples=12)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(digits_test):
    return digits_test.images[::10], digits_test.labels[::10]


@pytest.fixture(scope="module")
def full(trained_ensemble, examples, tmp_path_factory):
    config = EvalConfig(attacks=ATTACK_ORDER, eps_sweep=(0.2, 0.03, 0.1), eps_sweep_attack="pgd", **SMALL)
    return evaluate_ensemble(trained_ensemble, *examples, config, progress=False,
                             state_dir=tmp_path_factory.mktemp("state"))


def test_every_attack_under_both_combiners_with_union_and_cost(full):
    for combiner in ("average", "max"):
        acc = full.accuracy[combiner]
        assert set(acc) == {*ATTACK_ORDER, "union"}
        attacked = [v for a, v in acc.items() if a != "natural"]
        assert all(0.0 <= v <= acc["natural"] for v in attacked)
        assert acc["union"] == pytest.approx(min(acc.values()), abs=1e-9) or acc["union"] < min(acc.values())
        assert acc["pgd"] < acc["natural"]
        cost = full.cost[combiner]
        assert 0 < cost["signhunter"] <= 60 and 0 < cost["simba"] <= 80 and 0 < cost["bandits"] <= 60
        assert cost["pgd"] >= 10


def test_sweep_runs_at_each_eps_in_the_given_order(full):
    assert full.sweep_eps == (0.2, 0.03, 0.1)
    for values in full.sweep.values():
        assert len(values) == 3 and values[0] <= values[2] <= values[1]


def test_sanity_checks_cover_every_requirement(full):
    names = {c.name for c in full.sanity}
    for combiner in ("average", "max"):
        assert {f"attacks_below_natural_{combiner}", f"black_box_not_stronger_{combiner}",
                f"pgd_converged_{combiner}", f"monotone_in_eps_{combiner}"} <= names
    checks = {c.name: c for c in full.sanity}
    assert checks["perturbation_within_eps"].passed and checks["pixels_within_range"].passed
    assert checks["monotone_in_eps_average"].passed


def test_max_combiner_also_attacks_the_average_surrogate_on_still_robust_examples(trained_ensemble, examples,
                                                                                  monkeypatch):
    calls: list[tuple[str, str, int]] = []
    real = ev.make_attack

    def spy(name, model, config, generator, **kwargs):
        attack = real(name, model, config, generator, **kwargs)
        inner = attack.__call__

        class Recorder:
            cost = None

            def __call__(self, images, labels):
                calls.append((name, model.combiner, len(labels)))
                adv = inner(images, labels)
                self.cost = attack.cost
                return adv

        return Recorder()

    monkeypatch.setattr(ev, "make_attack", spy)
    x, y = examples[0][:20], examples[1][:20]
    config = EvalConfig(attacks=("natural", "pgd", "signhunter"), combiners=("max",), **{**SMALL, "sanity_examples": 0})
    evaluate_ensemble(trained_ensemble, x, y, config, progress=False)
    pgd = [c for c in calls if c[0] == "pgd"]
    assert [c[1] for c in pgd] == ["max", "average"] and pgd[1][2] <= pgd[0][2]
    assert [c[1] for c in calls if c[0] == "signhunter"] == ["max"]


def test_the_max_combiners_surrogate_attempt_reuses_the_average_combiners_adversarial_examples(
        trained_ensemble, examples, monkeypatch):
    calls: list[tuple[str, int]] = []
    real = ev.make_attack

    def spy(name, model, config, generator, **kwargs):
        attack = real(name, model, config, generator, **kwargs)
        original = attack.forward
        attack.forward = lambda x, y: (calls.append((model.combiner, len(y))), original(x, y))[1]
        return attack

    monkeypatch.setattr(ev, "make_attack", spy)
    x, y = examples[0][:20], examples[1][:20]
    config = EvalConfig(attacks=("pgd",), combiners=("max", "average"), **{**SMALL, "sanity_examples": 0})
    evaluate_ensemble(trained_ensemble, x, y, config, progress=False)
    average_correct = int(correct_mask(trained_ensemble, x, y).sum())
    max_correct = int(correct_mask(trained_ensemble.with_combiner("max"), x, y).sum())
    assert calls[:2] == [("average", average_correct), ("max", max_correct)]
    assert sum(n for c, n in calls[2:]) <= max(0, max_correct - average_correct)
    calls.clear()
    evaluate_ensemble(trained_ensemble, x, y, EvalConfig(**{**config.__dict__, "combiners": ("max",)}),
                              progress=False)
    assert [c for c, _ in calls] == ["max", "average"]


def test_an_attack_gives_the_same_number_whatever_else_runs(trained_ensemble, examples):
    x, y = examples[0][:20], examples[1][:20]
    config = dict(SMALL, combiners=("average",), sanity_examples=0)
    alone = evaluate_ensemble(trained_ensemble, x, y, EvalConfig(attacks=("pgd",), **config), progress=False)
    together = evaluate_ensemble(trained_ensemble, x, y, EvalConfig(attacks=("natural", "cw", "pgd"), **config),
                                 progress=False)
    assert alone.accuracy["average"]["pgd"] == together.accuracy["average"]["pgd"]
    assert alone.accuracy["average"]["union"] == alone.accuracy["average"]["pgd"]


def evaluation(accuracy: dict, sweep: dict | None = None, sweep_eps: tuple = ()) -> EnsembleEvaluation:
    return EnsembleEvaluation(accuracy=accuracy, sweep=sweep or {}, sweep_eps=sweep_eps)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_black_box_beating_white_box_by_more_than_half_a_point_fails():
    acc = {"average": {"natural": 90.0, "pgd": 50.0, "autoattack": 45.0, "signhunter": 44.6, "simba": 44.4}}
    check = by_name(sanity_checks(evaluation(acc), _Extremes(), EvalConfig(), {}))["black_box_not_stronger_average"]
    assert not check.passed and "simba 44.40" in check.detail and "signhunter" not in check.detail.split(":")[-1]


def test_non_monotone_sweep_and_pgd_gap_and_eps_excess_fail():
    extremes = _Extremes(excess=1e-3, low=0.0, high=1.0)
    checks = by_name(sanity_checks(
        evaluation({"max": {"natural": 90.0, "pgd": 50.0}}, {"max": [40.0, 60.0, 30.0]}, (0.03, 0.01, 0.02)),
        extremes, EvalConfig(), {"max": (50.0, 47.5, 200)}))
    assert not checks["perturbation_within_eps"].passed
    assert not checks["pgd_converged_max"].passed
    assert not checks["monotone_in_eps_max"].passed
    assert checks["attacks_below_natural_max"].passed
    ok = by_name(sanity_checks(evaluation({"max": {"pgd": 50.0}}, {"max": [60.0, 50.0, 40.0]}, (0.01, 0.02, 0.03)),
                               _Extremes(excess=0.0), EvalConfig(), {"max": (50.0, 48.0, 200)}))
    assert ok["pgd_converged_max"].passed and ok["monotone_in_eps_max"].passed
    assert ok["perturbation_within_eps"].passed


def test_config_from_spec_and_validation():
    spec = EvalSpec(attacks=["natural", "simba"], eps="4/255", eps_sweep=True, eps_sweep_values=["1/255", "2/255"],
                    signhunter_queries=100, cw_kappa=0)
    config = EvalConfig.from_spec(spec, seed=3)
    assert config.attacks == ("natural", "simba") and config.seed == 3 and config.cw_kappa == 0
    assert config.eps_sweep == pytest.approx((1 / 255, 2 / 255)) and config.signhunter_queries == 100
    assert EvalConfig.from_spec(EvalSpec()).eps_sweep == ()
    with pytest.raises(ValueError, match="unknown attacks"):
        EvalConfig(attacks=("natural", "deepfool"))
    with pytest.raises(ValueError):
        EvalSpec(attacks=["pgd", "pgd"])
    with pytest.raises(ValueError):
        EvalSpec(signhunter_queries=0)


def test_evaluation_record_is_json_with_models_checks_cost_and_sweep(full):
    config = EvalConfig(eps_sweep=(0.2, 0.03, 0.1), eps_sweep_attack="pgd")
    record = json.loads(json.dumps(evaluation_record({"base": full, "igat": full}, config, 36)))
    assert record["accuracy"]["igat"]["max"]["bandits"] == full.accuracy["max"]["bandits"]
    assert "igat.black_box_not_stronger_max" in record["sanity"]
    assert record["cost"]["base"]["average"]["simba"] == full.cost["average"]["simba"]
    assert record["eps_sweep"]["attack"] == "pgd" and record["eps_sweep"]["accuracy"]["base"]["max"]
    assert "eps_sweep" not in evaluation_record({"base": full}, EvalConfig(), 36)


def test_relative_improvement_is_table_2():
    base = {"average": {"pgd": 40.0, "cw": 0.0}}
    assert relative_improvement(base, {"average": {"pgd": 44.0, "cw": 1.0}}) == {"average": {"pgd": 10.0, "cw": None}}
