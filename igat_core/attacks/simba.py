"""SimBA with the pixel basis under L-infinity (Guo et al., "Simple Black-box Adversarial Attacks", ICML 2019)."""

from __future__ import annotations

import os

import torch
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, BlackBoxAttack, ModelMode


class SimBA(BlackBoxAttack):
    """Per example, visit the pixel coordinates in a random order without replacement; try -eps, then +eps on
    each, and keep a step when it lowers the model's probability of the true class.

    The step is eps and no coordinate is used twice, so every perturbation lies in {-eps, 0, eps}^d: inside the
    eps-ball without projection. A candidate that clipping to [0,1] leaves unchanged is not queried. The budget
    counts forward queries per example, the first query at the clean image included.
    """

    name = "simba"

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, queries=settings.simba_queries, generator=generator)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, queries: int = 10_000, model_mode: ModelMode = "eval",
                 generator: torch.Generator | None = None):
        super().__init__(model, eps, queries, model_mode, generator)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(images)
        self.start(n)
        device = images.device
        adv = images.flatten(1).clone()
        d = adv.shape[1]
        every = torch.arange(n, device=device)
        out = self.query(images, every)
        active = out.argmax(1) == labels
        true_log_prob = out.gather(1, labels[:, None]).squeeze(1)
        order = torch.rand(n, d, generator=self.generator).argsort(dim=1).to(device)
        for t in range(d):
            pending = active & (self.left().to(device) > 0)
            if not pending.any():
                break
            coord = order[:, t]
            clean = adv[every, coord]
            for sign in (-1.0, 1.0):
                value = (clean + sign * self.eps).clamp(0.0, 1.0)
                index = (pending & (self.left().to(device) > 0) & (value != clean)).nonzero().squeeze(1)
                if index.numel() == 0:
                    continue
                candidate = adv[index].clone()
                candidate[torch.arange(len(index), device=device), coord[index]] = value[index]
                out = self.query(candidate.view(-1, *images.shape[1:]), index)
                log_prob = out.gather(1, labels[index, None]).squeeze(1)
                # Guo et al. 2019, Alg. 1: accept x + step * q when p(y | x + step * q) < p(y | x).
                better = log_prob < true_log_prob[index]
                taken = index[better]
                adv[taken] = candidate[better]
                true_log_prob[taken] = log_prob[better]
                pending[taken] = False
                active[taken] = out[better].argmax(1) == labels[taken]
            if self.reporting:
                self.report_progress(max((t + 1) / d, self.work_done(active)), lambda: active.cpu())
        return adv.view_as(images)
