"""Per-channel input normalisation as a layer, so models take images in [0,1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from igat_core.models.features import MemberOutput


class Normalized(nn.Module):
    """Wraps a network `net` so that it sees (x - mean) / std; mean and std are buffers saved with the weights.

    `use_channels_last(True)` stores a convolutional net's weights channels_last and hands it its (normalised)
    input channels_last too; the values are the same, only the memory layout (and the kernels torch picks) change.
    """

    channels_last: bool = False

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        normalized = (x - self.mean) / self.std
        if self.channels_last and normalized.dim() == 4:
            return normalized.contiguous(memory_format=torch.channels_last)
        return normalized

    def use_channels_last(self, enabled: bool) -> None:
        """Keep the net's weights and inputs channels_last (`enabled`, for nets with 2-d convolutions) or NCHW."""
        enabled = enabled and any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        self.net.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = enabled

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
