"""The member engine of iGAT's shared-batch passes: the members one after another (`loop`) or fused (`fused`).

In iGAT's global PGD and in the member pass over cat(x, x_adv) every member sees the same batch. The fused engine
runs such a pass as one batched computation: the members' parameters and buffers are stacked along a new first
dimension, one member's forward runs under `torch.func.vmap` over that stack (`functional_call` on a copy of the
member on the meta device), and the result is the (N, B, C) member logits the loop stacks. The members keep
owning their tensors: the training pass stacks them differentiably, so each member's parameter gradient lands in
its own `.grad`; BatchNorm's running statistics, updated on the stacked buffers in train mode, are copied back into
each member; checkpoints, the optimiser and every other pass see the members as the loop leaves them. The global
PGD's stack is detached (the attack needs input gradients only) and taken once per attack.

A call runs the loop instead where fusion would not compute what the loop computes (members in different
train/eval modes, hooks on a member, a random layer in train mode, autocast that vmap does not follow: on CPU)
or where nothing is batched (one member), and the engine records why, once per pass and reason
(`MemberEngine.fallbacks`, a log warning). The base method's own loss L_E always runs the loop: its passes may
give members their own inputs or read their features and input gradients (`MemberEngine.report`).

`cuda_graphs` (fused, CUDA only, members in eval mode during the attack): each PGD step of the global attack is
captured once per input shape as a CUDA graph and replayed. It is untested on a GPU; elsewhere the attack runs
uncaptured and the engine says so.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from igat_core.attacks.base import project_linf
from igat_core.attacks.pgd import PGD
from igat_core.ensemble import Ensemble
from igat_core.models import Normalized

ENGINES: tuple[str, ...] = ("loop", "fused")
GLOBAL_PGD = "global PGD"
MEMBER_PASS = "member pass over cat(x, x_adv)"
BASE_LOSS = "base method's loss L_E"
BASE_LOSS_REASON = "its passes may give members their own inputs or read features and input gradients"
log = logging.getLogger(__name__)


@dataclass
class MemberStack:
    """The members' parameters and buffers, each stacked along a new first dimension (member index)."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


def stacked(per_member: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: (N, ...)} from the members' {name: tensor}, in member order."""
    return {name: torch.stack([tensors[name] for tensors in per_member]) for name in per_member[0]}


def stack_members(members: Sequence[nn.Module], detach: bool) -> MemberStack:
    params = [{k: v.detach() if detach else v for k, v in m.named_parameters()} for m in members]
    return MemberStack(stacked(params), stacked([dict(m.named_buffers()) for m in members]))


def write_back_buffers(members: Sequence[nn.Module], buffers: dict[str, torch.Tensor]) -> None:
    """Each member's buffers (BatchNorm's running statistics) from its row of the stacked buffers. Written through
    `.data`, as BatchNorm's own update leaves the version counters alone: earlier passes of the step saved these
    buffers for their backward."""
    with torch.no_grad():
        for index, member in enumerate(members):
            for name, buffer in member.named_buffers():
                buffer.data.copy_(buffers[name][index])


def _has_hooks(module: nn.Module) -> bool:
    return any(len(getattr(module, name)) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                       "_backward_pre_hooks"))


@functools.cache
def vmap_applies_autocast(device_type: str, dtype: torch.dtype) -> bool:
    """Whether convolutions and linear layers under `torch.func.vmap` follow autocast to `dtype` on `device_type`
    (probed once; on CPU, torch 2.14 runs them in float32)."""
    with torch.autocast(device_type, dtype=dtype):
        image = torch.ones(1, 1, 2, 2, device=device_type)
        conv = vmap(lambda w: F.conv2d(image, w))(torch.ones(2, 1, 1, 1, 1, device=device_type))
        linear = vmap(lambda w: F.linear(image.flatten(1), w))(torch.ones(2, 1, 4, device=device_type))
    return conv.dtype == linear.dtype == dtype


def unfusable_reason(members: Sequence[nn.Module], x: torch.Tensor) -> str | None:
    """Why one vmap'd forward over `members` on `x` would not compute what running them one by one does (None:
    it does)."""
    if len(members) < 2:
        return "one member: nothing to batch"
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and not vmap_applies_autocast(kind, torch.get_autocast_dtype(kind)):
        return f"vmap does not follow autocast on {kind} in this torch: the pass would run in float32"
    modes = {tuple(m.training for m in member.modules()) for member in members}
    if len(modes) > 1:
        return "the members are in different train/eval modes"
    if any(_has_hooks(m) for member in members for m in member.modules()):
        return "a member has hooks, which a functional call would not run"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training for m in members[0].modules()):
        return "a random layer (dropout) in train mode"
    return None


class FusedMembers:
    """One member's forward under vmap over a `MemberStack`: (B, ...) images -> (N, B, C) logits. Its inputs stay
    NCHW (vmap cannot change a tensor's memory format); channels_last members' weights are read as they are."""

    def __init__(self, members: nn.ModuleList):
        self.members = members
        self.template = copy.deepcopy(members[0]).to("meta")
        for module in self.template.modules():
            if isinstance(module, Normalized):
                module.channels_last = False

    def __call__(self, x: torch.Tensor, stack: MemberStack) -> torch.Tensor:
        for mine, theirs in zip(self.template.modules(), self.members[0].modules()):
            mine.training = theirs.training
        logits = vmap(self._one_member, in_dims=(0, 0, None))(stack.params, stack.buffers, x)
        if any(m.training for m in self.template.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            write_back_buffers(self.members, stack.buffers)
        return logits

    def _one_member(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                    x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,))


class FusedEnsemble(Ensemble):
    """A view of an ensemble (same members, its own combiner) for an attack: member logits from one fused pass over
    a detached stack of the members' tensors, taken at the first forward and kept for the view's life. Whether
    fusion applies is decided once per mode, device and autocast state of the view (an attack's steps share them)."""

    engine: MemberEngine
    stack: MemberStack | None
    decisions: dict[tuple, bool]

    @classmethod
    def view(cls, ensemble: Ensemble, combiner: str, engine: MemberEngine) -> FusedEnsemble:
        fused = ensemble.with_combiner(combiner)
        fused.__class__ = cls
        fused.engine, fused.stack, fused.decisions = engine, None, {}
        return fused  # type: ignore[return-value]

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.training, x.device.type, torch.is_autocast_enabled(x.device.type))
        if key not in self.decisions:
            self.decisions[key] = self.engine.fusable(GLOBAL_PGD, self.members, x)
        elif self.decisions[key]:
            self.engine.fused_calls[GLOBAL_PGD] += 1
        if not self.decisions[key]:
            return super().member_logits(x)
        if self.stack is None:
            self.stack = stack_members(self.members, detach=True)
        return self.engine.fused_members(self.members)(x, self.stack)


class MemberEngine:
    """The member passes of iGAT's global step, `loop` or `fused`; counts the fused calls and records every
    fallback to the loop with its reason."""

    def __init__(self, kind: str = "loop", cuda_graphs: bool = False):
        if kind not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {kind!r}")
        self.kind, self.cuda_graphs = kind, cuda_graphs
        self.fused_calls: Counter[str] = Counter()
        self.fallbacks: dict[str, str] = {}
        self._fused: FusedMembers | None = None
        self._graphs: dict[tuple, CapturedPGDStep] = {}

    def fusable(self, site: str, members: nn.ModuleList, x: torch.Tensor) -> bool:
        reason = unfusable_reason(members, x)
        if reason is None:
            self.fused_calls[site] += 1
            return True
        self.fall_back(site, reason)
        return False

    def fall_back(self, site: str, reason: str) -> None:
        if self.fallbacks.get(site) != reason:
            log.warning("fused engine: the %s falls back to the member loop: %s", site, reason)
        self.fallbacks[site] = reason

    def fused_members(self, members: nn.ModuleList) -> FusedMembers:
        if self._fused is None or self._fused.members is not members:
            self._fused = FusedMembers(members)
        return self._fused

    def attack(self, ensemble: Ensemble, combiner: str, eps: float, step: float, steps: int, random_start: bool,
               model_mode: str, generator: torch.Generator | None) -> PGD:
        """The global PGD (eq. 12) on the ensemble combined by `combiner`."""
        if self.kind == "loop":
            return PGD(ensemble.with_combiner(combiner), eps, step, steps, random_start, model_mode=model_mode,
                       generator=generator)
        model = FusedEnsemble.view(ensemble, combiner, self)
        if self.cuda_graphs and self._graphs_apply(model, model_mode):
            return GraphedPGD(model, eps, step, steps, random_start, model_mode=model_mode, generator=generator,
                              graphs=self._graphs)
        return PGD(model, eps, step, steps, random_start, model_mode=model_mode, generator=generator)

    def _graphs_apply(self, model: Ensemble, model_mode: str) -> bool:
        device = next(model.parameters()).device
        if device.type != "cuda":
            self.fall_back("CUDA-graph capture of the global PGD", f"the members are on {device.type}, not CUDA")
        elif model_mode != "eval":
            self.fall_back("CUDA-graph capture of the global PGD", "the attack runs BatchNorm in train mode")
        return device.type == "cuda" and model_mode == "eval"

    def member_logits(self, ensemble: Ensemble, x: torch.Tensor) -> torch.Tensor:
        """(N, B, C) logits of every member on `x`, differentiable in the members' parameters."""
        if self.kind == "loop" or not self.fusable(MEMBER_PASS, ensemble.members, x):
            return ensemble.member_logits(x)
        return self.fused_members(ensemble.members)(x, stack_members(ensemble.members, detach=False))

    def report(self) -> dict[str, object]:
        """What ran fused (calls per pass) and what ran the loop, with the reason."""
        if self.kind == "loop":
            return {"engine": "loop"}
        loop = {**self.fallbacks, BASE_LOSS: BASE_LOSS_REASON}
        return {"engine": "fused", "fused_calls": dict(self.fused_calls), "loop": loop}

    def summary(self) -> str:
        if self.kind == "loop":
            return "engine loop: every member pass runs member by member"
        loop = "; ".join(f"{site} ({reason})" for site, reason in {**self.fallbacks, BASE_LOSS: BASE_LOSS_REASON}
                         .items())
        return f"engine fused: the {GLOBAL_PGD} and the {MEMBER_PASS} fused where fusion applies; member loop: {loop}"


def uncached_autocast() -> torch.autocast:
    """CUDA's current autocast state without its cast cache, whose casts a captured graph would not replay."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


class CapturedPGDStep:
    """One PGD step on a fixed input shape (forward, summed CE, input gradient, signed step, projection), captured
    as a CUDA graph over static tensors; `__call__` copies the iterate in and replays it. CUDA only, untested."""

    def __init__(self, model: FusedEnsemble, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float):
        self.model, self.eps, self.step = model, eps, step
        self.x = images.detach().clone().requires_grad_(True)
        self.origin, self.labels = images.detach().clone(), labels.detach().clone()
        self.capture()

    def capture(self) -> None:
        """Three warm-up steps on a side stream, then the step captured into `graph`, its output `next`."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), uncached_autocast():
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), uncached_autocast():
            self.next = self._step()

    def _step(self) -> torch.Tensor:
        grad, = torch.autograd.grad(F.cross_entropy(self.model(self.x), self.labels, reduction="sum"), self.x)
        return project_linf(self.x.detach() + self.step * grad.sign(), self.origin, self.eps)

    def refresh(self, stack: MemberStack, images: torch.Tensor, labels: torch.Tensor) -> None:
        """New members' weights (after an optimiser step), clean images and labels into the static tensors."""
        assert self.model.stack is not None
        with torch.no_grad():
            for static, new in zip([*self.model.stack.params.values(), *self.model.stack.buffers.values()],
                                   [*stack.params.values(), *stack.buffers.values()]):
                static.copy_(new)
            self.origin.copy_(images)
            self.labels.copy_(labels)

    def replay(self) -> None:
        self.graph.replay()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.x.copy_(x)
        self.replay()
        return self.next.clone()


class GraphedPGD(PGD):
    """The global PGD with each step replayed from a `CapturedPGDStep` (one per input shape, dtype and autocast
    state, kept by the engine across batches); CUDA only, untested on a GPU."""

    def __init__(self, model: FusedEnsemble, *args: object, graphs: dict[tuple, CapturedPGDStep],
                 **kwargs: object):
        super().__init__(model, *args, **kwargs)  # type: ignore[arg-type]
        self.graphs = graphs

    def _one_run(self, images: torch.Tensor, labels: torch.Tensor, run: int = 0) -> torch.Tensor:
        model: FusedEnsemble = self.model  # type: ignore[assignment]
        key = (tuple(images.shape), images.dtype, model.combiner, torch.is_autocast_enabled("cuda"))
        stack = stack_members(model.members, detach=True)
        if key not in self.graphs:
            model.stack = stack
            self.graphs[key] = CapturedPGDStep(model, images, labels, self.eps, self.step)
        captured = self.graphs[key]
        captured.refresh(stack, images, labels)
        x = images
        if self.random_start:
            noise = torch.rand(images.shape, generator=self.generator, device="cpu").to(images.device)
            x = (images + (2 * noise - 1) * self.eps).clamp(0.0, 1.0)
        for t in range(self.steps):
            x = captured(x)
            self.report_progress((run * self.steps + t + 1) / (self.restarts * self.steps))
        return x
