"""Transfer from an independent ensemble: adversarial examples made with white-box PGD and MIM on a source ensemble
that the evaluated model never saw, then scored on the evaluated model.

A defense can hide its gradients from every white-box attack and still fall to examples made on another model:
a plain transfer attack from an independently trained standard ensemble took the "robust ensemble" of Fort et al.
(2024) from about 75 % to about 14 % (github.com/KellerJordan/Evaluate-CrossMax-Ensemble; attacks.md section 7).
The source is the ensemble of `eval.transfer_from`, under the average combiner. On the source, PGD (no random
start, so an image's example does not depend on its batch) and then MIM run with the evaluation's PGD budget
(`steps` steps of size `step`); an example counts as broken when the evaluated model misclassifies either.

A `TransferSource` makes each image's examples once per eps and remembers them, so every model and combiner
evaluated with it is scored on the very same examples. The evaluated model is only queried for its verdicts, so
the attack is not white-box; it is ensemble-aware (`Attack.ensemble_aware`): one of the attacks the paper's
evaluation lacks. Cost: the source gradients that made an example's adversarial examples (2 x `steps`), however
many models they are scored on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from igat_core.attacks.base import Attack, AttackSettings, ModelMode
from igat_core.attacks.mim import MIM
from igat_core.attacks.pgd import PGD

SOURCE_ATTACKS = ("pgd", "mim")


@dataclass
class TransferSource:
    """The source model and the adversarial examples made on it, per (eps, image bytes): one per SOURCE_ATTACKS."""

    model: nn.Module
    step: float
    steps: int
    mim_decay: float = 1.0
    made: dict[tuple[float, bytes], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def cost_per_example(self) -> int:
        return len(SOURCE_ATTACKS) * self.steps

    def examples(self, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
        """(len(SOURCE_ATTACKS), B, ...) adversarial examples of `images` made on the source at `eps`."""
        keys = [(eps, image.cpu().numpy().tobytes()) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.made]
        if missing:
            index = torch.tensor(missing, device=images.device)
            made = self._make(images[index], labels[index], eps)
            for row, i in enumerate(missing):
                self.made[keys[i]] = made[:, row].cpu()
        return torch.stack([self.made[key] for key in keys], dim=1).to(images.device, images.dtype)

    def _make(self, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
        self.model.to(images.device)
        attacks = (PGD(self.model, eps, self.step, self.steps, random_start=False),
                   MIM(self.model, eps, self.step, self.steps, decay=self.mim_decay))
        return torch.stack([attack(images, labels) for attack in attacks])


class Transfer(Attack):
    """The source's PGD examples, then its MIM examples on those the evaluated model still classifies."""

    name = "transfer"
    white_box = False
    ensemble_aware = True

    @classmethod
    def from_settings(cls, model: nn.Module, eps: float, settings: AttackSettings, generator: torch.Generator,
                      state_dir: str | os.PathLike | None = None) -> Attack:
        raise ValueError("the transfer attack needs a source ensemble: set eval.transfer_from (a checkpoint, or "
                         "'standard' to train one) or pass --transfer-from")

    def __init__(self, model: nn.Module, eps: float, source: TransferSource, model_mode: ModelMode = "eval"):
        super().__init__(model, eps, model_mode)
        self.source = source

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        candidates = self.source.examples(images, labels, self.eps)
        adv = candidates[0].clone()
        for candidate in candidates[1:]:
            robust = self.model(adv).argmax(dim=1) == labels
            adv[robust] = candidate[robust]
        self.report_progress(1.0)
        self.cost = torch.full((len(images),), self.source.cost_per_example, dtype=torch.long)
        return adv
