"""The shared attack interface: model, images in [0,1], labels -> adversarial images in the eps-ball and [0,1].

Every attack runs the model in eval mode unless told otherwise (`model_mode="train"` reproduces the official
iGAT code, whose training attacks run with BN in train mode) and restores the model's mode afterwards. After a
call, `cost` holds what was spent on each example: gradients for white-box attacks, forward queries for
black-box ones (`BlackBoxAttack`), which see the model only through `query` and never get gradients.

Every attack's own `forward` keeps its output in the eps-ball and [0,1]. `Attack.__call__` still projects the
output (so the numbers computed on it are always of valid examples), and records in `raw_bounds` what `forward`
returned before that projection, for the evaluation's sanity checks: a forward that steps outside shows there.

A caller may pass `step`, a `StepCallback`: the attack's `forward` calls `report_progress` after each of its steps
(iteration, query round, component), which hands the callback the fraction of the call's work done and, lazily,
which examples stand so far. Reporting reads the attack's state and changes nothing it computes.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

ModelMode = Literal["eval", "train"]
EPS_TOLERANCE = 1e-6
#: Which examples of the call the attack has not broken so far (a bool tensor, computed only when asked).
Standing = Callable[[], torch.Tensor]
#: Told after each step of an attack call: the fraction of the call's work done, and the standing examples when
#: the attack knows them.
StepCallback = Callable[[float, Standing | None], None]


def project_linf(x: torch.Tensor, origin: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. (3): clip to the L-infinity ball of radius eps around origin, then to the image range [0,1]."""
    return torch.clamp(torch.min(torch.max(x, origin - eps), origin + eps), 0.0, 1.0)


def margin_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example max_{j != y} z_j - z_y: positive exactly when the example is misclassified."""
    true = outputs.gather(1, labels[:, None]).squeeze(1)
    others = outputs.masked_fill(F.one_hot(labels, outputs.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def standing_of(outputs: torch.Tensor, labels: torch.Tensor) -> Standing:
    """The examples `outputs` classify correctly, computed when asked (a `report_progress` argument)."""
    return lambda: (outputs.detach().argmax(1) == labels).cpu()


def top2_margin(outputs: torch.Tensor) -> torch.Tensor:
    """Per row of the last dimension: the largest entry minus the second largest."""
    top = outputs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def outputs_and_members(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output and its members' (N, B, C) logits (`Ensemble.combined_and_members`); a model without
    members is its own single member."""
    both = getattr(model, "combined_and_members", None)
    if callable(both):
        return both(x)
    outputs = model(x)
    return outputs, outputs[None]


def cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example cross-entropy; on an ensemble's log-probabilities it is -log p_y."""
    return F.cross_entropy(outputs, labels, reduction="none")


@dataclass
class OutputBounds:
    """How attack outputs lie relative to their clean images: the largest L-inf distance minus eps (`excess`) and
    the smallest and largest pixel. Empty (excess -inf) until an output is included; a NaN pixel counts as
    infinitely far and outside [0,1]. `within_eps` allows EPS_TOLERANCE (1e-6) of float round-off: (x + eps) - x
    can exceed eps by an ulp of x, 6e-8 for x in [0,1]; `within_range` allows none, as clamping is exact."""

    excess: float = -math.inf
    low: float = math.inf
    high: float = -math.inf

    @classmethod
    def measure(cls, adv: torch.Tensor, images: torch.Tensor, eps: float) -> OutputBounds:
        if adv.numel() == 0:
            return cls()
        distance, low, high = torch.stack([(adv - images).abs().max(), adv.min(), adv.max()]).tolist()
        if math.isnan(distance):
            return cls(math.inf, -math.inf, math.inf)
        return cls(distance - eps, low, high)

    def include(self, other: OutputBounds) -> None:
        self.excess = max(self.excess, other.excess)
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)

    @property
    def empty(self) -> bool:
        return self.excess == -math.inf

    @property
    def within_eps(self) -> bool:
        return self.excess <= EPS_TOLERANCE

    @property
    def within_range(self) -> bool:
        return self.low >= 0.0 and self.high <= 1.0


class AttackSettings(Protocol):
    """The evaluation settings an attack takes its budget from (`evaluate.EvalConfig`)."""

    step: float
    steps: int
    seed: int
    cw_kappa: float
    mim_decay: float
    signhunter_queries: int
    simba_queries: int
    bandits_queries: int
    autoattack_steps: int
    square_queries: int
    mora_steps: int
    mora_restarts: int


class Attack(ABC):
    name: str = "attack"
    white_box: bool = True
    #: Whether the attack is one of the ensemble-aware evaluations the paper's lacks: MORA and the logit surrogates
    #: read the members themselves, the transfer attack uses an independent source ensemble.
    ensemble_aware: bool = False
    _step: StepCallback | None = None

    def __init__(self, model: nn.Module, eps: float, model_mode: ModelMode = "eval"):
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must lie in [0, 1] for images in [0, 1], got {eps}")
        if model_mode not in ("eval", "train"):
            raise ValueError(f"model_mode must be 'eval' or 'train', got {model_mode!r}")
        self.model = model
        self.eps = eps
        self.model_mode = model_mode
        self.cost: torch.Tensor | None = None
        self.raw_bounds: OutputBounds | None = None

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        """This attack at `eps` with the evaluation's budget for it (`evaluate` runs it by `name`)."""
        raise NotImplementedError(f"{cls.name} is not one of the evaluation's attacks")

    @abstractmethod
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The attack itself, on a model already in the right mode."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: StepCallback | None = None) -> torch.Tensor:
        if images.min() < 0 or images.max() > 1:
            raise ValueError("images must lie in [0, 1] (normalisation belongs inside the model)")
        was_training = self.model.training
        self.model.train(self.model_mode == "train")
        self._step = step
        try:
            with torch.enable_grad() if self.white_box else torch.no_grad():
                adv = self.forward(images.detach(), labels.detach())
        finally:
            self.model.train(was_training)
            self._step = None
        self.raw_bounds = OutputBounds.measure(adv.detach(), images, self.eps)
        return project_linf(adv.detach(), images, self.eps)

    @property
    def reporting(self) -> bool:
        """Whether this call has a step callback (an attack may skip bookkeeping it needs only for reports)."""
        return self._step is not None

    def report_progress(self, fraction: float, standing: Standing | None = None) -> None:
        """Tell the call's step callback, if any, that `fraction` of the call's work is done."""
        if self._step is not None:
            self._step(min(max(fraction, 0.0), 1.0), standing)

    def __repr__(self) -> str:
        hidden = ("model", "cost", "generator", "raw_bounds")
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k not in hidden and not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class BlackBoxAttack(Attack):
    """A score-based attack: it sees only the model's output, through `query`, which counts every example's
    forward queries into `cost` (one query = one example scored once). A query budget is per example."""

    white_box = False

    def __init__(self, model: nn.Module, eps: float, queries: int, model_mode: ModelMode = "eval",
                 generator: torch.Generator | None = None):
        super().__init__(model, eps, model_mode)
        if queries < 1:
            raise ValueError(f"the query budget must be >= 1, got {queries}")
        self.queries = queries
        self.generator = generator

    def query(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The model's output on `images`, which are the examples `index` of the current batch."""
        assert self.cost is not None
        self.cost.index_add_(0, index.cpu(), torch.ones(len(index), dtype=self.cost.dtype))
        if bool((self.cost[index.cpu()] > self.queries).any()):
            raise RuntimeError(f"{type(self).__name__} exceeded its budget of {self.queries} queries per example")
        with torch.no_grad():
            return self.model(images)

    def start(self, n: int) -> None:
        self.cost = torch.zeros(n, dtype=torch.long)

    def left(self) -> torch.Tensor:
        """Queries each example may still spend."""
        assert self.cost is not None
        return self.queries - self.cost

    def unbroken(self, active: torch.Tensor, floor: int = 1) -> Standing:
        """The examples not broken so far, by the attack's `active` examples and its stop rule: an inactive
        example with `floor` or more queries left stopped because it was broken (or misclassified from the start)."""
        return lambda: active.cpu() | (self.left() < floor)

    def work_done(self, active: torch.Tensor) -> float:
        """The fraction of the call's work done: a stopped example counts whole, an `active` one by the share of
        its budget it has spent."""
        assert self.cost is not None
        share = (self.cost.double() / self.queries).masked_fill(~active.cpu(), 1.0)
        return float(share.mean()) if len(share) else 1.0
