"""The CPU speed-ups of the iGAT step give the numbers of the code they replace: PGD's loop bit for bit, the kept
natural pass bit for bit in every loss value (gradients to float round-off), channels_last members to round-off.
Each comparison is also shown to catch a deliberately broken version of its speed-up."""

from __future__ import annotations

import copy

import pytest
import torch

from igat_core.attacks import PGD
from igat_core.attacks.base import project_linf
from igat_core.attacks.pgd import linf_box
from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble, ensemble_from_checkpoint
from igat_core.igat import IgatConfig, IgatObjective, natural_and_adversarial_logits
from igat_core.runner import igat_config
from igat_core.runtime import channels_last_default, channels_last_members, runtime_record
from igat_core.spec import SpecError, parse_spec
from tests.conftest import digits_config
from workers.ray_train import RayScaling
from workers.runner import check_resources, max_concurrent_trials

CONFIG = IgatConfig(eps=0.3, step=0.1, steps=3, reuse_natural_pass=True)
BATCH = 24


def loop_pgd(attack: PGD, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """igat's PGD loop as it was: project_linf after each signed step."""
    noise = torch.rand(images.shape, generator=attack.generator)
    x = (images + (2 * noise - 1) * attack.eps).clamp(0.0, 1.0)
    for _ in range(attack.steps):
        x = x.detach().requires_grad_(True)
        grad, = torch.autograd.grad(attack.loss(attack.model(x), labels), x)
        x = project_linf(x.detach() + attack.step * grad.sign(), images, attack.eps)
    return x.detach()


def ensemble(architecture: str = "small_cnn", channels_last: bool = False, members: int = 2) -> Ensemble:
    torch.manual_seed(0)
    return Ensemble(digits_config(architecture, 8), members, channels_last=channels_last).train()


@pytest.fixture(scope="module")
def batch(digits_train):
    return digits_train.images[:BATCH], digits_train.labels[:BATCH]


def test_the_box_clamp_is_project_linf_to_the_bit_and_a_box_left_unclipped_is_not():
    g = torch.Generator().manual_seed(0)
    origin = torch.rand(4000, generator=g)
    origin[:10], origin[10:20] = 0.0, 1.0
    x = torch.rand(4000, generator=g) * 1.6 - 0.3
    for eps in (0.0, 0.03, 0.3, 1.0):
        low, high = linf_box(origin, eps)
        assert torch.equal(torch.clamp(x, low, high), project_linf(x, origin, eps))
    unclipped = torch.clamp(x, origin - 0.3, origin + 0.3)
    assert not torch.equal(unclipped, project_linf(x, origin, 0.3))


@pytest.mark.parametrize("model_kind", ["small_cnn", "resnet20"])
def test_pgd_gives_the_old_loops_adversarial_examples_to_the_bit(model_kind, trained_ensemble, batch):
    model = trained_ensemble if model_kind == "small_cnn" else ensemble("resnet20").eval()
    x, y = batch
    for eps in (0.05, 0.4):
        ours = PGD(model, eps, eps / 3, 4, generator=torch.Generator().manual_seed(3))(x, y)
        reference = PGD(model, eps, eps / 3, 4, generator=torch.Generator().manual_seed(3))
        expected = loop_pgd(reference, x, y)
        assert torch.equal(ours, expected)
        assert not torch.equal(ours, loop_pgd(PGD(model, eps, eps / 2, 4, generator=torch.Generator().manual_seed(3)),
                                              x, y))


def member_batch_sizes(e: Ensemble) -> list[int]:
    """Records the batch size of every member forward of `e` (a forward pre-hook on each member)."""
    sizes: list[int] = []
    for member in e.members:
        member.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes


def igat_step(e: Ensemble, x: torch.Tensor, y: torch.Tensor, config: IgatConfig = CONFIG) -> dict:
    """One iGAT loss and backward on `e`; returns the loss, metrics, gradients and BN running statistics."""
    e.zero_grad(set_to_none=True)
    out = IgatObjective(Plain(), config)(e, x, y, torch.Generator().manual_seed(5))
    out.loss.backward()
    return {"loss": out.loss.detach(), "metrics": out.metrics,
            "grads": [p.grad.clone() for p in e.parameters()],
            "stats": [b.clone() for name, b in e.named_buffers() if "running" in name]}


def test_kept_natural_pass_gives_every_loss_value_to_the_bit_and_saves_one_natural_forward(batch):
    x, y = batch
    kept, again = ensemble(), ensemble()
    kept_sizes, again_sizes = member_batch_sizes(kept), member_batch_sizes(again)
    ours = igat_step(kept, x, y)
    reference = igat_step(again, x, y, IgatConfig(eps=0.3, step=0.1, steps=3, reuse_natural_pass=False))
    assert torch.equal(ours["loss"], reference["loss"])
    assert ours["metrics"] == reference["metrics"]
    for a, b in zip(ours["grads"], reference["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    steps = CONFIG.steps
    assert again_sizes == [BATCH] * 2 + [BATCH] * 2 * steps + [2 * BATCH] * 2
    assert kept_sizes == [BATCH] * 2 + [BATCH] * 2 * steps + [BATCH] * 2


def test_with_batchnorm_in_train_mode_both_halves_run_again_and_a_forced_reuse_would_change_the_numbers(batch,
                                                                                                     monkeypatch):
    x, y = batch
    kept, again = ensemble("resnet20"), ensemble("resnet20")
    assert not kept.batch_independent
    sizes = member_batch_sizes(kept)
    ours = igat_step(kept, x, y)
    reference = igat_step(again, x, y, IgatConfig(eps=0.3, step=0.1, steps=3, reuse_natural_pass=False))
    assert sizes[-2:] == [2 * BATCH] * 2
    assert torch.equal(ours["loss"], reference["loss"])
    assert all(torch.equal(a, b) for a, b in zip(ours["grads"], reference["grads"]))
    assert all(torch.equal(a, b) for a, b in zip(ours["stats"], reference["stats"]))
    monkeypatch.setattr(Ensemble, "batch_independent", property(lambda self: True))
    forced = igat_step(ensemble("resnet20"), x, y)
    assert not torch.equal(forced["loss"], reference["loss"])
    assert not all(torch.equal(a, b) for a, b in zip(forced["stats"], reference["stats"]))


def test_the_spec_switches_the_kept_natural_pass():
    assert not igat_config(parse_spec({})).reuse_natural_pass
    assert igat_config(parse_spec({"igat": {"reuse_natural_pass": True}})).reuse_natural_pass


def test_only_a_grad_enabled_pass_over_the_same_tensor_in_the_same_modes_is_reused(batch):
    x, y = batch
    e = ensemble()
    x_adv = x.flip(0)
    with e.keeping_logits_of(x) as kept:
        with torch.no_grad():
            e.member_logits(x)
        e.member_logits(x.clone())
    assert kept.logits is None
    with e.keeping_logits_of(x) as kept:
        e.eval()
        logits = e.member_logits(x)
    assert kept.logits is logits and kept.reusable_by(e) is logits
    e.train()
    assert kept.reusable_by(e) is None
    assert torch.equal(natural_and_adversarial_logits(e, x, x_adv, kept), e.member_logits(torch.cat([x, x_adv])))
    with e.keeping_logits_of(x) as kept:
        e.member_outputs(x)
    assert torch.equal(natural_and_adversarial_logits(e, x, x_adv, kept), e.member_logits(torch.cat([x, x_adv])))
    assert e._kept is None


def conv_inputs_channels_last(e: Ensemble) -> list[bool]:
    seen: list[bool] = []
    for module in e.modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels > 1:
            module.register_forward_pre_hook(
                lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    return seen


def step_outputs(e: Ensemble, x: torch.Tensor, y: torch.Tensor) -> dict:
    x = x.clone().requires_grad_(True)
    e.zero_grad(set_to_none=True)
    logits = e.member_logits(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(e.num_members)).backward()
    return {"logits": logits.detach(), "input": x.grad, "grads": [p.grad for p in e.parameters()],
            "stats": [b.clone() for name, b in e.named_buffers() if "running" in name]}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: float round-off of a float32 network stays near 1e-6."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("architecture", ["small_cnn", "resnet20"])
def test_channels_last_members_equal_nchw_ones_to_float_round_off(architecture, batch):
    x, y = batch
    nchw = ensemble(architecture, channels_last=False)
    nhwc = copy.deepcopy(nchw)
    nhwc.use_channels_last(True)
    layouts = conv_inputs_channels_last(nhwc)
    ours, reference = step_outputs(nhwc, x, y), step_outputs(nchw, x, y)
    assert layouts and all(layouts)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.parameters() if p.dim() == 4)
    pairs = [(ours["logits"], reference["logits"]), (ours["input"], reference["input"]),
             *zip(ours["grads"], reference["grads"]), *zip(ours["stats"], reference["stats"])]
    assert max(relative_difference(a, b) for a, b in pairs) < 1e-4
    assert relative_difference(step_outputs(nhwc, x.transpose(2, 3), y)["logits"], reference["logits"]) > 1e-2


def test_channels_last_is_off_by_default_its_switch_is_recorded_and_checkpoints_keep_their_values():
    assert not channels_last_default() and not parse_spec({}).resources.channels_last
    nchw = Ensemble(digits_config(), 2)
    assert runtime_record(torch.device("cpu"))["channels_last"] is False
    assert not any(m.channels_last for m in nchw.members)
    with channels_last_members(True):
        nhwc = ensemble_from_checkpoint(nchw.checkpoint_payload())
        assert runtime_record(torch.device("cpu"))["channels_last"] is True
    assert all(m.channels_last for m in nhwc.members)
    assert all(torch.equal(a, b) for a, b in zip(nhwc.state_dict().values(), nchw.state_dict().values()))
    mlp = Ensemble(digits_config("mlp"), 1, channels_last=True)
    assert not mlp.members[0].channels_last


def test_a_ray_train_worker_reserves_at_least_the_cpus_its_threads_use(tmp_path):
    threaded = parse_spec({"resources": {"num_workers": 3, "cpus_per_worker": 1, "threads": 2}})
    assert threaded.resources.requested_cpus == 6.0
    scaling = RayScaling.from_spec(threaded.resources, tmp_path, "x")
    assert (scaling.cpus_per_worker, scaling.threads, scaling.trial_resources()["CPU"]) == (2.0, 2, 6.0)
    half = parse_spec({"resources": {"num_workers": 4, "cpus_per_worker": 0.5}}).resources
    assert (half.threads, half.worker_cpus, half.requested_cpus) == (1, 1.0, 4.0)
    assert parse_spec({"resources": {"num_workers": 2, "cpus_per_worker": 3}}).resources.requested_cpus == 6.0
    with pytest.raises(SpecError, match="3 worker"):
        check_resources(threaded, {"CPU": 4.0})
    check_resources(threaded, {"CPU": 6.0})
    assert max_concurrent_trials(scaling, {"CPU": 16.0}, trials=4) == 2  # 6 CPUs of workers + 2 of the driver each
