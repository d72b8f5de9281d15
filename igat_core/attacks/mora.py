"""MORA, the model-reweighing attack on ensembles (Yu, Gao & Xu, NeurIPS 2022, "MORA: Improving Ensemble Robustness
Evaluation with Model-Reweighing Attack"; code github.com/lafeat/mora, `mora_attack.py` and `mora.py`).

Standard attacks see an ensemble only through its combined output, where a few confident members can hide the
gradient of the others; MORA attacks a mixture of the combined output and a reweighed mean of the members' logits.
What the repository computes at each of the T iterations, on the examples not yet broken (written here from it):

- members' logits z_i (i = 1..N) and the combined output F (log of the combined probabilities, either combiner);
- member scale S = max_i (z_i(1) - z_i(2)) / 10 when that exceeds 10, else 1 (z(1), z(2): the top two entries),
  scaled logits z^_i = z_i / S; the scaled ensemble P = mean_i softmax(z^_i); member probabilities
  p_i = softmax(tau z_i) with the temperature tau (the repository's `float_dis`);
- k = P's top class when that is not y, else its runner-up; sigma = +1 when P misclassifies, -1 when it does not;
- weight w_i = sigma p_i[k] p_i[y] / P[y] + p_i[k] (1 - sigma p_i[k]) / P[k] (`get_probablity_weight`), kept only
  for members that classify correctly (m_i = 1; the softmax and voting ensembles' branch);
- mixed logits M = (1 - s) F / (F(1) - F(2)) + s sum_i m_i w_i z^_i / (1e-8 + sum_i m_i w_i), loss CE(M, y);
  S, P, p_i, w_i, m_i and the margin of F are constants of the step (computed on detached outputs);
- step eta_t = 2 eps (1 - t / T) (linear decay), x' = Proj(x_t + eta_t sign(grad)), then
  x_{t+1} = Proj(x_t + 0.75 (x' - x_t) + 0.25 (x_t - x_{t-1})) (plain x' at t = 0), Proj = eps-ball and [0, 1];
- random start x_0 = x + eps u / max|u| per example, u uniform in [-1, 1]^d, clipped to [0, 1];
- an example that the combined output misclassifies after a step is done: it keeps that first adversarial point.

Restarts follow the authors' `standard-pre` run list: run r uses the mixing weight s = (0.5, 0, 0.25, 0.75, 1)[r mod
5], each from a fresh random start, on the examples every earlier run left standing.

Authors' defaults (all from the repository): T = 100 iterations (`n_iter`), 5 runs, tau = 0.2 (`eval_mora.py`'s
`float_dis` default and its scripts for softmax ensembles; the class default is 1.0), the linear step decay (the
class default; the evaluation scripts pass `--decay_step=cosine`), CE loss. Not taken over: the targeted run
(`MORAAttack_targeted`, whose loss the code overwrites with plain targeted CE on the ensemble), the repository's
scaled ensemble P summing only the first N - 1 members (here all N), its unguarded division by F's margin (here
clamped at 1e-12), and its eps shrunk by 1.9e-8 (here the exact projection). Cost: one gradient per attacked
example and iteration; an example stops costing when it is broken.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, ModelMode, outputs_and_members, project_linf, top2_margin

MIXING = (0.5, 0.0, 0.25, 0.75, 1.0)
MOMENTUM = 0.75
SCALE_CAP = 10.0
WEIGHT_FLOOR = 1e-8


def member_scale(logits: torch.Tensor) -> torch.Tensor:
    """(N, B, C) -> (B,): the largest member top-2 margin / 10 when it exceeds 10, else 1."""
    largest = top2_margin(logits).amax(dim=0)
    return torch.where(largest > SCALE_CAP, largest / SCALE_CAP, torch.ones_like(largest))


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(..., B, C) values at the (B,) class `index` of each example -> (..., B)."""
    return values.gather(-1, index.view(*([1] * (values.dim() - 2)), -1, 1).expand(*values.shape[:-1], 1)).squeeze(-1)


def member_weights(scaled: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """(N, B) MORA weights m_i w_i of the module docstring, from scaled and raw member logits (both detached)."""
    ensemble = torch.softmax(scaled, dim=-1).mean(dim=0)
    probs = torch.softmax(temperature * logits, dim=-1)
    top2 = ensemble.topk(2, dim=-1).indices
    wrong = top2[:, 0] != labels
    k = torch.where(wrong, top2[:, 0], top2[:, 1])
    sigma = wrong.to(probs.dtype) * 2 - 1
    q, p_y = _pick(probs, k), _pick(probs, labels)
    weight = sigma * q * p_y / _pick(ensemble, labels).clamp_min(1e-30) + q * (1 - sigma * q) / _pick(
        ensemble, k).clamp_min(1e-30)
    return weight * (scaled.argmax(dim=-1) == labels)


def mixed_logits(outputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, mixing: float,
                 temperature: float) -> torch.Tensor:
    """M = (1 - s) F / margin(F) + s sum_i m_i w_i z^_i / (1e-8 + sum_i m_i w_i), the constants detached."""
    scaled = logits / member_scale(logits.detach())[None, :, None]
    weights = member_weights(scaled.detach(), logits.detach(), labels, temperature)
    members = (weights[..., None] * scaled).sum(dim=0) / (WEIGHT_FLOOR + weights.sum(dim=0))[:, None]
    ensemble = outputs / top2_margin(outputs.detach()).clamp_min(1e-12)[:, None]
    return (1 - mixing) * ensemble + mixing * members


class MORA(Attack):
    """MORA under L-infinity, the module docstring's loop; `restarts` runs over the authors' mixing weights."""

    name = "mora"
    ensemble_aware = True

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, settings.mora_steps, settings.mora_restarts, generator=generator)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, steps: int = 100, restarts: int = 5,
                 temperature: float = 0.2, model_mode: ModelMode = "eval", generator: torch.Generator | None = None):
        super().__init__(model, eps, model_mode)
        if steps < 1 or restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.steps, self.restarts, self.temperature = steps, restarts, temperature
        self.generator = generator

    def project(self, x: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        return project_linf(x, origin, self.eps)

    def random_start(self, images: torch.Tensor) -> torch.Tensor:
        u = 2 * torch.rand(images.shape, generator=self.generator, device="cpu").to(images.device) - 1
        peak = u.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, *([1] * (u.dim() - 1)))
        return self.project(images + self.eps * u / peak, images)

    def gradient(self, x: torch.Tensor, labels: torch.Tensor, mixing: float) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        outputs, logits = outputs_and_members(self.model, x)
        loss = F.cross_entropy(mixed_logits(outputs, logits, labels, mixing, self.temperature), labels,
                               reduction="sum")
        return torch.autograd.grad(loss, x)[0]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adv = images.clone()
        robust = torch.ones(len(images), dtype=torch.bool, device=images.device)
        self.cost = torch.zeros(len(images), dtype=torch.long)
        for run in range(self.restarts):
            index = robust.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            self._one_run(images, labels, index, adv, robust, run)
        self.report_progress(1.0)
        return adv

    def _one_run(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, adv: torch.Tensor,
                 robust: torch.Tensor, run: int) -> None:
        """Run `run` on the examples `index`, writing each one's first adversarial point (else its last iterate)
        into `adv` and clearing its `robust` flag when it breaks."""
        origin, y = images[index], labels[index]
        x = self.random_start(origin)
        previous = x
        for t in range(self.steps):
            assert self.cost is not None
            self.cost[index.cpu()] += 1
            eta = 2 * self.eps * (1 - t / self.steps)
            proposal = self.project(x + eta * self.gradient(x, y, MIXING[run % len(MIXING)]).sign(), origin)
            momentum = MOMENTUM if t > 0 else 1.0
            x, previous = self.project(x + momentum * (proposal - x) + (1 - momentum) * (x - previous), origin), x
            with torch.no_grad():
                broken = self.model(x).argmax(dim=1) != y
            adv[index] = x.detach()
            robust[index[broken]] = False
            index, origin, y, x, previous = (v[~broken] for v in (index, origin, y, x, previous))
            self.report_progress((run * self.steps + t + 1) / (self.restarts * self.steps), robust.cpu)
            if index.numel() == 0:
                return
