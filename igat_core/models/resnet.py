"""CIFAR ResNet-20: 3 stages x 3 basic blocks, widths 16/32/64, 1x1 conv + BN projection shortcuts.

Parameter names follow the ResNet used by the DVERGE and iGAT releases, so their checkpoints load as they are.
Optional head modules exist only when asked for, so they leave those names alone: `input_vec`, a hidden linear
layer between pooling and `fc` (CLDL's head), and `aux`, a one-unit head on the input of `fc` (SoE).

`get_features` numbers the layers as DVERGE does: 1 is the stem (conv1+bn1); each block then contributes its
first conv+BN and its output after the residual add; the last layer is the logits (20 for ResNet-20).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from igat_core.models.features import MemberOutput, check_layer


def activation_layer(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.1)
    raise ValueError(f"activation must be 'relu' or 'leaky_relu', got {kind!r}")


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = activation_layer(activation)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(out + shortcut)


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, activation: str = "relu", blocks: int = 3,
                 head_hidden: int = 0, aux_head: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = activation_layer(activation)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = [BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, activation)
                      for i in range(blocks)]
            stages.append(nn.Sequential(*layers))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.input_vec: nn.Linear | None = nn.Linear(64, head_hidden) if head_hidden > 0 else None
        self.hidden_dim = head_hidden if head_hidden > 0 else 64
        self.fc = nn.Linear(self.hidden_dim, num_classes)
        self.aux: nn.Linear | None = nn.Linear(self.hidden_dim, 1) if aux_head else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def blocks(self) -> list[BasicBlock]:
        return [*self.layer1, *self.layer2, *self.layer3]

    @property
    def num_feature_layers(self) -> int:
        return 2 * len(self.blocks) + 2

    def forward_all(self, x: torch.Tensor) -> MemberOutput:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        rep = self.pool(x).flatten(1)
        hidden = None
        if self.input_vec is not None:
            hidden = self.input_vec(rep)
            rep = self.act(hidden)
        aux = self.aux(rep).squeeze(1) if self.aux is not None else None
        return MemberOutput(self.fc(rep), hidden, aux)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x).logits

    def get_features(self, x: torch.Tensor, layer: int, before_relu: bool = True) -> torch.Tensor:
        check_layer(layer, self.num_feature_layers)
        pre = self.bn1(self.conv1(x))
        if layer == 1:
            return pre if before_relu else self.act(pre)
        out, index = self.act(pre), 1
        for block in self.blocks:
            mid = block.bn1(block.conv1(out))
            index += 1
            if index == layer:
                return mid if before_relu else block.act(mid)
            shortcut = out if block.downsample is None else block.downsample(out)
            pre = block.bn2(block.conv2(block.act(mid))) + shortcut
            index += 1
            if index == layer:
                return pre if before_relu else block.act(pre)
            out = block.act(pre)
        return self.forward_head(out)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        rep = self.pool(x).flatten(1)
        if self.input_vec is not None:
            rep = self.act(self.input_vec(rep))
        return self.fc(rep)
