"""AutoAttack 'standard' under L-infinity (Croce & Hein, ICML 2020), assembled from torchattacks' components.

torchattacks' own `AutoAttack` class builds its components with 10 iterations; here every component is built with
the reference settings, explicitly.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, ModelMode, Standing
from igat_core.ensemble import atomic_torch_save

COMPONENTS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
STATE_VERSION = 1


def _copy_of(mask: torch.Tensor) -> Standing:
    return lambda: mask.clone()


def model_fingerprint(model: nn.Module) -> str:
    """A digest of a model's weights, buffers and (for an ensemble) combiner."""
    digest = hashlib.sha256(str(getattr(model, "combiner", "")).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class AutoAttack(Attack):
    """The standard cascade APGD-CE -> APGD-T -> FAB-T -> Square; each component attacks only the examples that
    every earlier one left correctly classified, and an example counts as broken by its first success, judged
    on the component's output as torchattacks returns it (every component projects onto the eps-ball and [0,1]
    itself; `raw_bounds` shows it if one does not).

    Reference settings: APGD-CE with 100 iterations and 1 restart; APGD-T (targeted DLR) and FAB-T with 100
    iterations over the 9 most likely wrong classes (num_classes - 1 when fewer); Square with 5,000 queries,
    p_init 0.8, the margin loss and no rescaled schedule. APGD-T needs at least 4 classes and is skipped below.

    With `state_dir`, the per-example outcome of every finished component is written to a file named by a digest
    of the model's weights, the images, the labels and these settings, so a rerun after an interruption resumes
    after the last finished component. `cost` is an upper bound per example: the gradient steps (APGD, FAB) and
    queries (Square) of every component the example entered.
    """

    name = "autoattack"

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        return cls(model, eps, steps=settings.autoattack_steps, square_queries=settings.square_queries,
                   seed=settings.seed, state_dir=state_dir)

    def __init__(self, model: nn.Module, eps: float = 8 / 255, steps: int = 100, square_queries: int = 5000,
                 components: Sequence[str] = COMPONENTS, seed: int = 0, state_dir: str | os.PathLike | None = None,
                 model_mode: ModelMode = "eval"):
        super().__init__(model, eps, model_mode)
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown or not components:
            raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {list(components)}")
        if steps < 1 or square_queries < 1:
            raise ValueError("steps and square_queries must be >= 1")
        self.steps, self.square_queries = steps, square_queries
        self.components = tuple(c for c in COMPONENTS if c in components)
        self.seed = seed
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._fingerprint: str | None = None

    def _targets(self, num_classes: int) -> int:
        return min(9, num_classes - 1)

    def _build(self, component: str, num_classes: int):
        import torchattacks

        n_classes = self._targets(num_classes) + 1
        if component == "apgd-ce":
            attack = torchattacks.APGD(self.model, norm="Linf", eps=self.eps, steps=self.steps, n_restarts=1,
                                       seed=self.seed, loss="ce", eot_iter=1, rho=0.75)
        elif component == "apgd-t":
            attack = torchattacks.APGDT(self.model, norm="Linf", eps=self.eps, steps=self.steps, n_restarts=1,
                                        seed=self.seed, eot_iter=1, rho=0.75, n_classes=n_classes)
        elif component == "fab-t":
            attack = torchattacks.FAB(self.model, norm="Linf", eps=self.eps, steps=self.steps, n_restarts=1,
                                      alpha_max=0.1, eta=1.05, beta=0.9, seed=self.seed, multi_targeted=True,
                                      n_classes=n_classes)
        else:
            attack = torchattacks.Square(self.model, norm="Linf", eps=self.eps, n_queries=self.square_queries,
                                         n_restarts=1, p_init=0.8, loss="margin", resc_schedule=False,
                                         seed=self.seed)
        if self.model_mode == "train":
            attack.set_model_training_mode(model_training=True, batchnorm_training=True)
        return attack

    def component_cost(self, component: str, num_classes: int) -> int:
        if component == "apgd-ce":
            return self.steps
        if component in ("apgd-t", "fab-t"):
            return self._targets(num_classes) * self.steps
        return self.square_queries

    def run_component(self, component: str, images: torch.Tensor, labels: torch.Tensor,
                      num_classes: int) -> torch.Tensor:
        """One component on a batch, with the global random state left as it was (torchattacks reseeds it)."""
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._build(component, num_classes)(images, labels).detach()

    @contextmanager
    def _forwards_reported(self, part: int, expected: int, robust: torch.Tensor) -> Iterator[None]:
        """Report component `part` by its forward passes, `expected` of them (at most 99% until it returns); the
        examples standing meanwhile are those the earlier components left (`robust`)."""
        if not self.reporting:
            yield
            return
        calls = 0

        def counted(*_: object) -> None:
            nonlocal calls
            calls += 1
            self.report_progress((part + min(calls / expected, 0.99)) / len(self.components), _copy_of(robust))

        handle = self.model.register_forward_hook(counted)
        try:
            yield
        finally:
            handle.remove()

    def _key(self, images: torch.Tensor, labels: torch.Tensor) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        digest = hashlib.sha256(self._fingerprint.encode())
        settings = (STATE_VERSION, self.eps, self.steps, self.square_queries, self.components, self.seed,
                    self.model_mode)
        digest.update(repr(settings).encode())
        digest.update(images.detach().cpu().contiguous().numpy().tobytes())
        digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]

    def _load(self, path: Path | None, n: int) -> dict | None:
        if path is None or not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state if len(state["robust"]) == n else None

    def _save(self, path: Path | None, state: dict) -> None:
        if path is None:
            return
        atomic_torch_save(state, path)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(images)
        path = self.state_dir / f"{self._key(images, labels)}.pt" if self.state_dir is not None else None
        with torch.no_grad():
            outputs = self.model(images)
        num_classes = outputs.shape[1]
        state = self._load(path, n) or {"done": [], "robust": (outputs.argmax(1) == labels).cpu(),
                                        "broken": torch.zeros(0, dtype=torch.long),
                                        "adv": torch.zeros(0, *images.shape[1:]),
                                        "cost": torch.zeros(n, dtype=torch.long)}
        for part, component in enumerate(self.components):
            if component in state["done"]:
                continue
            index = state["robust"].nonzero().squeeze(1)
            if index.numel() and not (component == "apgd-t" and num_classes < 4):
                x, y = images[index.to(images.device)], labels[index.to(images.device)]
                with self._forwards_reported(part, self.component_cost(component, num_classes), state["robust"]):
                    adv = self.run_component(component, x, y, num_classes)
                with torch.no_grad():
                    fooled = (self.model(adv).argmax(1) != y).cpu()
                state["robust"][index[fooled]] = False
                state["broken"] = torch.cat([state["broken"], index[fooled]])
                state["adv"] = torch.cat([state["adv"], adv[fooled.to(adv.device)].cpu()])
                state["cost"][index] += self.component_cost(component, num_classes)
            state["done"].append(component)
            self._save(path, state)
            self.report_progress((part + 1) / len(self.components), _copy_of(state["robust"]))
        self.cost = state["cost"].clone()
        adv = images.clone()
        if len(state["broken"]):
            adv[state["broken"].to(images.device)] = state["adv"].to(images.device, images.dtype)
        return adv
