"""Member-logit surrogates: white-box PGD on the mean of the members' logits, then on each member alone.

The paper's combiners average (or take the maximum of) the members' softmax probabilities. A member whose logits
are saturated has a softmax of exactly 0 and 1 in float32, so it contributes no gradient to the combined output
even where it decides the combined verdict; the mean of the logits keeps its gradient (attacks.md section 7). Each
surrogate attacks the examples that the surrogates before it left standing, and an example counts as broken when
the attacked model (the ensemble under its combiner) misclassifies any surrogate's adversarial example, so the
union over the attempts is taken inside the attack. Budget: PGD's (`steps` signed steps of size `step`, random
start) per surrogate; cost: the gradients each example was given, summed over the surrogates that attacked it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, ModelMode, outputs_and_members
from igat_core.attacks.pgd import PGD


class MeanLogits(nn.Module):
    """The mean of a model's member logits (the model itself when it has no members)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return outputs_and_members(self.model, x)[1].mean(dim=0)


def surrogates(model: nn.Module) -> list[nn.Module]:
    """The mean of the member logits, then each member alone when there are several."""
    members = list(getattr(model, "members", []))
    return [MeanLogits(model), *(members if len(members) > 1 else [])]


class LogitPGD(Attack):
    """PGD on each surrogate of `surrogates` in turn, on the examples the attacked model still classifies."""

    name = "logit_pgd"
    ensemble_aware = True
    surrogate_attack: type[PGD] = PGD

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, settings.step, settings.steps, generator=generator)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step: float = 2 / 255, steps: int = 20,
                 model_mode: ModelMode = "eval", generator: torch.Generator | None = None):
        super().__init__(model, eps, model_mode)
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.step, self.steps, self.generator = step, steps, generator

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adv = images.clone()
        robust = torch.ones(len(images), dtype=torch.bool, device=images.device)
        self.cost = torch.zeros(len(images), dtype=torch.long)
        found = surrogates(self.model)
        for k, surrogate in enumerate(found):
            index = robust.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            pgd = self.surrogate_attack(surrogate, self.eps, self.step, self.steps, generator=self.generator)
            adv[index] = pgd.forward(images[index], labels[index]).detach()
            assert pgd.cost is not None
            self.cost.index_add_(0, index.cpu(), pgd.cost)
            with torch.no_grad():
                robust[index] = self.model(adv[index]).argmax(dim=1) == labels[index]
            self.report_progress((k + 1) / len(found), robust.cpu)
        return adv
