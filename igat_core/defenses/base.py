"""The base-method interface: a method is its ensemble loss L_E (eq. 11), used for pretraining and inside eq. (16).

Besides `loss`, a method may use optional hooks that `train.fit` calls (the defaults do nothing):

- `configure_model(config)`: the member architecture the method needs (SoE's auxiliary head, CLDL's hidden
  head layer); the runner builds the ensemble from it.
- `setup(ensemble)`: build method-owned modules sized to the ensemble (CLDL's label-confusion model); called
  before the optimiser is made, and idempotent.
- `parameters()`: method-owned trainable parameters; the one optimiser updates them with the members.
- `state_dict()` / `load_state_dict()`: method-owned state, saved in every epoch checkpoint and restored on resume.
- `to(device)`: move method-owned modules.
- `start_epoch(ensemble, epoch, epochs, generator, finetuning)`: per-epoch draws and schedules (DVERGE's layer,
  TRS's eps ramp); `generator` is the epoch-seeded one, so a resumed run draws the same values. `finetuning` is
  true when the method is L_E inside iGAT.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from igat_core.attacks import PGD
from igat_core.ensemble import Ensemble
from igat_core.models import ModelConfig


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class MethodHooks(Protocol):
    """The optional training hooks `train.fit` calls on an objective that has them (BaseMethod, IgatObjective)."""

    def setup(self, ensemble: Ensemble) -> None: ...

    def parameters(self) -> list[nn.Parameter]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def to(self, device: torch.device | str) -> Any: ...

    def start_epoch(self, ensemble: Ensemble, epoch: int, epochs: int, generator: torch.Generator | None = None,
                    finetuning: bool = False) -> None: ...


#: iGAT's (alpha, beta) of section 6.1, which every method but SoE keeps
PAPER_IGAT_WEIGHTS: tuple[float, float] = (5.0, 10.0)


class BaseMethod(ABC):
    """One ensemble defense. `loss` must be differentiable w.r.t. every member's parameters."""

    name: str = "base"
    #: iGAT's (alpha, beta) defaults for this method (section 6.1)
    igat_defaults: tuple[float, float] = PAPER_IGAT_WEIGHTS
    #: spec `base.attack` field -> constructor parameter, for methods with a PGD component
    attack_params: dict[str, str] = {}
    #: whether the method owns trained state besides the members (`state_dict`), handed on with the base
    has_state: bool = False

    @abstractmethod
    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        """L_E on a batch of natural images x in [0,1] with labels y."""

    def __call__(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput:
        return self.loss(ensemble, x, y, generator)

    def configure_model(self, config: ModelConfig) -> ModelConfig:
        return config

    def setup(self, ensemble: Ensemble) -> None:
        return None

    def parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def to(self, device: torch.device | str) -> BaseMethod:
        return self

    def start_epoch(self, ensemble: Ensemble, epoch: int, epochs: int, generator: torch.Generator | None = None,
                    finetuning: bool = False) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def check_members(ensemble: Ensemble, method: str, minimum: int = 2) -> None:
    if ensemble.num_members < minimum:
        raise ValueError(f"{method} needs an ensemble of at least {minimum} members, got {ensemble.num_members}")


# -- parameter checks: constructor arguments come from a spec's `base.params`, so each names itself ----------------


def as_float(name: str, value: Any, low: float | None = None, high: float | None = None,
             low_open: bool = False) -> float:
    """A number (or a fraction written as a string, "8/255") within [low, high] (low excluded if low_open)."""
    if isinstance(value, str):
        try:
            value = float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"parameter {name!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter {name!r} must be a number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"parameter {name!r} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"parameter {name!r} must be <= {high}, got {value}")
    return value


def as_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"parameter {name!r} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"parameter {name!r} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"parameter {name!r} must be <= {high}, got {value}")
    return value


def as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")
    return value


def as_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"parameter {name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def as_eps(name: str, value: Any) -> float:
    """A perturbation size in [0, 1] pixel units."""
    return as_float(name, value, 0.0, 1.0)


@dataclass(frozen=True)
class PgdSettings:
    """The L-inf PGD a method trains on (its `adv_*` parameters, or pgd_at's own), validated by name."""

    eps: float
    step: float
    steps: int
    random_start: bool
    model_mode: str = "eval"

    @classmethod
    def parse(cls, eps: Any, step: Any, steps: Any, random_start: Any, model_mode: Any = "eval",
              prefix: str = "adv_") -> PgdSettings:
        return cls(as_eps(f"{prefix}eps", eps), as_eps(f"{prefix}step", step), as_int(f"{prefix}steps", steps, 1),
                   as_bool(f"{prefix}random_start", random_start),
                   as_choice("model_mode", model_mode, ("eval", "train")))

    def attack(self, model: nn.Module, generator: torch.Generator | None) -> PGD:
        return PGD(model, self.eps, self.step, self.steps, self.random_start, model_mode=self.model_mode,
                   generator=generator)

    def against_average(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None) -> torch.Tensor:
        """Adversarial examples against the averaged ensemble."""
        return self.attack(ensemble.with_combiner("average"), generator)(x, y)


def add_input_noise(x: torch.Tensor, std: float, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise N(0, std^2) added to each image with probability `prob`, not clipped (GAL/CLDL loaders)."""
    if std <= 0.0 or prob <= 0.0:
        return x
    noise = _randn(x.shape, generator, x.device, x.dtype)
    chosen = (_rand((x.shape[0],), generator, x.device, x.dtype) < prob).to(x.dtype)
    return x + std * noise * chosen.view(-1, *([1] * (x.dim() - 1)))


def _rand(shape: Iterable[int], generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    if generator is None:
        return torch.rand(tuple(shape), device=device, dtype=dtype)
    return torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def _randn(shape: Iterable[int], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def uniform(shape: Iterable[int], generator: torch.Generator | None, device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) samples drawn from `generator` (on its own device) and moved to `device`."""
    return _rand(shape, generator, device, dtype)


def randint(high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in [0, high)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(high, (1,), generator=generator, device=device).item())


def randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)
