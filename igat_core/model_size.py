"""How large a member is, computed from its shape without building it (no torch): the exact parameter count and
the activations of one forward pass, derived from the architectures in `igat_core.models` (tests/test_model_size.py
checks both against built models).

`activations` counts the output elements of every leaf module `forward` runs (convolutions, BatchNorm, activation
functions, pooling, flatten, linear layers), per example. It is what one forward pass keeps for its backward pass
in the order of magnitude; the peak of a training step is a small multiple of it (gradients, the optimiser).
"""

from __future__ import annotations

from dataclasses import dataclass

#: CLDL's hidden head layer on ResNet-20 when `base.params.head_hidden` is not given (igat_core.defenses.cldl).
CLDL_HEAD_HIDDEN = 64
#: ResNet-20's stages: (planes, stride of the first block), three basic blocks each (igat_core.models.resnet).
RESNET_STAGES = ((16, 1), (32, 2), (64, 2))
RESNET_BLOCKS = 3
RESNET_STEM = 16
MLP_DEPTH = 2


@dataclass(frozen=True)
class MemberShape:
    """What a member's size depends on: the fields of ModelConfig that shape its modules."""

    architecture: str
    in_channels: int
    height: int
    width_px: int
    num_classes: int
    width: int = 32
    head_hidden: int = 0
    aux_head: bool = False


@dataclass(frozen=True)
class MemberSize:
    parameters: int
    activations: int


def _conv(c_in: int, c_out: int, kernel: int, bias: bool) -> int:
    return c_in * c_out * kernel * kernel + (c_out if bias else 0)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _small_cnn(m: MemberShape) -> MemberSize:
    w, pixels = m.width, m.height * m.width_px
    pooled = (m.height // 2) * (m.width_px // 2)
    parameters = (_conv(m.in_channels, w, 3, True) + _conv(w, w, 3, True) + _conv(w, 2 * w, 3, True)
                  + _conv(2 * w, 2 * w, 3, True) + _linear(8 * w, 4 * w) + _linear(4 * w, m.num_classes))
    # conv, relu, conv, relu at full size; max-pool; conv, relu, conv, relu at half size; 2x2 pool, flatten;
    # linear, relu; logits
    activations = 4 * w * pixels + w * pooled + 4 * 2 * w * pooled + 2 * 8 * w + 2 * 4 * w + m.num_classes
    return MemberSize(parameters + (_linear(4 * w, 1) if m.aux_head else 0), activations)


def _mlp(m: MemberShape) -> MemberSize:
    fan_in, parameters, activations = m.in_channels * m.height * m.width_px, 0, 0
    activations += fan_in  # flatten
    for _ in range(MLP_DEPTH):
        parameters += _linear(fan_in, m.width)
        activations += 2 * m.width  # linear, activation
        fan_in = m.width
    parameters += _linear(fan_in, m.num_classes) + (_linear(fan_in, 1) if m.aux_head else 0)
    return MemberSize(parameters, activations + m.num_classes)


def _strided(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _resnet20(m: MemberShape) -> MemberSize:
    h, w, planes_in = m.height, m.width_px, RESNET_STEM
    parameters = _conv(m.in_channels, planes_in, 3, False) + 2 * planes_in
    activations = 3 * planes_in * h * w  # conv, bn, activation
    for planes, stride in RESNET_STAGES:
        for block in range(RESNET_BLOCKS):
            s = stride if block == 0 else 1
            h, w = _strided(h, s), _strided(w, s)
            projected = s != 1 or planes_in != planes
            parameters += _conv(planes_in, planes, 3, False) + _conv(planes, planes, 3, False) + 4 * planes
            parameters += (_conv(planes_in, planes, 1, False) + 2 * planes) if projected else 0
            # conv, bn, activation, conv, bn, [projection conv, bn], activation after the residual add
            activations += (8 if projected else 6) * planes * h * w
            planes_in = planes
    activations += planes_in  # global average pool
    hidden = planes_in
    if m.head_hidden > 0:
        parameters += _linear(planes_in, m.head_hidden)
        activations += 2 * m.head_hidden  # linear, activation
        hidden = m.head_hidden
    parameters += _linear(hidden, m.num_classes) + (_linear(hidden, 1) if m.aux_head else 0)
    return MemberSize(parameters, activations + m.num_classes + (1 if m.aux_head else 0))  # forward runs aux too


SIZES = {"small_cnn": _small_cnn, "mlp": _mlp, "resnet20": _resnet20}


def member_size(shape: MemberShape) -> MemberSize:
    if shape.architecture not in SIZES:
        raise ValueError(f"unknown architecture {shape.architecture!r}; known: {', '.join(sorted(SIZES))}")
    return SIZES[shape.architecture](shape)
