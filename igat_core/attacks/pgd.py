"""L-infinity PGD (Madry et al., 2018) and FGSM (Goodfellow et al., 2015) with the cross-entropy loss.

The model may return logits or log-probabilities (an ensemble's combined output): CE is taken on either.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, ModelMode, project_linf, standing_of


class PGD(Attack):
    """eps-ball PGD: uniform random start, `steps` signed-gradient steps of size `step`, projection after each.

    With several restarts an example keeps the first iterate that fools the model, else the last one.
    """

    name = "pgd"

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, settings.step, settings.steps, random_start=True, generator=generator)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step: float = 2 / 255, steps: int = 20,
                 random_start: bool = True, restarts: int = 1, model_mode: ModelMode = "eval",
                 generator: torch.Generator | None = None):
        super().__init__(model, eps, model_mode)
        if steps < 1 or restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        self.step, self.steps, self.random_start, self.restarts = step, steps, random_start, restarts
        self.generator = generator

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, labels, reduction="sum")

    def _one_run(self, images: torch.Tensor, labels: torch.Tensor, run: int = 0) -> torch.Tensor:
        """Restart `run`; its steps are reported with the examples standing at each iterate (the first run's:
        a later run attacks only some of the call's examples)."""
        low, high = linf_box(images, self.eps)
        x = images
        if self.random_start:
            noise = torch.rand(images.shape, generator=self.generator, device="cpu").to(images.device)
            x = (images + (2 * noise - 1) * self.eps).clamp(0.0, 1.0)
        for t in range(self.steps):
            x = x.detach().requires_grad_(True)
            outputs = self.model(x)
            grad, = torch.autograd.grad(self.loss(outputs, labels), x)
            # eq. (3), the projection as one clamp to the box `linf_box`
            x = torch.clamp(grad.sign().mul_(self.step).add_(x.detach()), low, high)
            self.report_progress((run * self.steps + t + 1) / (self.restarts * self.steps),
                                 standing_of(outputs, labels) if run == 0 else None)
        return x.detach()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        best = self._one_run(images, labels)
        for run in range(1, self.restarts):
            with torch.no_grad():
                robust = self.model(best).argmax(1) == labels
            if not robust.any():
                break
            candidate = self._one_run(images[robust], labels[robust], run)
            best[robust] = candidate
        self.cost = torch.full((len(images),), self.steps * self.restarts, dtype=torch.long)
        return best


def linf_box(origin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds of the eps-ball around `origin` (in [0,1]) intersected with [0,1]: clamping to them gives exactly
    `project_linf(x, origin, eps)`, as the two boxes overlap."""
    return (origin - eps).clamp_min(0.0), (origin + eps).clamp_max(1.0)


class FGSM(Attack):
    """One signed-gradient step of size eps, clipped to [0,1]."""

    name = "fgsm"

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(self.model(x), labels, reduction="sum"), x)
        self.cost = torch.ones(len(images), dtype=torch.long)
        return project_linf(images + self.eps * grad.sign(), images, self.eps)
