"""The cross-entropy loss curvature of eq. (2), estimated by finite differences of input gradients.

lambda_f(x, delta) = ||grad l(f(x + delta), y) - grad l(f(x), y)||_2 / ||delta||_2, with gradients taken in the
model's input space (images in [0, 1]; normalisation is inside the model). A model may return logits or
log-probabilities (an ensemble's combined output): cross-entropy is taken on either. Each example is probed
along the gradient-sign direction (as in CURE, the paper's ref. [28]) and along `n_random` Gaussian directions,
all scaled to L2 norm `radius`, and keeps the largest value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CurvatureConfig:
    radius: float
    n_random: int = 2
    batch_size: int = 256
    seed: int = 0


def input_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example gradient of the cross-entropy loss w.r.t. the input (same shape as images)."""
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels, reduction="sum")
        grad, = torch.autograd.grad(loss, x)
    return grad


def curvature_along(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor,
                    base_grad: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (2) for each example along its own perturbation delta (same shape as images)."""
    g0 = input_gradients(model, images, labels) if base_grad is None else base_grad
    g1 = input_gradients(model, images + delta, labels)
    num = (g1 - g0).flatten(1).norm(dim=1)
    return num / delta.flatten(1).norm(dim=1).clamp_min(1e-12)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def probe_directions(grad: torch.Tensor, n_random: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Unit-norm directions per example: sign(grad) (a random sign where the gradient is 0), then Gaussians."""
    coin = torch.randint(0, 2, grad.shape, generator=generator).to(grad) * 2 - 1
    sign = torch.where(grad != 0, grad.sign(), coin)
    directions = [_unit(sign)]
    for _ in range(n_random):
        directions.append(_unit(torch.randn(grad.shape, generator=generator).to(grad)))
    return directions


@torch.no_grad()
def pointwise_curvature(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        config: CurvatureConfig) -> torch.Tensor:
    """max over probe directions of lambda(x, delta) for every example: a (B,) tensor on the CPU."""
    if config.radius <= 0:
        raise ValueError(f"radius must be > 0, got {config.radius}")
    device = next((p.device for p in model.parameters()), images.device)
    generator = torch.Generator().manual_seed(config.seed)
    out = []
    for start in range(0, len(labels), config.batch_size):
        x = images[start:start + config.batch_size].to(device)
        y = labels[start:start + config.batch_size].to(device)
        g0 = input_gradients(model, x, y)
        best = torch.zeros(len(y), device=device)
        for direction in probe_directions(g0.cpu(), config.n_random, generator):
            lam = curvature_along(model, x, y, config.radius * direction.to(device), base_grad=g0)
            best = torch.maximum(best, lam)
        out.append(best.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def default_radius(eps: float, images: torch.Tensor) -> float:
    """The L2 norm of an L-infinity eps-ball corner, eps * sqrt(d): the size of an FGSM step."""
    return eps * math.sqrt(images[0].numel())


def upper_quantile(values: torch.Tensor, q: float) -> float:
    """The smallest value with at least a fraction q of the values at or below it (exact for inf entries)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {q}")
    ordered = values.double().flatten().sort().values
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def summarize(values: torch.Tensor, quantile: float = 1.0) -> dict[str, float]:
    """mean, median, q95, max and the chosen quantile ("tilde", e.g. lambda-tilde) of per-example values."""
    v = values.double().flatten()
    if v.numel() == 0:
        return {"mean": math.nan, "median": math.nan, "q95": math.nan, "max": math.nan, "tilde": math.nan}
    return {"mean": float(v.mean()), "median": upper_quantile(v, 0.5), "q95": upper_quantile(v, 0.95),
            "max": float(v.max()), "tilde": upper_quantile(v, quantile)}
