"""The shared attack interface: model, images in [0,1], labels -> adversarial images in the eps-ball and [0,1].

Every attack runs the model in eval mode unless told otherwise (`model_mode="train"` reproduces the official
iGAT code, whose training attacks run with BN in train mode) and restores the model's mode afterwards. After a
call, `cost` holds the gradients or queries spent on each example.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import nn

ModelMode = Literal["eval", "train"]


def project_linf(x: torch.Tensor, origin: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. (3): clip to the L-infinity ball of radius eps around origin, then to the image range [0,1]."""
    return torch.clamp(torch.min(torch.max(x, origin - eps), origin + eps), 0.0, 1.0)


class Attack(ABC):
    name: str = "attack"

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
            with torch.enable_grad():
                adv = self.forward(images.detach(), labels.detach())
        finally:
            self.model.train(was_training)
        return project_linf(adv.detach(), images, self.eps)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k not in ("model", "cost"))
        return f"{type(self).__name__}({params})"
