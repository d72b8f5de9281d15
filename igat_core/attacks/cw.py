"""CW-L-infinity: the Carlini-Wagner margin loss maximised by L-infinity PGD (Carlini & Wagner, S&P 2017)."""

from __future__ import annotations

import os

import torch
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, ModelMode, margin_loss
from igat_core.attacks.pgd import PGD


class CWLinf(PGD):
    """PGD on the clipped margin loss, the "CW-L-inf" of the adversarial-training literature.

    The loss is -max(z_y - max_{j != y} z_j, -kappa) on the model's output (an ensemble's log-probabilities),
    so it stops pushing an example once its margin is below -kappa. The default kappa = 50 is effectively pure
    margin maximisation: on log-probabilities a margin of -50 means the wrong class is e^50 times likelier.
    """

    name = "cw"

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, settings.step, settings.steps, kappa=settings.cw_kappa, generator=generator)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step: float = 2 / 255, steps: int = 20,
                 kappa: float = 50.0, random_start: bool = True, restarts: int = 1, model_mode: ModelMode = "eval",
                 generator: torch.Generator | None = None):
        super().__init__(model, eps, step, steps, random_start, restarts, model_mode, generator)
        if kappa < 0:
            raise ValueError(f"kappa must be >= 0, got {kappa}")
        self.kappa = kappa

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Carlini & Wagner 2017, objective f_6 (untargeted): max(Z_y - max_{j != y} Z_j, -kappa), minimised.
        return margin_loss(outputs, labels).clamp(max=self.kappa).sum()
