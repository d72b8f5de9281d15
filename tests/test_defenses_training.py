"""Each base method trains an ensemble on digits and lowers its own loss, then serves as L_E inside iGAT;
through the runner, SoE's routed members and CLDL's label-confusion model travel from pretraining to iGAT."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from igat_core.data import Split, load_dataset
from igat_core.defenses import CLDL, build_method
from igat_core.ensemble import Ensemble, load_ensemble
from igat_core.igat import IgatConfig, IgatObjective
from igat_core.runner import IGAT_CHECKPOINT, RunContext, base_method, fine_tune, igat_config, pretrain
from igat_core.spec import parse_spec
from igat_core.train import LAST_CHECKPOINT, TrainConfig, fit
from tests.conftest import digits_config

# small settings so that an epoch of each method costs seconds on two cores
FAST = {
    "adp": {},
    "gal": {},
    "dverge": {"steps": 3, "layer": 4},
    "trs": {"adv_steps": 1},
    "soe": {"adv_steps": 3, "adv_eps": 0.1, "adv_step": 0.04},
    "cldl": {},
}


def subset(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n], split.info)


def fixed_loss(method, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    return method.loss(ensemble, x, y, torch.Generator().manual_seed(0)).loss.item()


@pytest.mark.parametrize("name", sorted(FAST))
def test_one_epoch_lowers_the_loss_then_igat_fine_tunes(name, digits_train, tmp_path):
    method = build_method(name, FAST[name])
    torch.manual_seed(0)
    ensemble = Ensemble(method.configure_model(digits_config(width=8)), 3)
    method.setup(ensemble)
    train = subset(digits_train, 384)
    x, y = train.images[:64], train.labels[:64]
    method.start_epoch(ensemble, 1, 1)
    before = fixed_loss(method, ensemble, x, y)
    result = fit(ensemble, method, train, TrainConfig(epochs=1, batch_size=16, lr=0.01, optimizer="adam"),
                 tmp_path / "base", progress=False)
    after = fixed_loss(method, ensemble, x, y)
    assert after < 0.97 * before, (before, after, result.history)
    saved = torch.load(tmp_path / "base" / LAST_CHECKPOINT, weights_only=True)["method"]
    assert saved.keys() == method.state_dict().keys()
    if name == "cldl":
        assert all(torch.equal(v, method.lcm.state_dict()[k]) for k, v in saved["lcm"].items())

    alpha, beta = method.igat_defaults
    objective = IgatObjective(method, IgatConfig(alpha=alpha, beta=beta, eps=0.1, step=0.05, steps=2))
    tuned = fit(ensemble, objective, subset(train, 64), TrainConfig(epochs=1, batch_size=32, lr=0.01),
                tmp_path / "igat", progress=False)
    metrics = tuned.history[0]
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(k.startswith("base_") for k in metrics) and "global_adv_loss" in metrics


@pytest.mark.parametrize("name", ["soe", "cldl"])
def test_runner_carries_the_method_from_pretraining_into_igat(name, tmp_path):
    spec = parse_spec({
        "name": f"tiny-{name}",
        "dataset": {"name": "digits", "train_limit": 128},
        "ensemble": {"members": 2, "architecture": "small_cnn", "width": 8},
        "base": {"method": name, "params": FAST[name], "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}},
        "igat": {"attack": {"eps": 0.1, "step": 0.05, "steps": 2},
                 "train": {"epochs": 1, "batch_size": 64, "lr": 1e-9}},
        "resources": {"device": "cpu"},
    })
    ctx = RunContext(spec, tmp_path, torch.device("cpu"), progress=False)
    train = load_dataset("digits", "train", train_limit=128)
    pretrain(ctx, train)
    fine_tune(ctx, "igat", train, IgatObjective(base_method(ctx), igat_config(spec)))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["pretrain", "igat"]
    if name == "soe":
        ensemble = load_ensemble(tmp_path / IGAT_CHECKPOINT, combiner="routed")
        assert ensemble.config.aux_head and ensemble(torch.rand(3, 1, 8, 8)).shape == (3, 10)
        assert metrics[1]["base_aux_bce"] > 0
    else:
        base = torch.load(tmp_path / "checkpoints/base" / LAST_CHECKPOINT, weights_only=True)["method"]["lcm"]
        tuned = torch.load(tmp_path / "checkpoints/igat" / LAST_CHECKPOINT, weights_only=True)["method"]["lcm"]
        # a learning rate of 1e-9 leaves the pretrained label-confusion model in place during iGAT
        for key in base:
            assert torch.allclose(base[key], tuned[key], atol=1e-6)


def test_resumed_cldl_training_restores_its_label_confusion_model(digits_train, tmp_path):
    train = subset(digits_train, 128)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.01, optimizer="adam")

    def run(epochs: int, out: str) -> tuple[Ensemble, CLDL]:
        torch.manual_seed(0)
        method = CLDL()
        ensemble = Ensemble(digits_config(width=8), 2)
        fit(ensemble, method, train, dataclasses.replace(config, epochs=epochs), tmp_path / out, progress=False)
        return ensemble, method

    whole, whole_method = run(2, "whole")
    run(1, "parts")
    resumed, resumed_method = run(2, "parts")
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(whole_method.parameters(), resumed_method.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
