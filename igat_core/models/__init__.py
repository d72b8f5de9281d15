"""Member architectures by name. Every built model takes images in [0,1] and returns logits.

Beyond `forward`, every member offers `get_features(x, layer, before_relu)`, `num_feature_layers` and
`forward_all(x) -> MemberOutput` (logits, hidden pre-activation, auxiliary score); see `models.features`.
`head_hidden` (ResNet-20 only: a hidden linear layer before `fc`, CLDL's head) and `aux_head` (SoE's one-unit
head) add modules under new names only, so checkpoints saved without them keep loading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from igat_core.models.features import MemberOutput
from igat_core.models.normalize import Normalized
from igat_core.models.resnet import ResNet20
from igat_core.models.small import MLP, SmallCNN


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    num_classes: int
    in_channels: int
    height: int
    width_px: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    activation: str = "relu"
    width: int = 32
    head_hidden: int = 0
    aux_head: bool = False
    dataset: str | None = None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        values = dict(data)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)


def _resnet20(c: ModelConfig) -> nn.Module:
    return ResNet20(c.num_classes, c.in_channels, c.activation, head_hidden=c.head_hidden, aux_head=c.aux_head)


def _no_head_hidden(c: ModelConfig) -> None:
    if c.head_hidden:
        raise ValueError(f"head_hidden applies to resnet20 only; {c.architecture} already has a hidden head layer")


def _small_cnn(c: ModelConfig) -> nn.Module:
    _no_head_hidden(c)
    return SmallCNN(c.num_classes, c.in_channels, c.width, c.activation, aux_head=c.aux_head)


def _mlp(c: ModelConfig) -> nn.Module:
    _no_head_hidden(c)
    return MLP(c.num_classes, c.in_channels * c.height * c.width_px, c.width, activation=c.activation,
               aux_head=c.aux_head)


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "resnet20": _resnet20,
    "small_cnn": _small_cnn,
    "mlp": _mlp,
}


def build_model(config: ModelConfig) -> Normalized:
    if config.architecture not in MODELS:
        raise ValueError(f"unknown architecture {config.architecture!r}; known: {', '.join(sorted(MODELS))}")
    return Normalized(MODELS[config.architecture](config), config.mean, config.std)


__all__ = ["MODELS", "MemberOutput", "ModelConfig", "Normalized", "build_model"]
