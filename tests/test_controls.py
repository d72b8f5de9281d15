"""The equal-budget controls: `continued` is L_E alone (no global attack, BatchNorm untouched by adversarial
inputs), `global_at` sees iGAT's global adversarial examples, both losses match hand-derived values, and every
fine-tune from a shared base checkpoint starts with the base method's trained state (CLDL)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from igat_core import igat
from igat_core.attacks import PGD
from igat_core.data import Split
from igat_core.defenses import CLDL, GAL, Plain
from igat_core.ensemble import Ensemble, load_ensemble, method_state
from igat_core.igat import (FineTuning, GlobalAdversarialTraining, IgatConfig, IgatObjective, control_objective,
                            ensemble_adversarial_loss, fine_tune_objective)
from igat_core.runner import BASE_CHECKPOINT, IGAT_CHECKPOINT, Runner, base_method, igat_config
from igat_core.spec import parse_spec
from igat_core.train import TrainConfig, batch_indices, epoch_seed, fit
from tests.conftest import digits_config

CONFIG = IgatConfig(eps=0.1, step=0.05, steps=2)
TRAIN = TrainConfig(epochs=1, batch_size=64, lr=0.02, seed=4)


def resnet_ensemble() -> Ensemble:
    torch.manual_seed(5)
    return Ensemble(digits_config("resnet20"), members=2)


def subset(split: Split, n: int = 192) -> Split:
    return Split(split.images[:n], split.labels[:n], split.info)


def batchnorm_statistics(ensemble: Ensemble) -> torch.Tensor:
    return torch.cat([b.flatten().float() for name, b in ensemble.named_buffers() if "running" in name])


def parameters(ensemble: Ensemble) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in ensemble.parameters()])


@pytest.fixture
def global_attack_calls(monkeypatch) -> list[int]:
    """Counts the PGD runs of the global step (the real attack runs; only its calls are counted)."""
    calls: list[int] = []
    real = igat.global_batch

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(igat, "global_batch", counted)
    return calls


def test_continued_is_l_e_alone_and_never_attacks(digits_train, tmp_path, global_attack_calls, monkeypatch):
    pgd_runs: list[int] = []
    real_forward = PGD.forward
    monkeypatch.setattr(PGD, "forward", lambda self, x, y: pgd_runs.append(1) or real_forward(self, x, y))
    data = subset(digits_train)
    alone, continued = resnet_ensemble(), resnet_ensemble()
    fit(alone, Plain(), data, TRAIN, tmp_path / "alone", progress=False)
    fit(continued, control_objective("continued", Plain(), CONFIG), data, TRAIN, tmp_path / "continued",
        progress=False)
    assert global_attack_calls == [] and pgd_runs == []
    assert torch.equal(batchnorm_statistics(continued), batchnorm_statistics(alone))
    assert torch.equal(parameters(continued), parameters(alone))


def test_a_zero_weight_global_step_does_move_batchnorm_statistics(digits_train, tmp_path, global_attack_calls):
    """The BatchNorm comparison above can fail: the global step's cat(x, x_adv) pass in train mode moves the
    running statistics even when alpha = beta = 0."""
    data = subset(digits_train)
    alone, zero_weight = resnet_ensemble(), resnet_ensemble()
    fit(alone, Plain(), data, TRAIN, tmp_path / "alone", progress=False)
    fit(zero_weight, IgatObjective(Plain(), IgatConfig(alpha=0.0, beta=0.0, eps=0.1, step=0.05, steps=2)), data,
        TRAIN, tmp_path / "zero", progress=False)
    assert len(global_attack_calls) == 3
    assert not torch.equal(batchnorm_statistics(zero_weight), batchnorm_statistics(alone))


def recorded_global_examples(objective: FineTuning, ensemble: Ensemble, data: Split, monkeypatch) -> list:
    """The global adversarial examples `objective` makes on each batch of one epoch, `ensemble` held fixed."""
    seen: list[torch.Tensor] = []
    real = igat.global_batch

    def recording(*args, **kwargs):
        batch = real(*args, **kwargs)
        seen.append(batch.x_adv.detach().clone())
        return batch

    monkeypatch.setattr(igat, "global_batch", recording)
    generator = torch.Generator().manual_seed(epoch_seed(TRAIN.seed, 1))
    for idx in batch_indices(len(data.labels), TRAIN.batch_size, generator):
        objective(ensemble, data.images[idx], data.labels[idx], generator)
    monkeypatch.setattr(igat, "global_batch", real)
    return seen


def test_global_at_and_igat_see_the_same_global_adversarial_examples(trained_ensemble, digits_train, monkeypatch):
    data = subset(digits_train)
    ensemble = copy.deepcopy(trained_ensemble).train()
    # GAL's L_E draws input noise from the same generator, before the global step
    igat_seen = recorded_global_examples(IgatObjective(GAL(), CONFIG), ensemble, data, monkeypatch)
    control_seen = recorded_global_examples(GlobalAdversarialTraining(GAL(), CONFIG), ensemble, data, monkeypatch)
    assert len(igat_seen) == len(control_seen) == 3
    for a, b in zip(igat_seen, control_seen):
        assert torch.equal(a, b)


def test_global_at_and_igat_start_training_on_the_same_global_examples(trained_ensemble, digits_train, tmp_path,
                                                                        monkeypatch):
    first: dict[str, torch.Tensor] = {}
    real = igat.global_batch
    for name, objective in (("igat", IgatObjective(Plain(), CONFIG)),
                            ("global_at", GlobalAdversarialTraining(Plain(), CONFIG))):
        def recording(*args, _name=name, **kwargs):
            batch = real(*args, **kwargs)
            first.setdefault(_name, batch.x_adv.detach().clone())
            return batch

        monkeypatch.setattr(igat, "global_batch", recording)
        fit(copy.deepcopy(trained_ensemble), objective, subset(digits_train), TRAIN, tmp_path / name, progress=False)
    assert torch.equal(first["igat"], first["global_at"])


def test_ensemble_adversarial_loss_matches_hand_computed_values():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                           [[0.0, 3.0], [1.0, 0.0], [0.5, 0.0]]])  # (N=2, B=3, C=2)
    labels = torch.tensor([0, 1, 0])
    ce = [[-F.log_softmax(logits[i, b], 0)[labels[b]].item() for b in range(3)] for i in range(2)]
    charged = torch.tensor([1.0, 0.0, 1.0])
    member = ensemble_adversarial_loss(logits, labels, charged, "member")
    assert member.item() == pytest.approx(sum((ce[i][0] + ce[i][2]) / 2 for i in range(2)), rel=1e-6)
    batch = ensemble_adversarial_loss(logits, labels, charged, "batch")
    assert batch.item() == pytest.approx(sum(ce[i][0] + ce[i][2] for i in range(2)) / 3, rel=1e-6)


def test_global_at_loss_is_l_e_plus_alpha_times_every_members_adversarial_ce(trained_ensemble, digits_train):
    x, y = digits_train.images[:32], digits_train.labels[:32]
    config = IgatConfig(alpha=2.5, eps=0.1, step=0.05, steps=2)
    out = GlobalAdversarialTraining(Plain(), config)(trained_ensemble, x, y, torch.Generator().manual_seed(1))
    batch = igat.global_batch(trained_ensemble, x, y, config, torch.Generator().manual_seed(1))
    adv_logits = batch.logits[:, 32:]
    expected_adv = sum(F.cross_entropy(adv_logits[i], y) for i in range(trained_ensemble.num_members))
    plain = Plain().loss(trained_ensemble, x, y).loss
    assert out.loss.item() == pytest.approx(plain.item() + 2.5 * expected_adv.item(), rel=1e-5)
    assert out.metrics["global_adv_loss"] == pytest.approx(expected_adv.item(), rel=1e-5)
    assert "regularizer" not in out.metrics


def test_unknown_control_is_refused():
    with pytest.raises(ValueError, match="unknown control 'noise'"):
        control_objective("noise", Plain(), CONFIG)


def tiny_cldl_spec(checkpoint: str | None = None) -> dict:
    igat_train = {"optimizer": "adam", "epochs": 1, "batch_size": 64, "lr": 1e-3}
    return {"name": "cldl-handoff", "seed": 2, "dataset": {"name": "digits", "train_limit": 256},
            "ensemble": {"members": 2, "width": 8},
            "base": {"method": "cldl", "checkpoint": checkpoint,
                     "train": {"optimizer": "adam", "epochs": 2, "batch_size": 64, "lr": 0.01}},
            "igat": {"enabled": checkpoint is not None, "attack": {"eps": 0.1, "step": 0.05, "steps": 2},
                     "train": igat_train},
            "controls": ["continued"] if checkpoint is not None else [],
            "eval": {"attacks": ["natural"], "combiners": ["average"], "n_examples": 20, "sanity_examples": 0,
                     "diagnostics_examples": 0},
            "resources": {"device": "cpu"}}


def label_confusion_weights(state: dict) -> torch.Tensor:
    return torch.cat([t.flatten() for t in state["lcm"].values()])


def stored_label_confusion_weights(path) -> torch.Tensor:
    stored = method_state(torch.load(path, weights_only=True))
    assert stored is not None and stored.name == "cldl"
    return label_confusion_weights(stored.state)


def test_a_cldl_run_from_base_checkpoint_fine_tunes_with_the_trained_label_confusion_model(tmp_path):
    Runner(parse_spec(tiny_cldl_spec()), tmp_path / "pretrained", progress=False).run()
    shared = tmp_path / "pretrained" / BASE_CHECKPOINT
    trained = stored_label_confusion_weights(shared)
    untrained = CLDL()
    untrained.setup(load_ensemble(shared))
    assert not torch.equal(label_confusion_weights(untrained.state_dict()), trained)

    runner = Runner(parse_spec(tiny_cldl_spec(checkpoint=str(shared))), tmp_path / "loaded", progress=False)
    runner.run()
    for model in ("igat", "continued"):
        objective = fine_tune_objective(model, base_method(runner.context), igat_config(runner.spec))
        assert torch.equal(label_confusion_weights(objective.state_dict()), trained)
    assert not torch.equal(stored_label_confusion_weights(tmp_path / "loaded" / IGAT_CHECKPOINT), trained)
    assert torch.equal(stored_label_confusion_weights(shared), trained)
