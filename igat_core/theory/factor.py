"""The factor matrix of Assumption 4.2.

p^(k)_i = sum_s (d a^(L-1)_s / d x_k) W^(L)_{i,s} = d z_i / d x_k, so P_h = sum_k p^(k) p^(k)^T = J J^T with
J = dz/dx the C x d Jacobian of the logits, and any full-rank factor M_h (P_h = M_h M_h^T) has the singular
nonzero singular values of J: ||M_h||_2 = sigma_max(J) (the bound B_0) and ||M_h^+||_2 = 1 / sigma_r(J), the
smallest nonzero one (the bound B that the proof of Lemma 2.1 uses, supplement eq. 38). ReLU layers with few
active units make J rank-deficient; the full-rank factor then has r < C columns. Derivatives are in the model's
input space (images in [0, 1]); biases do not change J.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def logit_jacobian(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, C, d) Jacobian of the model's logits z(x) w.r.t. each flattened input (one backward pass per class)."""
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
        rows = []
        for c in range(z.shape[1]):
            grad, = torch.autograd.grad(z[:, c].sum(), x, retain_graph=c + 1 < z.shape[1])
            rows.append(grad.flatten(1))
    return torch.stack(rows, dim=1)


def factor_gram(jacobian: torch.Tensor) -> torch.Tensor:
    """P_h = sum_k p^(k) p^(k)^T = J J^T, (B, C, C) (Assumption 4.2)."""
    return jacobian @ jacobian.transpose(1, 2)


@dataclass(frozen=True)
class FactorNorms:
    """Per-example ||M_h||_2, ||M_h^+||_2 (inf where J = 0) and the rank of J."""

    norm: torch.Tensor
    pinv_norm: torch.Tensor
    rank: torch.Tensor


@torch.no_grad()
def factor_norms(model: nn.Module, images: torch.Tensor, batch_size: int = 256, rank_tol: float = 1e-5) -> FactorNorms:
    """Singular values below rank_tol * sigma_max count as zero (J comes from float32 arithmetic)."""
    device = next((p.device for p in model.parameters()), images.device)
    norms, pinv, ranks = [], [], []
    for start in range(0, len(images), batch_size):
        s = torch.linalg.svdvals(logit_jacobian(model, images[start:start + batch_size].to(device)).double()).cpu()
        top = s[:, 0]
        nonzero = s > rank_tol * top.unsqueeze(1)
        smallest = s.masked_fill(~nonzero, torch.inf).amin(1)
        norms.append(top)
        pinv.append(torch.where(torch.isfinite(smallest), 1.0 / smallest, torch.full_like(top, torch.inf)))
        ranks.append(nonzero.sum(1))
    if not norms:
        empty = torch.zeros(0, dtype=torch.float64)
        return FactorNorms(empty, empty, torch.zeros(0, dtype=torch.long))
    return FactorNorms(torch.cat(norms), torch.cat(pinv), torch.cat(ranks))
