"""Per-channel input normalisation as a layer, so models take images in [0,1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from igat_core.models.features import MemberOutput


class Normalized(nn.Module):
    """Wraps a network `net` so that it sees (x - mean) / std; mean and std are buffers saved with the weights."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward_all(self, x: torch.Tensor) -> MemberOutput:
        return self.net.forward_all(self.normalize(x))

    def get_features(self, x: torch.Tensor, layer: int, before_relu: bool = True) -> torch.Tensor:
        """Output of the `layer`-th layer (1-based, last = logits), pre-activation when `before_relu`."""
        return self.net.get_features(self.normalize(x), layer, before_relu)

    @property
    def num_feature_layers(self) -> int:
        return int(self.net.num_feature_layers)

    @property
    def hidden_dim(self) -> int:
        return int(self.net.hidden_dim)

    @property
    def has_aux_head(self) -> bool:
        return getattr(self.net, "aux", None) is not None
