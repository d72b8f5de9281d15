"""Small members for CPU-scale data: a CNN for 8x8 and 28x28 images, and the MLP of Theorem 4.1."""

from __future__ import annotations

import torch
from torch import nn

from igat_core.models.features import MemberOutput, count_taps, sequential_features
from igat_core.models.resnet import activation_layer


class SmallCNN(nn.Module):
    """conv-conv-pool-conv-conv-pool, then two linear layers; works for any input of at least 4x4 pixels.

    Feature layers (`get_features`): the four convs, the hidden linear layer, the logits. `aux_head` adds SoE's
    one-unit head `aux` on the input of the last linear layer.
    """

    def __init__(self, num_classes: int, in_channels: int, width: int = 32, activation: str = "relu",
                 aux_head: bool = False):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), activation_layer(activation),
            nn.Conv2d(w, w, 3, padding=1), activation_layer(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), activation_layer(activation),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), activation_layer(activation),
            nn.AdaptiveMaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * w, 4 * w), activation_layer(activation), nn.Linear(4 * w, num_classes)
        )
        self.hidden_dim = 4 * w
        self.aux: nn.Linear | None = nn.Linear(4 * w, 1) if aux_head else None

    @property
    def num_feature_layers(self) -> int:
        return count_taps([*self.features, *self.classifier])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward_all(self, x: torch.Tensor) -> MemberOutput:
        flat, hidden_layer, act, out = self.classifier
        hidden = hidden_layer(flat(self.features(x)))
        rep = act(hidden)
        aux = self.aux(rep).squeeze(1) if self.aux is not None else None
        return MemberOutput(out(rep), hidden, aux)

    def get_features(self, x: torch.Tensor, layer: int, before_relu: bool = True) -> torch.Tensor:
        return sequential_features([*self.features, *self.classifier], x, layer, before_relu)


class MLP(nn.Module):
    """An L-layer perceptron (eqs. 6-8): `depth` hidden layers of `width` units, logits out.

    Feature layers: the hidden linear layers, then the logits. `aux_head` adds SoE's head on the last hidden layer.
    """

    def __init__(self, num_classes: int, in_features: int, width: int = 64, depth: int = 2,
                 activation: str = "relu", bias: bool = True, aux_head: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width, bias=bias), activation_layer(activation)]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes, bias=bias))
        self.layers = nn.Sequential(*layers)
        self.hidden_dim = fan_in
        self.aux: nn.Linear | None = nn.Linear(fan_in, 1) if aux_head else None

    @property
    def num_feature_layers(self) -> int:
        return count_taps(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_all(self, x: torch.Tensor) -> MemberOutput:
        *body, out = self.layers
        hidden = None
        for module in body:
            x = module(x)
            if isinstance(module, nn.Linear):
                hidden = x
        aux = self.aux(x).squeeze(1) if self.aux is not None else None
        return MemberOutput(out(x), hidden, aux)

    def get_features(self, x: torch.Tensor, layer: int, before_relu: bool = True) -> torch.Tensor:
        return sequential_features(list(self.layers), x, layer, before_relu)
