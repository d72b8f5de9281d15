"""What methods read from inside a member besides its logits.

- `get_features(x, layer, before_relu=True)`: the output of the `layer`-th tapped layer (1-based; the last one
  is the logits), before its activation when `before_relu` (DVERGE's feature distillation).
- `forward_all(x) -> MemberOutput`: logits plus, in the same pass, the pre-activation of the head's hidden
  layer (CLDL's label-confusion input) and the auxiliary head's score (SoE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)


@dataclass
class MemberOutput:
    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    aux: torch.Tensor | None = None


def check_layer(layer: int, num_layers: int) -> None:
    if not 1 <= layer <= num_layers:
        raise ValueError(f"feature layer must lie in 1..{num_layers}, got {layer}")


def count_taps(modules: Sequence[nn.Module]) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in modules)


def sequential_features(modules: Sequence[nn.Module], x: torch.Tensor, layer: int,
                        before_relu: bool = True) -> torch.Tensor:
    """Run `modules` in order and return the output of the `layer`-th conv/linear layer.

    With `before_relu=False` the activation that directly follows the tapped layer is applied too.
    """
    check_layer(layer, count_taps(modules))
    seen = 0
    for index, module in enumerate(modules):
        x = module(x)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            seen += 1
            if seen == layer:
                following = modules[index + 1] if index + 1 < len(modules) else None
                if not before_relu and isinstance(following, ACTIVATIONS):
                    x = following(x)
                return x
    raise AssertionError("unreachable: layer was checked")
