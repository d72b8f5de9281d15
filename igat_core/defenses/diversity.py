"""Pieces shared by the gradient-diversity methods (GAL, TRS, CLDL): input gradients and their pairwise cosines.

Each member sees its own copy of the input (`member_inputs`), so one backward pass of the summed member losses
gives every member's input gradient d loss_i / d x at once.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F

from igat_core.ensemble import Ensemble


def member_inputs(x: torch.Tensor, members: int) -> torch.Tensor:
    """(B, ...) -> (N, B, ...) detached copies of x, one per member, that require grad."""
    return x.detach().unsqueeze(0).repeat(members, *([1] * x.dim())).requires_grad_(True)


def logits_on_member_inputs(ensemble: Ensemble, xs: torch.Tensor) -> torch.Tensor:
    """(N, B, ...) inputs, member i on xs[i] -> (N, B, C) logits."""
    return torch.stack([member(xs[i]) for i, member in enumerate(ensemble.members)])


def member_input_gradients(member_losses: torch.Tensor, xs: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """(N,) losses, loss_i a function of xs[i] only -> (N, B, D) flattened gradients d loss_i / d xs[i]."""
    grads, = torch.autograd.grad(member_losses.sum(), xs, create_graph=create_graph)
    return grads.flatten(2)


def pairwise_cosines(grads: torch.Tensor) -> torch.Tensor:
    """(N, B, D) -> (P, B) cosine similarity of every member pair i < j, per example (P = N(N-1)/2)."""
    n = grads.shape[0]
    return torch.stack([F.cosine_similarity(grads[i], grads[j], dim=1) for i, j in combinations(range(n), 2)])


def member_cross_entropies(member_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, B, C) logits -> (N,) batch-mean cross-entropy of each member."""
    n, b, c = member_logits.shape
    return F.cross_entropy(member_logits.reshape(n * b, c), y.repeat(n), reduction="none").view(n, b).mean(dim=1)
