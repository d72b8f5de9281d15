"""Bandits-TD under L-infinity: gradient estimation with time and data priors (Ilyas et al., ICLR 2019)."""

from __future__ import annotations

import os

import math

import torch
import torch.nn.functional as F
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, BlackBoxAttack, ModelMode, cross_entropy, project_linf


class Bandits(BlackBoxAttack):
    """Keep a prior v over the gradient at a tiled low resolution (data prior) that persists across iterations
    (time prior). Each iteration estimates <grad, u> by two antithetic finite-difference queries around v, updates
    v by exponentiated gradient and takes a signed step of size `image_lr` along the upsampled v.

    Each iteration costs three forward queries per example: the two probes and a check of the new iterate (the
    reference code does not count the check). The budget counts forward queries per example, the first query at
    the clean image included, and an iteration starts only when its three queries fit. Probes are clipped to
    [0,1]. Defaults follow BlackboxBench's CIFAR configuration on the [0,1] scale: fd_eta 0.01, online_lr 0.1,
    exploration 0.1, image_lr eps / 5 and a prior of 5/8 of the image side (20 x 20 on 32 x 32).
    """

    name = "bandits"

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, queries=settings.bandits_queries, generator=generator)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, queries: int = 10_000, image_lr: float | None = None,
                 fd_eta: float = 0.01, online_lr: float = 0.1, exploration: float = 0.1,
                 prior_size: int | None = None, model_mode: ModelMode = "eval",
                 generator: torch.Generator | None = None):
        super().__init__(model, eps, queries, model_mode, generator)
        if min(fd_eta, online_lr, exploration) <= 0:
            raise ValueError("fd_eta, online_lr and exploration must be > 0")
        if prior_size is not None and prior_size < 1:
            raise ValueError(f"prior_size must be >= 1, got {prior_size}")
        self.image_lr = eps / 5 if image_lr is None else image_lr
        self.fd_eta, self.online_lr, self.exploration = fd_eta, online_lr, exploration
        self.prior_size = prior_size

    def _upsample(self, prior: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return F.interpolate(prior, size=tuple(shape[-2:]), mode="nearest")

    def _probe(self, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        norm = direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + self.fd_eta * direction / norm).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = images.shape
        self.start(n)
        device = images.device
        side = self.prior_size or max(1, round(5 * min(height, width) / 8))
        prior = torch.zeros(n, channels, min(side, height), min(side, width), device=device)
        dim = prior[0].numel()
        adv = images.clone()
        every = torch.arange(n, device=device)
        active = self.query(images, every).argmax(1) == labels
        while True:
            active &= self.left().to(device) >= 3
            index = active.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            x, y, v = adv[index], labels[index], prior[index]
            noise = self.exploration * torch.randn(v.shape, generator=self.generator).to(device) / math.sqrt(dim)
            up = self._upsample(v + noise, images.shape), self._upsample(v - noise, images.shape)
            probes = torch.cat([self._probe(x, up[0]), self._probe(x, up[1])])
            loss_plus, loss_minus = cross_entropy(self.query(probes, index.repeat(2)), y.repeat(2)).chunk(2)
            # Ilyas et al. 2019: <grad, u> ~ (L(x + eta q+) - L(x + eta q-)) / (eta * delta), times u.
            estimate = ((loss_plus - loss_minus) / (self.fd_eta * self.exploration)).view(-1, 1, 1, 1) * noise
            # Exponentiated gradient on v in [-1, 1]: reweighting p = (1 + v) / 2 by exp(+-lr g) is
            # v <- tanh(atanh(v) + lr g).
            v = torch.tanh(torch.atanh(v.clamp(-1 + 1e-6, 1 - 1e-6)) + self.online_lr * estimate)
            prior[index] = v
            x = project_linf(x + self.image_lr * self._upsample(v, images.shape).sign(), images[index], self.eps)
            adv[index] = x
            active[index] = self.query(x, index).argmax(1) == y
            if self.reporting:
                self.report_progress(self.work_done(active), self.unbroken(active, 3))
        return adv
