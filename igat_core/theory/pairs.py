"""Ambiguous pairs (Definition 4.3) and the constants of Assumption 4.2 that bound their distance.

A pair ((x_i, y_i), (x_j, y_j)) with y_i != y_j is ambiguous when
||x_i - x_j||_2 <= 1 / (J B sqrt(C (lambda~^2 - xi)))  (eq. 10), with J > 2 adjusted so that A(D) is not empty.
Without a given J, the largest J that admits at least `min_pairs` pairs is chosen: J = 1 / (d_k K) with d_k the
k-th smallest cross-class distance and K = B sqrt(C (lambda~^2 - xi)) (Lemma 2.1, eq. 24). When that J is not
above 2, Definition 4.3 cannot be met with this many pairs; the pairs are still listed and `definition_met`
says so (it is also False for an empty A(D)). Distances are L2 in the models' input space (images in [0, 1], flattened).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from igat_core.theory.curvature import CurvatureConfig, pointwise_curvature, summarize
from igat_core.theory.factor import factor_norms

BSource = Literal["pinv", "factor"]
MIN_J = 2.0


@dataclass(frozen=True)
class PairConstants:
    """lambda~ (Assumption 4.2 part 1), B_0 = sup ||M_h||_2, B = sup ||M_h^+||_2 (part 2), C and xi.

    `b_source` picks which bound plays B in eq. (10): "pinv" (the proof, supplement eq. 38) or "factor" (the
    main text's literal ||M_h||_2 <= B)."""

    curvature: float
    factor_norm: float
    pinv_norm: float
    num_classes: int
    xi: float = 0.0
    b_source: BSource = "pinv"

    def __post_init__(self) -> None:
        if self.xi > self.curvature ** 2:
            raise ValueError(f"xi must be <= lambda~^2 = {self.curvature ** 2:.6g}, got {self.xi}")
        if self.b_source not in ("pinv", "factor"):
            raise ValueError(f"b_source must be 'pinv' or 'factor', got {self.b_source!r}")

    @property
    def b(self) -> float:
        return self.pinv_norm if self.b_source == "pinv" else self.factor_norm

    def lipschitz(self) -> float:
        """K = B sqrt(C (lambda~^2 - xi)): Lemma 2.1's bound on |h_c(x) - h_c(z)| / ||x - z||_2 (eq. 24)."""
        return self.b * math.sqrt(self.num_classes * (self.curvature ** 2 - self.xi))

    def radius(self, j: float) -> float:
        """The largest distance of an ambiguous pair for control variable J (eq. 10)."""
        k = self.lipschitz()
        return math.inf if k == 0 else 1.0 / (j * k)

    def j_for_radius(self, radius: float) -> float:
        k = self.lipschitz()
        return math.inf if k == 0 or radius == 0 else 1.0 / (radius * k)

    def to_dict(self) -> dict:
        return {"curvature": self.curvature, "factor_norm": self.factor_norm, "pinv_norm": self.pinv_norm,
                "num_classes": self.num_classes, "xi": self.xi, "b_source": self.b_source, "b": self.b,
                "lipschitz": self.lipschitz()}


@dataclass
class ConstantEstimates:
    """Per-model curvature and factor-norm summaries behind PairConstants (max over models)."""

    constants: PairConstants
    curvature: list[dict[str, float]]
    factor_norm: list[dict[str, float]]
    pinv_norm: list[dict[str, float]]
    full_rank: list[float]
    radius: float

    def to_dict(self) -> dict:
        return {"constants": self.constants.to_dict(), "curvature_radius": self.radius,
                "per_model": {"curvature": self.curvature, "factor_norm": self.factor_norm,
                              "pinv_norm": self.pinv_norm, "full_rank_rate": self.full_rank}}


def estimate_constants(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                       curvature: CurvatureConfig, quantile: float = 1.0, xi: float = 0.0,
                       b_source: BSource = "pinv") -> ConstantEstimates:
    """lambda~, B_0 and B as the `quantile` over data points and the max over models (the family H)."""
    curv, fac, pinv, full = [], [], [], []
    for model in models:
        model.eval()
        curv.append(summarize(pointwise_curvature(model, images, labels, curvature), quantile))
        norms = factor_norms(model, images)
        fac.append(summarize(norms.norm, quantile))
        pinv.append(summarize(norms.pinv_norm, quantile))
        full.append(float((norms.rank == num_classes).double().mean()))
    constants = PairConstants(max(c["tilde"] for c in curv), max(f["tilde"] for f in fac),
                              max(p["tilde"] for p in pinv), num_classes, xi, b_source)
    return ConstantEstimates(constants, curv, fac, pinv, full, curvature.radius)


@dataclass
class AmbiguousPairs:
    """A(D): index pairs into the dataset, their distances, J, the radius of eq. (10) and whether J > 2."""

    first: torch.Tensor
    second: torch.Tensor
    distances: torch.Tensor
    j: float
    radius: float
    definition_met: bool

    def __len__(self) -> int:
        return int(self.first.numel())

    def rows(self, labels: torch.Tensor) -> list[dict]:
        return [{"i": int(i), "j": int(k), "y_i": int(labels[i]), "y_j": int(labels[k]), "distance": float(d)}
                for i, k, d in zip(self.first, self.second, self.distances, strict=True)]

    def to_dict(self, labels: torch.Tensor) -> dict:
        return {"J": self.j, "radius": self.radius, "definition_met": self.definition_met, "count": len(self),
                "pairs": self.rows(labels)}


def nearest_cross_class_pairs(images: torch.Tensor, labels: torch.Tensor, k: int | None = None,
                              max_distance: float | None = None, chunk: int = 1024
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, distance) with i < j, y_i != y_j, ascending by distance: the k nearest, or all within
    max_distance (at most k when both are given)."""
    flat = images.flatten(1).double()
    n = len(labels)
    keep_i, keep_j, keep_d = [torch.zeros(0, dtype=torch.long)] * 2 + [torch.zeros(0, dtype=torch.float64)]
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        dist = torch.cdist(flat[rows], flat)
        invalid = (labels[rows, None] == labels[None, :]) | (rows[:, None] >= torch.arange(n)[None, :])
        dist = dist.masked_fill(invalid, math.inf)
        if max_distance is not None:
            dist = dist.masked_fill(dist > max_distance, math.inf)
        finite = int(torch.isfinite(dist).sum())
        take = finite if k is None else min(k, finite)
        if take == 0:
            continue
        values, flat_idx = dist.flatten().topk(take, largest=False)
        keep_i = torch.cat([keep_i, rows[flat_idx // n]])
        keep_j = torch.cat([keep_j, flat_idx % n])
        keep_d = torch.cat([keep_d, values])
        if k is not None and len(keep_d) > k:
            order = keep_d.argsort(stable=True)[:k]
            keep_i, keep_j, keep_d = keep_i[order], keep_j[order], keep_d[order]
    order = keep_d.argsort(stable=True)
    return keep_i[order], keep_j[order], keep_d[order]


def ambiguous_pairs(images: torch.Tensor, labels: torch.Tensor, constants: PairConstants, *, j: float | None = None,
                    min_pairs: int = 1, max_pairs: int | None = None) -> AmbiguousPairs:
    """A(D) for a given J, or for the largest J that leaves at least `min_pairs` pairs (Definition 4.3)."""
    if j is not None:
        radius = constants.radius(j)
        i, k, d = nearest_cross_class_pairs(images, labels, k=max_pairs, max_distance=radius)
        return AmbiguousPairs(i, k, d, j, radius, j > MIN_J and len(d) > 0)
    if min_pairs < 1:
        raise ValueError(f"min_pairs must be >= 1, got {min_pairs}")
    i, k, d = nearest_cross_class_pairs(images, labels, k=min_pairs)
    if len(d) == 0:
        return AmbiguousPairs(i, k, d, math.nan, 0.0, False)
    radius = float(d[-1])
    chosen = constants.j_for_radius(radius)
    return AmbiguousPairs(i, k, d, chosen, radius, chosen > MIN_J)
