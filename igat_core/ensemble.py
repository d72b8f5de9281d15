"""Ensemble: N members of one architecture and a combiner over their softmax probabilities.

The ensemble's output is log(c(h^1, ..., h^N)) clamped at 1e-40, where c is the average or the element-wise max
of the members' softmax outputs (section 5). CE on it is the negative log of the combined true-class score, and it
is what attacks (and torchattacks / AutoAttack) are given as "logits".

Members with SoE's auxiliary head (`ModelConfig.aux_head`) also allow the `routed` combiner, SoE's own inference:
per example the member with the highest routing score max_c h^i_c(x) * sigmoid(g^i(x)) answers alone, and the
output is that member's log-softmax. The average and max combiners ignore the auxiliary head.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from igat_core.models import MemberOutput, ModelConfig, Normalized, build_model
from igat_core.rundir import replacing
from igat_core.runtime import channels_last_default

Combiner = Literal["average", "max"]
COMBINERS: tuple[str, ...] = ("average", "max")
ROUTED = "routed"
LOG_PROB_FLOOR = math.log(1e-40)
CHECKPOINT_FORMAT = "igat-ensemble/1"


def combine_log_probs(member_logits: torch.Tensor, combiner: str) -> torch.Tensor:
    """(N, B, C) member logits -> (B, C) log of the combined probabilities, clamped at log(1e-40)."""
    log_probs = torch.log_softmax(member_logits, dim=-1)
    if combiner == "average":
        combined = torch.logsumexp(log_probs, dim=0) - math.log(member_logits.shape[0])
    elif combiner == "max":
        combined = log_probs.max(dim=0).values
    else:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    return combined.clamp_min(LOG_PROB_FLOOR)


def combine_probs(member_probs: torch.Tensor, combiner: str) -> torch.Tensor:
    """(N, B, C) member probabilities -> (B, C) combined scores h = c(h^1, ..., h^N) (not renormalised for max)."""
    if combiner == "average":
        return member_probs.mean(dim=0)
    if combiner == "max":
        return member_probs.max(dim=0).values
    raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")


def routing_scores(member_logits: torch.Tensor, member_aux: torch.Tensor) -> torch.Tensor:
    """(N, B, C) logits, (N, B) auxiliary logits -> (N, B) SoE routing scores max_c softmax(z)_c * sigmoid(g)."""
    return torch.softmax(member_logits, dim=-1).amax(dim=-1) * torch.sigmoid(member_aux)


def routed_log_probs(member_logits: torch.Tensor, member_aux: torch.Tensor) -> torch.Tensor:
    """(B, C) log-softmax of the member with the highest routing score per example (SoE inference)."""
    chosen = routing_scores(member_logits, member_aux).argmax(dim=0).detach()
    picked = member_logits.gather(0, chosen.view(1, -1, 1).expand(1, *member_logits.shape[1:])).squeeze(0)
    return torch.log_softmax(picked, dim=-1).clamp_min(LOG_PROB_FLOOR)


def check_combiner(combiner: str, config: ModelConfig) -> None:
    if combiner == ROUTED and not config.aux_head:
        raise ValueError("the 'routed' combiner needs members with an auxiliary head (SoE: ModelConfig.aux_head)")
    if combiner not in COMBINERS and combiner != ROUTED:
        raise ValueError(f"combiner must be one of {COMBINERS} (or {ROUTED!r} for SoE members), got {combiner!r}")


class Ensemble(nn.Module):
    """`channels_last` (default: `runtime.channels_last_default()`) keeps convolutional members channels_last."""

    _kept: KeptLogits | None = None

    def __init__(self, config: ModelConfig, members: int, combiner: str = "average",
                 channels_last: bool | None = None):
        super().__init__()
        if members < 1:
            raise ValueError("an ensemble needs at least one member")
        check_combiner(combiner, config)
        self.config = config
        self.combiner = combiner
        self.members = nn.ModuleList(build_model(config) for _ in range(members))
        self.use_channels_last(channels_last_default() if channels_last is None else channels_last)

    def use_channels_last(self, enabled: bool) -> None:
        """Every member's weights and inputs channels_last or NCHW (`Normalized.use_channels_last`)."""
        for member in self.members:
            member.use_channels_last(enabled)  # type: ignore[operator]

    @property
    def num_members(self) -> int:
        return len(self.members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, B, C) logits of every member."""
        logits = torch.stack([m(x) for m in self.members])
        self._keep(x, logits)
        return logits

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, B, C) softmax probabilities of every member."""
        return torch.softmax(self.member_logits(x), dim=-1)

    def member_outputs(self, x: torch.Tensor) -> list[MemberOutput]:
        """Every member's logits, hidden pre-activation and auxiliary score from one forward pass each."""
        outputs = [m.forward_all(x) for m in self.members]
        if self._kept is not None:
            self._keep(x, torch.stack([o.logits for o in outputs]))
        return outputs

    @property
    def batch_independent(self) -> bool:
        """Whether each member's output on an example is independent of the rest of its batch: no module in train
        mode uses batch statistics (BatchNorm) or draws a mask per pass (Dropout)."""
        batch_dependent = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
        return not any(m.training and isinstance(m, batch_dependent) for m in self.members.modules())

    @contextmanager
    def keeping_logits_of(self, x: torch.Tensor) -> Iterator[KeptLogits]:
        """Inside the block, the first grad-enabled member pass over exactly `x` (the tensor object) keeps its
        (N, B, C) logits, with the members' train/eval modes of that pass, in the yielded `KeptLogits`."""
        self._kept = KeptLogits(x)
        try:
            yield self._kept
        finally:
            self._kept = None

    def _keep(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        kept = self._kept
        if kept is not None and kept.x is x and kept.logits is None and torch.is_grad_enabled():
            kept.logits, kept.modes = logits, member_modes(self)

    def member_logits_and_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, B, C) logits and (N, B) auxiliary-head logits (SoE members only)."""
        outputs = self.member_outputs(x)
        if any(o.aux is None for o in outputs):
            raise ValueError("these members have no auxiliary head (SoE: ModelConfig.aux_head)")
        return torch.stack([o.logits for o in outputs]), torch.stack([o.aux for o in outputs])  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combined_and_members(x)[0]

    def combined_and_members(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ensemble's output and the (N, B, C) member logits it combines, from one pass of each member."""
        if self.combiner == ROUTED:
            logits, aux = self.member_logits_and_aux(x)
            return routed_log_probs(logits, aux), logits
        logits = self.member_logits(x)
        return combine_log_probs(logits, self.combiner), logits

    def with_combiner(self, combiner: str) -> Ensemble:
        """A view sharing these members that combines with `combiner`."""
        check_combiner(combiner, self.config)
        view = Ensemble.__new__(Ensemble)
        nn.Module.__init__(view)
        view.config, view.combiner, view.members = self.config, combiner, self.members
        view.train(self.training)
        return view

    def describe(self) -> dict:
        return {"model": self.config.to_dict(), "members": self.num_members, "combiner": self.combiner}

    def checkpoint_payload(self) -> dict:
        """Self-describing checkpoint: architecture, classes, normalisation, members, combiner and weights."""
        return {"format": CHECKPOINT_FORMAT, **self.describe(), "state_dicts": [m.state_dict() for m in self.members]}

    def save(self, path: str | os.PathLike, method: MethodState | None = None) -> None:
        """The checkpoint, with the training method's own state (CLDL's label-confusion model) when given."""
        payload = self.checkpoint_payload()
        if method is not None:
            payload["method"] = {"name": method.name, "state": method.state}
        atomic_torch_save(payload, path)


def member_modes(ensemble: Ensemble) -> tuple[bool, ...]:
    """The train/eval flag of every module of the members."""
    return tuple(m.training for m in ensemble.members.modules())


@dataclass
class KeptLogits:
    """The members' logits on the batch `x` from a pass made for another loss (`Ensemble.keeping_logits_of`)."""

    x: torch.Tensor
    logits: torch.Tensor | None = None
    modes: tuple[bool, ...] = ()

    def reusable_by(self, ensemble: Ensemble) -> torch.Tensor | None:
        """The kept logits when `ensemble`'s members would now compute the same values for `x` in any batch:
        kept, in the same modes, and batch-independent (`Ensemble.batch_independent`); else None."""
        if self.logits is None or not ensemble.batch_independent or self.modes != member_modes(ensemble):
            return None
        return self.logits


@dataclass(frozen=True)
class MethodState:
    """The state a base method owns besides the members (`BaseMethod.state_dict()`), named by its method."""

    name: str
    state: dict


def method_state(payload: Mapping) -> MethodState | None:
    """The method state stored in an ensemble checkpoint payload, if any."""
    stored = payload.get("method")
    return None if not stored else MethodState(str(stored["name"]), dict(stored["state"]))


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    with replacing(Path(path)) as tmp:
        torch.save(obj, tmp)


def ensemble_from_checkpoint(payload: Mapping, combiner: str | None = None,
                             channels_last: bool | None = None) -> Ensemble:
    if not isinstance(payload, Mapping):
        raise ValueError(f"not an igat ensemble checkpoint (it holds a {type(payload).__name__})")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not an igat ensemble checkpoint (format {payload.get('format')!r})")
    config = ModelConfig.from_dict(payload["model"])
    ensemble = Ensemble(config, payload["members"], combiner or payload["combiner"], channels_last)
    for member, state in zip(ensemble.members, payload["state_dicts"], strict=True):
        member.load_state_dict(state)
    return ensemble


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file and the reason."""


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    kind = "" if type(exc) is ValueError else f"{type(exc).__name__}: "
    text = f"{kind}{lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def checkpoint_errors(path: str | os.PathLike) -> Iterator[None]:
    """Any failure inside the block (a missing key, a shape that does not fit) becomes a CheckpointError on `path`."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a malformed payload raises is the same user error
        raise CheckpointError(f"checkpoint {path} is not a usable ensemble checkpoint ({_first_line(exc)})") from None


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """`torch.load(path, weights_only=True)`, or a CheckpointError naming the file and why it cannot be read."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file (junk, truncated, a refused pickle) is the same
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None


def load_ensemble(path: str | os.PathLike, combiner: str = "average",
                  map_location: str | torch.device = "cpu") -> Ensemble:
    """Load a saved ensemble in eval mode: images in [0,1] in, the ensemble's log-probabilities out."""
    payload = read_checkpoint(path, map_location)
    with checkpoint_errors(path):
        return ensemble_from_checkpoint(payload, combiner).eval()  # type: ignore[arg-type]


def import_dverge_checkpoint(path: str | os.PathLike, config: ModelConfig, combiner: str = "average") -> Ensemble:
    """Import a DVERGE/iGAT release checkpoint {"model_0": state_dict, ...}; the member count comes from the file."""
    payload = read_checkpoint(path)
    with checkpoint_errors(path):
        if not isinstance(payload, Mapping):
            raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not an ensemble")
        keys = sorted((k for k in payload if k.startswith("model_")), key=lambda k: int(k.split("_")[1]))
        if not keys:
            raise CheckpointError(f"checkpoint {path} has no 'model_<i>' entries; keys are {sorted(payload)[:5]}")
        ensemble = Ensemble(config, len(keys), combiner)
        for member, key in zip(ensemble.members, keys):
            state = {k.removeprefix("model."): v for k, v in payload[key].items() if not k.startswith("normalizer.")}
            net: Normalized = member  # type: ignore[assignment]
            net.net.load_state_dict(state)
        return ensemble.eval()
