"""The shared attack interface: model, images in [0,1], labels -> adversarial images in the eps-ball and [0,1].

Every attack runs the model in eval mode unless told otherwise (`model_mode="train"` reproduces the official
iGAT code, whose training attacks run with BN in train mode) and restores the model's mode afterwards. After a
call, `cost` holds what was spent on each example: gradients for white-box attacks, forward queries for
black-box ones (`BlackBoxAttack`), which see the model only through `query` and never get gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ModelMode = Literal["eval", "train"]


def project_linf(x: torch.Tensor, origin: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. (3): clip to the L-infinity ball of radius eps around origin, then to the image range [0,1]."""
    return torch.clamp(torch.min(torch.max(x, origin - eps), origin + eps), 0.0, 1.0)


def margin_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example max_{j != y} z_j - z_y: positive exactly when the example is misclassified."""
    true = outputs.gather(1, labels[:, None]).squeeze(1)
    others = outputs.masked_fill(F.one_hot(labels, outputs.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example cross-entropy; on an ensemble's log-probabilities it is -log p_y."""
    return F.cross_entropy(outputs, labels, reduction="none")


class Attack(ABC):
    name: str = "attack"
    white_box: bool = True

    def __init__(self, model: nn.Module, eps: float, model_mode: ModelMode = "eval"):
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must lie in [0, 1] for images in [0, 1], got {eps}")
        if model_mode not in ("eval", "train"):
            raise ValueError(f"model_mode must be 'eval' or 'train', got {model_mode!r}")
        self.model = model
        self.eps = eps
        self.model_mode = model_mode
        self.cost: torch.Tensor | None = None

    @abstractmethod
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The attack itself, on a model already in the right mode."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.min() < 0 or images.max() > 1:
            raise ValueError("images must lie in [0, 1] (normalisation belongs inside the model)")
        was_training = self.model.training
        self.model.train(self.model_mode == "train")
        try:
            with torch.enable_grad() if self.white_box else torch.no_grad():
                adv = self.forward(images.detach(), labels.detach())
        finally:
            self.model.train(was_training)
        return project_linf(adv.detach(), images, self.eps)

    def __repr__(self) -> str:
        hidden = ("model", "cost", "generator")
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
