"""Combiners on hand-made probabilities, the supplement's toy example, checkpoints and DVERGE import."""

from __future__ import annotations

import math

import pytest
import torch

from igat_core import load_ensemble
from igat_core.ensemble import Ensemble, combine_log_probs, combine_probs, import_dverge_checkpoint
from igat_core.models import ModelConfig, build_model
from tests.conftest import digits_config


def as_logits(probs: list[list[list[float]]]) -> torch.Tensor:
    """(N, B, C) logits whose softmax is exactly the given probabilities."""
    return torch.tensor(probs, dtype=torch.float64).log()


def test_average_and_max_combiners_on_hand_made_probabilities():
    logits = as_logits([[[0.7, 0.2, 0.1]], [[0.1, 0.6, 0.3]]])
    avg = combine_log_probs(logits, "average").exp()
    assert avg.tolist()[0] == pytest.approx([0.4, 0.4, 0.2])
    mx = combine_log_probs(logits, "max").exp()
    assert mx.tolist()[0] == pytest.approx([0.7, 0.6, 0.3])
    assert combine_probs(logits.exp(), "max").tolist()[0] == pytest.approx([0.7, 0.6, 0.3])


def test_log_probabilities_are_clamped_at_1e_40():
    logits = torch.tensor([[[0.0, -200.0]], [[0.0, -300.0]]], dtype=torch.float64)
    out = combine_log_probs(logits, "max")
    assert out[0, 1].item() == pytest.approx(math.log(1e-40))


def zero_one_risk(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Eq. (4): the share of examples whose true-class score is below the best other class."""
    true = scores.gather(1, labels.unsqueeze(1)).squeeze(1)
    other = scores.scatter(1, labels.unsqueeze(1), -1.0).max(dim=1).values
    return float((true < other).float().mean())


def test_toy_example_of_the_supplement():
    # x_i = 0.3 (class 0) is classified well by h0, x_j = 0.7 (class 1) by h1; h = h0 (supplement section 3)
    h0 = torch.tensor([[0.9, 0.1], [0.64, 0.36]])
    h1 = torch.tensor([[0.37, 0.63], [0.11, 0.89]])
    labels = torch.tensor([0, 1])
    members = torch.stack([h0, h1])
    assert zero_one_risk(combine_probs(members, "max"), labels) == 0.0
    assert zero_one_risk(combine_probs(members, "average"), labels) == 0.0
    assert zero_one_risk(h0, labels) == 0.5


def test_member_outputs_and_forward_agree():
    torch.manual_seed(0)
    ensemble = Ensemble(digits_config(), members=4).eval()
    x = torch.rand(5, 1, 8, 8)
    logits = ensemble.member_logits(x)
    assert logits.shape == (4, 5, 10)
    assert torch.allclose(ensemble.member_probs(x).sum(-1), torch.ones(4, 5), atol=1e-6)
    expected = torch.log(torch.softmax(logits, -1).mean(0))
    assert torch.allclose(ensemble(x), expected, atol=1e-5)
    assert torch.allclose(ensemble.with_combiner("max")(x), torch.log(torch.softmax(logits, -1).amax(0)), atol=1e-5)


def test_saved_checkpoint_is_self_describing_and_loads_weights_only(tmp_path):
    torch.manual_seed(1)
    ensemble = Ensemble(digits_config("mlp", 24), members=2, combiner="max").eval()
    path = tmp_path / "e.pt"
    ensemble.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["model"]["architecture"] == "mlp"
    assert payload["model"]["num_classes"] == 10 and payload["members"] == 2 and payload["combiner"] == "max"
    assert len(payload["model"]["mean"]) == 1
    loaded = load_ensemble(path)
    assert not loaded.training and loaded.combiner == "average"
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(loaded.member_logits(x), ensemble.member_logits(x))
    assert torch.allclose(load_ensemble(path, combiner="max")(x), ensemble(x))


def test_load_ensemble_returns_normalised_log_probabilities(trained_ensemble, digits_test, tmp_path):
    trained_ensemble.save(tmp_path / "e.pt")
    model = load_ensemble(tmp_path / "e.pt", combiner="average")
    with torch.no_grad():
        out = model(digits_test.images[:50])
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(50), atol=1e-5)


def test_import_of_dverge_style_checkpoint(tmp_path):
    info = {"num_classes": 10, "in_channels": 3, "height": 32, "width_px": 32}
    config = ModelConfig("resnet20", mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), **info)
    torch.manual_seed(2)
    nets = [build_model(config).net for _ in range(3)]
    payload = {f"model_{i}": {**{f"model.{k}": v for k, v in net.state_dict().items()},
                              "normalizer.mean": torch.zeros(3), "normalizer.std": torch.ones(3)}
               for i, net in enumerate(nets)}
    torch.save(payload, tmp_path / "dverge.pth")
    ensemble = import_dverge_checkpoint(tmp_path / "dverge.pth", config)
    assert ensemble.num_members == 3
    x = torch.rand(2, 3, 32, 32)
    for net, member in zip(nets, ensemble.members):
        net.eval()
        assert torch.allclose(member(x), net((x - member.mean) / member.std), atol=1e-5)


def test_resnet20_shape_and_size():
    config = ModelConfig("resnet20", 10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3, "leaky_relu")
    net = build_model(config)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in net.parameters()) == 272_474
    names = dict(net.net.named_modules())
    assert "layer3.2.conv2" in names and "layer2.0.downsample.0" in names
    assert isinstance(net.net.act, torch.nn.LeakyReLU)


def test_small_cnn_on_28x28_and_8x8():
    for size in (8, 28):
        config = ModelConfig("small_cnn", 10, 1, size, size, (0.5,), (0.5,))
        assert build_model(config)(torch.rand(4, 1, size, size)).shape == (4, 10)
