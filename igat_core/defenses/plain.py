"""Plain ensemble training (the DVERGE "baseline"): the members' summed cross-entropy (eq. 11, omega = gamma = 0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igat_core.defenses.base import BaseMethod, LossOutput
from igat_core.ensemble import Ensemble


def summed_member_cross_entropy(member_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, B, C) logits -> sum over members of the batch-mean CE."""
    n, b, c = member_logits.shape
    return F.cross_entropy(member_logits.reshape(n * b, c), labels.repeat(n)) * n


class Plain(BaseMethod):
    name = "plain"

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        loss = summed_member_cross_entropy(ensemble.member_logits(x), y)
        return LossOutput(loss, {"ce": float(loss.detach())})
