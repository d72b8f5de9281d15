"""Member architectures by name. Every built model takes images in [0,1] and returns logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

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

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        values = dict(data)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)


def _resnet20(c: ModelConfig) -> nn.Module:
    return ResNet20(c.num_classes, c.in_channels, c.activation)


def _small_cnn(c: ModelConfig) -> nn.Module:
    return SmallCNN(c.num_classes, c.in_channels, c.width, c.activation)


def _mlp(c: ModelConfig) -> nn.Module:
    return MLP(c.num_classes, c.in_channels * c.height * c.width_px, c.width, activation=c.activation)


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "resnet20": _resnet20,
    "small_cnn": _small_cnn,
    "mlp": _mlp,
}


def build_model(config: ModelConfig) -> Normalized:
    if config.architecture not in MODELS:
        raise ValueError(f"unknown architecture {config.architecture!r}; known: {', '.join(sorted(MODELS))}")
    return Normalized(MODELS[config.architecture](config), config.mean, config.std)


__all__ = ["MODELS", "ModelConfig", "Normalized", "build_model"]
