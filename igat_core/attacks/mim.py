"""MIM: the momentum iterative method, MI-FGSM under L-infinity (Dong et al., CVPR 2018)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, ModelMode, project_linf, standing_of


class MIM(Attack):
    """Signed steps along an accumulated, L1-normalised gradient; no random start, as in the paper.

    The evaluation runs it with the PGD budget (steps, step size) so the white-box attacks are comparable; the
    paper's own setting is steps = 10 and step = eps / steps.
    """

    name = "mim"

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, settings.step, settings.steps, decay=settings.mim_decay)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step: float = 2 / 255, steps: int = 20,
                 decay: float = 1.0, model_mode: ModelMode = "eval"):
        super().__init__(model, eps, model_mode)
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if decay < 0:
            raise ValueError(f"decay must be >= 0, got {decay}")
        self.step, self.steps, self.decay = step, steps, decay

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.clone()
        momentum = torch.zeros_like(images)
        for t in range(self.steps):
            x = x.detach().requires_grad_(True)
            outputs = self.model(x)
            grad, = torch.autograd.grad(F.cross_entropy(outputs, labels, reduction="sum"), x)
            l1 = grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
            # Dong et al. 2018, Alg. 1: g_{t+1} = mu g_t + grad / ||grad||_1; x_{t+1} = x_t + alpha sign(g_{t+1}).
            momentum = self.decay * momentum + grad / l1
            x = project_linf(x.detach() + self.step * momentum.sign(), images, self.eps)
            self.report_progress((t + 1) / self.steps, standing_of(outputs, labels))
        self.cost = torch.full((len(images),), self.steps, dtype=torch.long)
        return x.detach()
