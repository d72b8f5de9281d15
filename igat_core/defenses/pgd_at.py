"""PGD adversarial training of each member on its own adversarial examples (Madry et al., 2018).

With one member this is the single-model baseline of supplement Table 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igat_core.defenses.base import BaseMethod, LossOutput, PgdSettings
from igat_core.ensemble import Ensemble


class PgdAT(BaseMethod):
    name = "pgd_at"

    def __init__(self, eps: float = 8 / 255, step: float = 2 / 255, steps: int = 10, random_start: bool = True,
                 model_mode: str = "eval"):
        self.pgd = PgdSettings.parse(eps, step, steps, random_start, model_mode, prefix="")

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        total = x.new_zeros(())
        for member in ensemble.members:
            total = total + F.cross_entropy(member(self.pgd.attack(member, generator)(x, y)), y)
        return LossOutput(total, {"adv_ce": float(total.detach())})
