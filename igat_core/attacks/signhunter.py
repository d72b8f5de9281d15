"""SignHunter: L-infinity gradient-sign search over the vertices of the eps-ball (Al-Dujaili & O'Reilly, ICLR 2020)."""

from __future__ import annotations

import os

import math
from typing import Literal

import torch
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, BlackBoxAttack, ModelMode, cross_entropy, margin_loss

LOSSES = {"margin": margin_loss, "ce": cross_entropy}


class SignHunter(BlackBoxAttack):
    """Flip the signs of ever smaller contiguous chunks of s in x + eps * s, keeping flips that do not lower the loss.

    The budget counts forward queries per example, the first query at the clean image included; an example stops
    when misclassified or when its budget is spent. (BlackboxBench, which the iGAT authors ran, counts iterations
    of at least two forward calls each, so its "500 queries" are about 1,000 of ours.) Chunks follow PyTorch's
    NCHW flattening. Past the finest depth the search starts again at depth 0 from the best signs found so far.
    The loss is the margin max_{j != y} z_j - z_y on the model's output, as in BlackboxBench; `loss="ce"` uses
    cross-entropy, as the authors' own code.
    """

    name = "signhunter"

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, queries=settings.signhunter_queries)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, queries: int = 500,
                 loss: Literal["margin", "ce"] = "margin", model_mode: ModelMode = "eval"):
        super().__init__(model, eps, queries, model_mode)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_fn = LOSSES[self.loss]
        n = len(images)
        self.start(n)
        origin = images.flatten(1)
        d = origin.shape[1]
        every = torch.arange(n, device=images.device)
        active = self.query(images, every).argmax(1) == labels
        signs = torch.ones_like(origin)
        adv = origin.clone()
        best = torch.full((n,), float("-inf"), device=images.device)
        max_depth = math.ceil(math.log2(d)) if d > 1 else 0
        depth, chunk_index, first = 0, 0, True
        while True:
            active &= self.left().to(images.device) > 0
            index = active.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            candidate = signs[index].clone()
            if not first:
                size = math.ceil(d / 2 ** depth)
                candidate[:, chunk_index * size:(chunk_index + 1) * size] *= -1
                chunk_index += 1
                if chunk_index * size >= d:
                    depth, chunk_index = (depth + 1, 0) if depth < max_depth else (0, 0)
            first = False
            x = (origin[index] + self.eps * candidate).clamp(0.0, 1.0)
            out = self.query(x.view(-1, *images.shape[1:]), index)
            value = loss_fn(out, labels[index])
            fooled = out.argmax(1) != labels[index]
            keep = (value >= best[index]) | fooled
            kept = index[keep]
            signs[kept], best[kept], adv[kept] = candidate[keep], value[keep], x[keep]
            active[index[fooled]] = False
            if self.reporting:
                self.report_progress(self.work_done(active), self.unbroken(active))
        return adv.view_as(images)
