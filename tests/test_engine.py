"""The fused member engine computes what the member loop computes (logits, input and parameter gradients, BatchNorm
running statistics, the optimiser's step), and falls back to the loop, saying why, where fusion does not apply.

Every equivalence test also runs with the fusion deliberately broken (`stacked` permuting the members or putting
the first member in every row) and asserts which of its comparisons then fail, so each can fail."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from igat_core import engine as engine_module
from igat_core.attacks import PGD
from igat_core.defenses import Plain
from igat_core.engine import GLOBAL_PGD, MEMBER_PASS, CapturedPGDStep, FusedEnsemble, GraphedPGD, MemberEngine
from igat_core.ensemble import Ensemble
from igat_core.igat import IgatConfig, IgatObjective, fine_tune_objective
from igat_core.runner import BASE_CHECKPOINT, RunContext, fine_tune, igat_config
from igat_core.spec import parse_spec
from igat_core.train import TrainConfig, fit
from tests.conftest import digits_config

ARCHITECTURES = {"small_cnn": 16, "resnet20": 8}  # batch size of each tiny configuration
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
BREAKS = {
    "permuted": lambda per_member: list(per_member)[::-1],
    "duplicated": lambda per_member: [per_member[0]] * len(per_member),
}


@pytest.fixture
def fusion(request, monkeypatch) -> str:
    """`exact`, or a broken fusion: the members' tensors stacked in the wrong rows."""
    if request.param != "exact":
        real, broken = engine_module.stacked, BREAKS[request.param]
        monkeypatch.setattr(engine_module, "stacked", lambda per_member: real(broken(per_member)))
    return request.param


def twin_ensembles(architecture: str, members: int = 3) -> tuple[Ensemble, Ensemble]:
    torch.manual_seed(0)
    ensemble = Ensemble(digits_config(architecture, width=8), members)
    return ensemble, copy.deepcopy(ensemble)


def batch(size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 1, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def close(a: torch.Tensor | list[torch.Tensor], b: torch.Tensor | list[torch.Tensor]) -> bool:
    pairs = zip(a, b) if isinstance(a, list) else [(a, b)]
    return all(torch.allclose(u.float(), v.float(), **TOLERANCE) for u, v in pairs)


def member_weighted_loss(member_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i (i + 1) CE(member i): a loss whose gradients tell the members apart."""
    weights = torch.arange(1, member_logits.shape[0] + 1, dtype=member_logits.dtype)
    per_member = torch.stack([F.cross_entropy(z, y) for z in member_logits])
    return (weights * per_member).sum()


def training_pass(ensemble: Ensemble, engine: MemberEngine, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One train-mode member pass, backward, and a step of per-member SGD optimisers, then a second pass."""
    ensemble.train()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in ensemble.members]
    x = x.clone().requires_grad_(True)
    logits = engine.member_logits(ensemble, x)
    member_weighted_loss(logits, y).backward()
    found = {"logits": logits.detach(), "input_grad": x.grad, "param_grads": [p.grad.clone() for p in
                                                                              ensemble.parameters()],
             "running_stats": [b.clone() for b in ensemble.buffers()]}
    for optimizer in optimizers:
        optimizer.step()
    found["params_after_step"] = [p.detach().clone() for p in ensemble.parameters()]
    found["logits_after_step"] = engine.member_logits(ensemble, x).detach()
    return found


@pytest.mark.parametrize("fusion", ["exact", "permuted"], indirect=True)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fused_training_pass_matches_the_loop(architecture, fusion):
    loop, fused = twin_ensembles(architecture)
    x, y = batch(ARCHITECTURES[architecture])
    reference = training_pass(loop, MemberEngine("loop"), x, y)
    engine = MemberEngine("fused")
    found = training_pass(fused, engine, x, y)
    matches = {key: close(reference[key], found[key]) for key in reference}
    expected = fusion == "exact"
    stats_tell = architecture == "resnet20"  # small_cnn has no BatchNorm: its buffers are the shared mean/std
    assert matches == {**dict.fromkeys(reference, expected), "running_stats": expected or not stats_tell}
    assert engine.fused_calls[MEMBER_PASS] == 2 and not engine.fallbacks


@pytest.mark.parametrize("fusion", ["exact", "permuted", "duplicated"], indirect=True)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fused_global_pgd_matches_the_loop(architecture, fusion):
    loop, fused = (e.eval() for e in twin_ensembles(architecture))
    x, y = batch(ARCHITECTURES[architecture])
    engine = MemberEngine("fused")
    found = {}
    for name, model in (("loop", loop.with_combiner("average")), ("fused", FusedEnsemble.view(fused, "average",
                                                                                              engine))):
        inputs = x.clone().requires_grad_(True)
        combined, members = model.combined_and_members(inputs)
        grad, = torch.autograd.grad(F.cross_entropy(combined, y, reduction="sum"), inputs)
        adversarial = PGD(model, 0.1, 0.025, 5, generator=torch.Generator().manual_seed(2))(x, y)
        found[name] = {"member_logits": members.detach(), "input_grad": grad, "x_adv": adversarial}
    matches = {key: close(found["loop"][key], found["fused"][key]) for key in found["loop"]}
    # the combined output is the same for any order of the members: a permutation shows in the member logits only
    expected = {"exact": (True, True, True), "permuted": (False, True, True), "duplicated": (False, False, False)}
    assert tuple(matches.values()) == expected[fusion]
    assert engine.fused_calls[GLOBAL_PGD] == 1 + 5


@pytest.mark.parametrize("fusion", ["exact", "permuted"], indirect=True)
def test_fused_attack_with_batchnorm_in_train_mode_updates_each_members_statistics(fusion):
    loop, fused = twin_ensembles("resnet20")
    x, y = batch(8)
    for ensemble, engine in ((loop, MemberEngine("loop")), (fused, MemberEngine("fused"))):
        attack = engine.attack(ensemble, "average", 0.1, 0.025, 3, True, "train", torch.Generator().manual_seed(2))
        attack(x, y)
    assert close(list(loop.buffers()), list(fused.buffers())) == (fusion == "exact")


@pytest.mark.parametrize("fusion", ["exact", "permuted"], indirect=True)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fused_igat_training_matches_the_loop_and_saves_the_same_checkpoint(architecture, fusion, digits_train,
                                                                          tmp_path):
    size = ARCHITECTURES[architecture]  # one batch: one optimiser step
    data = type(digits_train)(digits_train.images[:size], digits_train.labels[:size], digits_train.info)
    config = TrainConfig(epochs=1, batch_size=ARCHITECTURES[architecture], lr=0.05, seed=3)
    payloads = {}
    for name, ensemble in zip(("loop", "fused"), twin_ensembles(architecture)):
        objective = IgatObjective(Plain(), IgatConfig(eps=0.1, step=0.025, steps=3, engine=name))
        fit(ensemble, objective, data, config, tmp_path / name, progress=False)
        payloads[name] = ensemble.checkpoint_payload()
    loop, fused = (payloads[name]["state_dicts"] for name in ("loop", "fused"))
    assert [list(s) for s in loop] == [list(s) for s in fused]
    assert close([t for s in loop for t in s.values()], [t for s in fused for t in s.values()]) == (fusion == "exact")


def test_fused_engine_falls_back_to_the_loop_and_says_why(caplog):
    ensemble, _ = twin_ensembles("resnet20")
    x, _ = batch(8)
    ensemble.train()
    ensemble.members[1].eval()
    engine = MemberEngine("fused")
    with torch.no_grad():
        assert torch.equal(engine.member_logits(ensemble, x), ensemble.member_logits(x))
    assert engine.fallbacks == {MEMBER_PASS: "the members are in different train/eval modes"}
    assert not engine.fused_calls
    assert "falls back to the member loop: the members are in different train/eval modes" in caplog.text
    ensemble.members[1].train()
    handle = ensemble.members[0].net.conv1.register_forward_hook(lambda *_: None)
    with torch.no_grad():
        engine.member_logits(ensemble, x)
    handle.remove()
    assert engine.fallbacks[MEMBER_PASS] == "a member has hooks, which a functional call would not run"
    report = engine.report()
    assert set(report["loop"]) == {MEMBER_PASS, "base method's loss L_E"}
    assert MemberEngine("loop").report() == {"engine": "loop"}


def test_cuda_graphs_are_used_on_cuda_only():
    ensemble, _ = twin_ensembles("small_cnn")
    engine = MemberEngine("fused", cuda_graphs=True)
    attack = engine.attack(ensemble.eval(), "average", 0.1, 0.025, 2, True, "eval", None)
    assert type(attack) is PGD and isinstance(attack.model, FusedEnsemble)
    assert engine.fallbacks == {"CUDA-graph capture of the global PGD": "the members are on cpu, not CUDA"}


class EagerStep(CapturedPGDStep):
    """A captured PGD step whose replay runs the step eagerly on the static tensors (capturing needs CUDA)."""

    def capture(self) -> None:
        pass

    def replay(self) -> None:
        self.next = self._step()


def test_graphed_pgd_around_its_graphs_matches_the_plain_pgd_across_an_optimiser_step(monkeypatch):
    """What GraphedPGD does around the graph: one capture per shape, the static weights refreshed from the members
    after each optimiser step, the random start and the steps (the capture and replay themselves are untested)."""
    monkeypatch.setattr(engine_module, "CapturedPGDStep", EagerStep)
    loop, fused = twin_ensembles("resnet20")
    optimizers = [torch.optim.SGD(e.parameters(), lr=0.5) for e in (loop, fused)]
    graphs: dict = {}
    engine = MemberEngine("fused", cuda_graphs=True)
    for seed in (1, 2):
        x, y = batch(8, seed)
        graphed = GraphedPGD(FusedEnsemble.view(fused, "average", engine), 0.1, 0.025, 3,
                             generator=torch.Generator().manual_seed(seed), graphs=graphs)
        plain = PGD(loop.with_combiner("average"), 0.1, 0.025, 3, generator=torch.Generator().manual_seed(seed))
        assert close(graphed(x, y), plain(x, y))
        for ensemble, optimizer in zip((loop, fused), optimizers):
            member_weighted_loss(ensemble.member_logits(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert len(graphs) == 1


def test_fused_pass_under_bf16_autocast_keeps_the_loops_dtype():
    """vmap does not follow autocast on CPU (torch 2.14): the fused engine then runs the loop, and says so."""
    loop, fused = (e.eval() for e in twin_ensembles("small_cnn"))
    x, _ = batch(16)
    engine = MemberEngine("fused")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference, found = loop.member_logits(x), engine.member_logits(fused, x)
    assert found.dtype == reference.dtype == torch.bfloat16
    assert torch.equal(found, reference)
    assert not engine_module.vmap_applies_autocast("cpu", torch.bfloat16)
    assert "vmap does not follow autocast on cpu" in engine.fallbacks[MEMBER_PASS]
    with torch.no_grad():
        assert close(engine.member_logits(fused, x), loop.member_logits(x)) and engine.fused_calls[MEMBER_PASS] == 1


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be one of"):
        MemberEngine("graph")


def test_a_fused_fine_tune_records_what_ran_fused_and_what_ran_the_loop(digits_train, tmp_path):
    spec = parse_spec({"ensemble": {"members": 2, "width": 8}, "resources": {"device": "cpu", "engine": "fused"},
                       "igat": {"enabled": True, "attack": {"eps": 0.1, "step": 0.05, "steps": 2},
                                "train": {"epochs": 1, "batch_size": 32, "lr": 0.01}}})
    ctx = RunContext(spec, tmp_path, torch.device("cpu"), progress=False)
    twin_ensembles("small_cnn", members=2)[0].save(tmp_path / BASE_CHECKPOINT)
    data = type(digits_train)(digits_train.images[:64], digits_train.labels[:64], digits_train.info)
    fine_tune(ctx, "igat", data, fine_tune_objective("igat", Plain(), igat_config(spec)))
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    engine_events = [e for e in events if e["event"] == "engine"]
    assert [e["phase"] for e in engine_events] == ["igat", "igat"]
    after = engine_events[-1]
    assert after["fused_calls"] == {GLOBAL_PGD: 2 * 2, MEMBER_PASS: 2}  # two batches of PGD-2
    assert list(after["loop"]) == ["base method's loss L_E"]
