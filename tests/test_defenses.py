"""Each base method's loss on tiny hand-built cases against values worked out independently here, and the
interface pieces around them: parameters, the feature API, SoE routing, CLDL's method-owned state."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from igat_core.defenses import ADP, CLDL, DEFENSES, DVERGE, GAL, SoE, TRS, build_method, method_parameters
from igat_core.defenses.adp import ensemble_entropy, log_det_diversity
from igat_core.defenses.cldl import label_dependency_diversity, soft_label_kl, soft_labels
from igat_core.defenses.dverge import distill_features
from igat_core.defenses.gal import gal_coherence
from igat_core.defenses.soe import soe_terms
from igat_core.defenses.trs import gradient_magnitude, mean_abs_cosine
from igat_core.ensemble import Ensemble, ensemble_from_checkpoint
from igat_core.models import ModelConfig, build_model
from igat_core.runner import base_method_params, igat_config
from igat_core.spec import METHOD_PARAMETERS, SpecError, load_spec, parse_spec
from tests.conftest import digits_config

NEG = -1e4  # a logit whose softmax probability underflows to exactly 0 in float32


class FixedLogits:
    """Stands in for an Ensemble whose members return fixed (N, B, C) logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.num_members = logits.shape[0]

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def identical_members(n: int = 3, width: int = 8, **config) -> Ensemble:
    torch.manual_seed(0)
    ensemble = Ensemble(dataclasses.replace(digits_config(width=width), **config), n)
    for member in ensemble.members[1:]:
        member.load_state_dict(ensemble.members[0].state_dict())
    return ensemble


def batch(b: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


# -- ADP ----------------------------------------------------------------------------------------------------------


def orthogonal_logits() -> torch.Tensor:
    """3 members, 1 example, 4 classes, y = 0: member i puts 1/2 on class 0 and 1/2 on class i+1."""
    logits = torch.full((3, 1, 4), NEG)
    logits[:, 0, 0] = 0.0
    for i in range(3):
        logits[i, 0, i + 1] = 0.0
    return logits


def test_adp_log_det_of_orthogonal_members_is_that_of_the_ridged_identity():
    probs = torch.softmax(orthogonal_logits(), dim=-1)
    assert log_det_diversity(probs, torch.tensor([0])).item() == pytest.approx(3 * math.log(1 + 1e-6), abs=1e-6)


def test_adp_log_det_of_identical_members():
    probs = torch.softmax(torch.tensor([[[2.0, 0.5, -1.0, 0.3]]]).repeat(3, 1, 1), dim=-1)
    # det(J + e I) for the 3x3 all-ones J: e^2 (3 + e)
    expected = 2 * math.log(1e-6) + math.log(3 + 1e-6)
    assert log_det_diversity(probs, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-3)


def test_adp_loss_on_orthogonal_members():
    alpha, beta = 2.0, 0.5
    out = ADP(alpha=alpha, beta=beta).loss(FixedLogits(orthogonal_logits()), torch.zeros(1, 1, 8, 8),
                                           torch.tensor([0]))
    mean = [0.5, 1 / 6, 1 / 6, 1 / 6]
    entropy = -sum(p * math.log(p) for p in mean)
    expected = 3 * math.log(2) - alpha * entropy - beta * 3 * math.log(1 + 1e-6)
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert out.metrics["entropy"] == pytest.approx(entropy, abs=1e-6)
    assert ensemble_entropy(torch.softmax(orthogonal_logits(), -1)).item() == pytest.approx(entropy, abs=1e-6)


# -- GAL ----------------------------------------------------------------------------------------------------------


def test_gal_coherence_of_identical_and_orthogonal_gradients():
    same = torch.tensor([1.0, 2.0, -1.0]).expand(3, 2, 3)
    assert gal_coherence(same).item() == pytest.approx(math.log(3 * math.e))
    orthogonal = torch.eye(3).unsqueeze(1)
    assert gal_coherence(orthogonal).item() == pytest.approx(math.log(3.0))


def test_gal_coherence_of_identical_members_is_log_of_pairs_times_e():
    x, y = batch()
    out = GAL(noise_std=0.0).loss(identical_members(), x, y)
    assert out.metrics["coherence"] == pytest.approx(1 + math.log(3), abs=1e-4)
    ce = F.cross_entropy(identical_members().members[0](x), y).item()
    assert out.loss.item() == pytest.approx(ce + 0.5 * (1 + math.log(3)), abs=1e-4)


# -- TRS ----------------------------------------------------------------------------------------------------------


def test_trs_cosine_is_one_for_identical_and_opposite_gradients():
    g = torch.tensor([[0.5, -1.0, 2.0]])
    assert mean_abs_cosine(torch.stack([g, g, g])).item() == pytest.approx(1.0)
    assert mean_abs_cosine(torch.stack([g, -g])).item() == pytest.approx(1.0)
    assert mean_abs_cosine(torch.eye(2).unsqueeze(1)).item() == pytest.approx(0.0)


def test_trs_gradient_magnitude():
    grads = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    # member 0: 2 * mean(25, 0) = 25; member 1: 2 * mean(1, 1) = 2; mean over members
    assert gradient_magnitude(grads).item() == pytest.approx(13.5)


def test_trs_on_identical_members_and_its_eps_ramp():
    x, y = batch()
    ensemble = identical_members()
    trs = TRS(plus_adv=False)
    out = trs.loss(ensemble, x, y)
    assert out.metrics["cosine"] == pytest.approx(1.0, abs=1e-5)
    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(ensemble.members[0](xg), y), xg)
    smooth = 2 * g.flatten(1).pow(2).sum(1).mean().item()
    assert out.metrics["smoothness"] == pytest.approx(smooth, rel=1e-4)
    assert out.loss.item() == pytest.approx(3 * out.metrics["ce"] / 3 + 40 * 1.0 + 2.5 * smooth, rel=1e-4)
    eps = []
    for epoch in (1, 6, 10):
        trs.start_epoch(ensemble, epoch, 10)
        eps.append(trs.current_eps)
    assert eps == pytest.approx([0.01, 0.02, 0.028])
    trs.start_epoch(ensemble, 1, 10, finetuning=True)
    assert trs.current_eps == pytest.approx(0.03)


# -- DVERGE -------------------------------------------------------------------------------------------------------


def test_resnet20_feature_layers_follow_dverge_numbering():
    torch.manual_seed(0)
    net = build_model(dataclasses.replace(digits_config("resnet20"))).eval()
    x = torch.rand(2, 1, 8, 8)
    taps: dict[str, torch.Tensor] = {}
    net.net.bn1.register_forward_hook(lambda m, i, o: taps.__setitem__("stem", o))
    net.net.layer1[0].bn1.register_forward_hook(lambda m, i, o: taps.__setitem__("first_mid", o))
    net.net.layer3[2].register_forward_hook(lambda m, i, o: taps.__setitem__("last_block", o))
    logits = net(x)
    assert net.num_feature_layers == 20
    assert torch.allclose(net.get_features(x, 1), taps["stem"])
    assert torch.allclose(net.get_features(x, 2), taps["first_mid"])
    assert torch.allclose(net.get_features(x, 19, before_relu=False), taps["last_block"], atol=1e-6)
    assert (net.get_features(x, 19) < 0).any() and torch.allclose(net.get_features(x, 19).relu(), taps["last_block"],
                                                                   atol=1e-6)
    assert torch.allclose(net.get_features(x, 20), logits, atol=1e-6)
    with pytest.raises(ValueError, match="1..20"):
        net.get_features(x, 21)


def test_distillation_moves_features_towards_the_target_inside_the_ball():
    torch.manual_seed(0)
    member = build_model(digits_config(width=8)).eval()
    source, target = batch(8, 1)[0], batch(8, 2)[0]
    distilled = distill_features(member, source, target, layer=3, eps=0.07, step=0.007, steps=10)
    wanted = member.get_features(target, 3)
    before = F.mse_loss(member.get_features(source, 3), wanted).item()
    after = F.mse_loss(member.get_features(distilled, 3), wanted).item()
    assert after < before
    assert (distilled - source).abs().max().item() <= 0.07 + 1e-6
    assert distilled.min() >= 0 and distilled.max() <= 1


def test_dverge_summed_loss_takes_exactly_the_per_member_optimiser_steps():
    """One SGD on sum_i loss_i == the authors' per-member SGDs stepping one after another (module docstring)."""
    x, y = batch(16)
    torch.manual_seed(1)
    start = Ensemble(digits_config(width=8), 3)
    method = DVERGE(layer=4)
    summed = copy.deepcopy(start)
    out = method.loss(summed, x, y, torch.Generator().manual_seed(5))
    sgd = torch.optim.SGD(summed.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sgd.zero_grad()
    out.loss.backward()
    sgd.step()

    separate = copy.deepcopy(start)
    target = x[torch.randperm(16, generator=torch.Generator().manual_seed(5))]
    distilled = [distill_features(m, x, target, 4) for m in separate.members]
    total = 0.0
    for i, member in enumerate(separate.members):
        own = torch.optim.SGD(member.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        loss_i = sum(F.cross_entropy(member(distilled[j]), y) for j in range(3) if j != i)
        own.zero_grad()
        loss_i.backward()
        own.step()
        total += loss_i.item()
    assert out.loss.item() == pytest.approx(total, rel=1e-5)
    for a, b in zip(summed.parameters(), separate.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_dverge_layer_is_drawn_once_per_epoch_and_round_robin_pairs():
    ensemble = Ensemble(digits_config(width=8), 4)
    method = DVERGE()
    layers = set()
    for epoch in range(1, 30):
        method.start_epoch(ensemble, epoch, 30, torch.Generator().manual_seed(epoch))
        layers.add(method._epoch_layer)
    assert layers <= set(range(1, 7)) and len(layers) > 3
    assert DVERGE(pairs="round_robin").sources(4) == [[1], [2], [3], [0]]
    assert DVERGE().sources(3) == [[1, 2], [0, 2], [0, 1]]
    warm = DVERGE(warmup_epochs=2)
    warm.start_epoch(ensemble, 2, 10)
    assert "warmup" in warm.loss(ensemble, *batch(8)).metrics
    warm.start_epoch(ensemble, 2, 10, finetuning=True)
    assert "warmup" not in warm.loss(ensemble, *batch(8)).metrics


# -- SoE ----------------------------------------------------------------------------------------------------------


def test_soe_terms_on_a_hand_built_case():
    # 2 experts, 1 example, 2 classes, y = 0; expert 0 is right, expert 1 wrong; aux logits 0 (sigmoid 1/2)
    p0, p1 = 0.8, 0.3
    logits = torch.tensor([[[math.log(p0), math.log(1 - p0)]], [[math.log(p1), math.log(1 - p1)]]])
    aux = torch.zeros(2, 1)
    terms = soe_terms(logits, aux, torch.tensor([0]))
    r = [p0 * 0.5, (1 - p1) * 0.5]
    target = [p0, p1]
    bce = [-(t * math.log(s) + (1 - t) * math.log(1 - s)) for s, t in zip(r, target)]
    assert terms.aux.item() == pytest.approx(sum(bce) / 2, rel=1e-5)
    w = [math.exp(v) / (math.exp(r[0]) + math.exp(r[1])) for v in r]
    assert terms.expert.item() == pytest.approx(-w[0] * math.log(p0) - w[1] * math.log(p1), rel=1e-5)
    softmin = -math.log(p0 + p1)
    assert soe_terms(logits, aux, torch.tensor([0]), "true").expert.item() == pytest.approx(softmin, rel=1e-5)


def test_soe_routed_combiner_lets_the_most_confident_expert_answer():
    ensemble = Ensemble(SoE().configure_model(digits_config(width=8)), 3).eval()
    x, _ = batch(6)
    logits, aux = ensemble.member_logits_and_aux(x)
    scores = torch.softmax(logits, -1).amax(-1) * torch.sigmoid(aux)
    chosen = scores.argmax(0)
    expected = torch.log_softmax(logits[chosen, torch.arange(6)], -1)
    assert torch.allclose(ensemble.with_combiner("routed")(x), expected, atol=1e-6)
    average = torch.log(torch.softmax(logits, -1).mean(0))
    assert torch.allclose(ensemble(x), average, atol=1e-5)
    with pytest.raises(ValueError, match="auxiliary head"):
        Ensemble(digits_config(width=8), 2).with_combiner("routed")


def test_aux_and_hidden_heads_survive_checkpoints_and_old_configs_still_load():
    config = dataclasses.replace(digits_config("resnet20"), aux_head=True, head_hidden=16)
    ensemble = Ensemble(config, 2, "routed").eval()
    restored = ensemble_from_checkpoint(ensemble.checkpoint_payload()).eval()
    x, _ = batch(4)
    assert torch.allclose(restored(x), ensemble(x))
    old = {k: v for k, v in digits_config().to_dict().items() if k not in ("aux_head", "head_hidden")}
    assert ModelConfig.from_dict(old) == digits_config()
    names = set(build_model(digits_config("resnet20")).state_dict())
    assert not any(n.startswith(("net.aux", "net.input_vec")) for n in names)


# -- CLDL ---------------------------------------------------------------------------------------------------------


def test_cldl_jsd_of_identical_distributions_is_zero():
    lcv = torch.softmax(torch.randn(1, 5, 10), -1).repeat(3, 1, 1)
    y = torch.randint(0, 10, (5,))
    assert label_dependency_diversity(lcv, y).item() == pytest.approx(math.log(1 + 1e-6), abs=1e-7)


def test_cldl_jsd_of_two_disjoint_distributions():
    # non-true parts [1/2, 0] and [0, 1/2] (y = 0, C = 3): each KL(P || M) = 1/2 log 2 summed over 2 entries,
    # i.e. mean over the 2 elements (1/4) log 2 -> /ln 2 = 1/4; JSD = 1/4
    lcv = torch.tensor([[[0.5, 0.5, 0.0]], [[0.5, 0.0, 0.5]]])
    expected = math.log(math.exp(0.25) + 1e-6)
    assert label_dependency_diversity(lcv, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-5)


def test_cldl_soft_labels_and_kl():
    lcv = torch.tensor([[0.25, 0.25, 0.5]])
    s = soft_labels(lcv, torch.tensor([0]), 4.0)
    z = [math.exp(0.25 + 4), math.exp(0.25), math.exp(0.5)]
    assert s[0].tolist() == pytest.approx([v / sum(z) for v in z])
    assert soft_label_kl(s, s.float()).item() == pytest.approx(0.0, abs=1e-6)


def test_cldl_owns_its_label_confusion_model():
    method = CLDL()
    assert method.configure_model(digits_config("resnet20")).head_hidden == 64
    assert method.configure_model(digits_config()) == digits_config()
    with pytest.raises(ValueError, match="hidden head layer"):
        method.setup(Ensemble(digits_config("resnet20"), 2))
    ensemble = Ensemble(digits_config(width=8), 3)
    method.setup(ensemble)
    assert method.lcm is not None and method.lcm.label_emb.weight.shape == (10, 32)
    out = method.loss(ensemble, *batch(8))
    out.loss.backward()
    assert all(p.grad is not None for p in method.parameters())
    other = CLDL()
    other.load_state_dict(method.state_dict())
    other.setup(ensemble)
    assert torch.equal(other.lcm.sim_fc.weight, method.lcm.sim_fc.weight)
    with pytest.raises(ValueError, match="sized"):
        other.setup(Ensemble(digits_config(width=16), 3))


# -- parameters, spec and runner ------------------------------------------------------------------------------------


def test_bad_parameters_name_themselves():
    with pytest.raises(ValueError, match="'alpah'"):
        build_method("adp", {"alpah": 1.0})
    with pytest.raises(ValueError, match=r"'eps' for base method 'plain'; known: \(none\)$"):
        build_method("plain", {"eps": 0.1})
    with pytest.raises(ValueError, match="'eps'"):
        build_method("dverge", {"eps": -0.1})
    with pytest.raises(ValueError, match="'pairs'"):
        build_method("dverge", {"pairs": "some"})
    with pytest.raises(ValueError, match="'steps'"):
        build_method("dverge", {"steps": 2.5})
    with pytest.raises(ValueError, match="'plus_adv'"):
        build_method("soe", {"plus_adv": "yes"})
    assert build_method("soe", {"adv_eps": "8/255"}).adv.eps == pytest.approx(8 / 255)
    assert build_method("gal", {"lam": 1}).lam == 1.0


def test_the_spec_knows_each_method_parameters_and_refuses_a_misspelt_one():
    assert {name: set(method_parameters(name)) for name in DEFENSES} == {
        name: set(known) for name, known in METHOD_PARAMETERS.items()}
    with pytest.raises(SpecError) as info:
        parse_spec({"base": {"method": "gal", "params": {"lambda": 0.5}}})
    (path, message), = info.value.problems
    assert path == "base" and "'lambda'" in message and "lam" in message
    assert parse_spec({"base": {"method": "gal", "params": {"lam": 0.5}}}).base.params == {"lam": 0.5}


def test_igat_alpha_beta_default_to_the_method_and_spec_values_win():
    def config(method: str, **igat):
        return igat_config(parse_spec({"base": {"method": method}, "igat": igat}))

    assert (config("adp").alpha, config("adp").beta) == (5.0, 10.0)
    assert (config("soe").alpha, config("soe").beta) == (0.25, 0.5)
    assert (config("soe", alpha=1.0).alpha, config("soe", alpha=1.0).beta) == (1.0, 0.5)


def test_base_attack_is_refused_for_methods_that_take_pgd_settings_in_params():
    with pytest.raises(ValueError, match="adv_eps"):
        base_method_params(parse_spec({"base": {"method": "soe", "attack": {"eps": 0.2}}}))
    spec = parse_spec({"base": {"method": "soe", "params": {"adv_eps": 0.2}}})
    assert base_method_params(spec) == {"adv_eps": 0.2}


@pytest.mark.parametrize("name", ["adp", "gal", "dverge", "trs", "soe", "cldl"])
def test_each_example_spec_builds_its_method(name):
    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml")
    assert spec.base.method == name and spec.dataset.name == "mnist5k"
    method = build_method(name, base_method_params(spec))
    assert igat_config(spec).alpha == method.igat_defaults[0]
