"""Small members for CPU-scale data: a CNN for 8x8 and 28x28 images, and the MLP of Theorem 4.1."""

from __future__ import annotations

from torch import nn

from igat_core.models.resnet import activation_layer


class SmallCNN(nn.Module):
    """conv-conv-pool-conv-conv-pool, then two linear layers; works for any input of at least 4x4 pixels."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 32, activation: str = "relu"):
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

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """An L-layer perceptron (eqs. 6-8): `depth` hidden layers of `width` units, logits out."""

    def __init__(self, num_classes: int, in_features: int, width: int = 64, depth: int = 2,
                 activation: str = "relu", bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width, bias=bias), activation_layer(activation)]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
