"""`eval.transfer_from` in a run: `standard` trains the source once as its own resumable phase, with its own seed;
a checkpoint of another input shape is refused naming the field."""

from __future__ import annotations

import pytest
import torch

from igat_core import load_ensemble
from igat_core.ensemble import CheckpointError, Ensemble
from igat_core.rundir import STATE_FILE, read_json
from igat_core.runner import BASE_CHECKPOINT, TRANSFER_SOURCE, TRANSFER_SOURCE_CHECKPOINT, model_config, run_experiment
from igat_core.spec import ExperimentSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {
    "name": "transfer",
    "seed": 3,
    "dataset": {"name": "digits", "train_limit": 300},
    "ensemble": {"members": 2, "architecture": "small_cnn", "width": 8},
    "base": {"method": "plain", "train": {"epochs": 2, "batch_size": 64, "lr": 0.1}},
    "igat": {"enabled": False},
    "eval": {"attacks": ["natural", "pgd", "transfer"], "transfer_from": "standard", "eps": 0.1, "step": 0.025,
             "steps": 5, "n_examples": 40, "sanity_examples": 0, "diagnostics_examples": 0},
    "resources": {"device": "cpu"},
}


def test_a_standard_source_is_trained_once_with_its_own_seed_and_transfer_is_reported(tmp_path):
    spec = ExperimentSpec.model_validate(SPEC)
    results = run_experiment(spec, tmp_path, progress=False)
    assert read_json(tmp_path / STATE_FILE)["phases"][TRANSFER_SOURCE]["done"]
    source, base = load_ensemble(tmp_path / TRANSFER_SOURCE_CHECKPOINT), load_ensemble(tmp_path / BASE_CHECKPOINT)
    assert source.num_members == base.num_members == 2
    assert not torch.equal(next(source.parameters()), next(base.parameters()))
    for combiner, acc in results["evaluation"]["base"].items():
        assert {"transfer", "union", "union_standard"} <= set(acc), combiner
        assert acc["union"] <= min(acc["transfer"], acc["union_standard"])
        assert results["attack_cost"]["base"][combiner]["transfer"] == 10
    assert set(results["adaptive_verdict"]["base"]) == {"average", "max"}
    made = (tmp_path / TRANSFER_SOURCE_CHECKPOINT).stat().st_mtime_ns
    assert run_experiment(spec, tmp_path, progress=False)["evaluation"] == results["evaluation"]
    assert (tmp_path / TRANSFER_SOURCE_CHECKPOINT).stat().st_mtime_ns == made


def test_a_source_checkpoint_for_other_inputs_is_refused_naming_the_field(tmp_path):
    spec = ExperimentSpec.model_validate(SPEC)
    cifar = model_config(ExperimentSpec.model_validate({**SPEC, "dataset": {"name": "cifar10"}}))
    path = tmp_path / "cifar_source.pt"
    Ensemble(cifar, 2).save(path)
    wrong = spec.model_copy(update={"eval": spec.eval.model_copy(update={"transfer_from": str(path)})})
    with pytest.raises(CheckpointError, match=r"eval.transfer_from .* takes 3x32x32 images with 10 classes, but "
                                              r"digits has 1x8x8"):
        run_experiment(wrong, tmp_path / "run", progress=False)
