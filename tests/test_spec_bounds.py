"""The spec's values and sizes: no NaN/Infinity anywhere (YAML's .nan and .inf too), every list and string bounded,
`base.checkpoint`'s form checked, and the study's free-form fields held to the same; each refusal names its field."""

from __future__ import annotations

from typing import get_args

import pytest
import yaml

from igat_core.spec import (MAX_MILESTONES, AttackName, CheckpointReference, SpecError, checkpoint_reference, load_spec,
                            parse_spec)
from igat_core.study_spec import MAX_DEPTH, MAX_ENTRIES, MAX_EXPERIMENTS, StudySpecError, parse_study


def problems_of(data: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    return dict(caught.value.problems)


def study_problems_of(data: dict) -> dict[str, str]:
    with pytest.raises(StudySpecError) as caught:
        parse_study({"name": "s", **data})
    return dict(caught.value.problems)


def test_yaml_nan_and_inf_are_refused_with_the_field_named(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": {"method": "adp", "params": {"alpha": "placeholder"}}})
                    .replace("placeholder", ".nan") + "igat: {beta: .inf}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert dict(caught.value.problems) == {"base.params.alpha": "Value error, must be a finite number, got nan",
                                           "igat.beta": "Input should be a finite number"}


@pytest.mark.parametrize("value,reason", [
    ("x" * 257, "at most 256 characters"),
    ([1, 2], "must be a number, true/false or a string, got list"),
    ({"a": 1}, "must be a number, true/false or a string, got dict"),
    (2**70, "signed 64-bit range"),
])
def test_params_values_are_short_finite_scalars(value, reason):
    assert reason in problems_of({"base": {"method": "adp", "params": {"alpha": value}}})["base.params.alpha"]


def test_lists_are_bounded():
    milestones = list(range(1, MAX_MILESTONES + 2))
    found = problems_of({"base": {"train": {"epochs": 1, "lr": 0.1, "milestones": milestones}},
                         "eval": {"attacks": ["pgd"] * (len(get_args(AttackName)) + 1),
                                  "combiners": ["max"] * 3}})
    assert set(found) == {"base.train.milestones", "eval.attacks", "eval.combiners"}
    assert all("at most" in reason for reason in found.values())
    parse_spec({"base": {"train": {"epochs": 1, "lr": 0.1, "milestones": milestones[:-1]}}})


@pytest.mark.parametrize("checkpoint,reason", [
    ("/a\x00b.pt", "NUL or other control characters"),
    ("/a\nb.pt", "NUL or other control characters"),
    ("/" + "a" * 4096, "at most 4096 characters"),
    ("/" + "é" * 128 + "/x.pt", "longer than 255 bytes"),
    ("", "must name a file"),
    ("/a\ud800.pt", "no lone surrogates"),
    ("experiment:", "a reference to another experiment is"),
    ("experiment:a/b/c", "a reference to another experiment is"),
    ("experiment:" + "a" * 65, "a reference to another experiment is"),
])
def test_checkpoint_forms_are_checked(checkpoint, reason):
    assert reason in problems_of({"base": {"checkpoint": checkpoint}})["base.checkpoint"]


def test_checkpoint_references_and_paths():
    assert checkpoint_reference("experiment:abc-1") == CheckpointReference("abc-1", "base")
    assert checkpoint_reference("experiment:abc/global_at") == CheckpointReference("abc", "global_at")
    assert checkpoint_reference("/runs/x/checkpoints/base/ensemble.pt") is None
    assert parse_spec({"base": {"checkpoint": "../any/local/path.pt"}}).base.checkpoint == "../any/local/path.pt"


def test_study_fields_are_finite_and_bounded():
    assert study_problems_of({"grid": {"igat.beta": [1.0, float("inf")]}}) == {
        "grid.igat.beta[1]": "must be a finite number, got inf"}
    assert study_problems_of({"variants": {"v": {"base.params": {"alpha": float("nan")}}}}) == {
        "variants.v.base.params.alpha": "must be a finite number, got nan"}
    deep: list = []
    inner = deep
    for _ in range(MAX_DEPTH + 2):
        inner.append([])
        inner = inner[0]
    assert list(study_problems_of({"grid": {"base.params": [deep]}}).values()) == [
        f"nested deeper than {MAX_DEPTH} levels"]
    assert "at most 2000 items" in study_problems_of({"grid": {"seed": list(range(MAX_EXPERIMENTS + 1))}})["grid.seed"]
    many = {f"v{i}": {} for i in range(MAX_ENTRIES + 1)}
    assert "at most 256 items" in study_problems_of({"variants": many})["variants"]
    assert "at most 4096 characters" in study_problems_of({"description": "d" * 4097})["description"]
