"""The base-method interface: a method is its ensemble loss L_E (eq. 11), used for pretraining and inside eq. (16)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from igat_core.ensemble import Ensemble


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class BaseMethod(ABC):
    """One ensemble defense. `loss` must be differentiable w.r.t. every member's parameters."""

    name: str = "base"
    #: iGAT's (alpha, beta) defaults for this method (section 6.1)
    igat_defaults: tuple[float, float] = (5.0, 10.0)

    @abstractmethod
    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        """L_E on a batch of natural images x in [0,1] with labels y."""

    def __call__(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput:
        return self.loss(ensemble, x, y, generator)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}
