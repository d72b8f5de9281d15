"""CLDL: conditional label dependency learning (Wang & Liu, "Adversarial Ensemble Training by Jointly Learning
Label Dependencies and Member Models", ICIC 2023, arXiv 2206.14477), following the authors' code (`LSD`,
`LCM_GAL_Trainer`) and the supplement's eq. (18).

The label-confusion model (LCM) is training-only state: it turns a member's hidden representation into soft
labels, and inference never uses it. It therefore belongs to this method object, not to the ensemble: its
parameters are trained by the same optimiser as the members (`parameters()`), saved in every epoch checkpoint
(`state_dict()`), and the runner hands the pretrained LCM to the iGAT phase.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from igat_core.defenses.base import (BaseMethod, LossOutput, PgdSettings, add_input_noise, as_bool, as_choice, as_float,
                                    as_int, check_members)
from igat_core.defenses.diversity import member_input_gradients, member_inputs, pairwise_cosines
from igat_core.ensemble import Ensemble
from igat_core.models import ModelConfig


class LabelConfusionModel(nn.Module):
    """One LCM shared by all members: label embeddings tanh(W e_c), their dot products with a member's hidden
    vector, a C x C linear layer and a softmax give the label-confusion vector LCV(x) in the simplex."""

    def __init__(self, num_classes: int, hidden_dim: int):
        super().__init__()
        self.label_emb = nn.Embedding(num_classes, hidden_dim)
        self.label_fc = nn.Linear(hidden_dim, hidden_dim)
        self.sim_fc = nn.Linear(num_classes, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        labels = torch.tanh(self.label_fc(self.label_emb.weight))
        return torch.softmax(self.sim_fc(hidden @ labels.T), dim=-1)


def soft_labels(lcv: torch.Tensor, y: torch.Tensor, ld_coeff: float) -> torch.Tensor:
    """s = softmax(LCV + ld_coeff * onehot(y)), in float64 as in the authors' code."""
    return torch.softmax(lcv.double() + ld_coeff * F.one_hot(y, lcv.shape[-1]).double(), dim=-1)


def soft_label_kl(soft: torch.Tensor, probs: torch.Tensor, log_offset: float = 1e-6) -> torch.Tensor:
    """Batch mean of KL(s || h) = sum_c s_c (log(s_c + o) - log(h_c + o)) (the classification loss of eq. 18)."""
    kl = (soft * (torch.log(soft + log_offset) - torch.log(probs.to(soft.dtype) + log_offset))).sum(dim=-1)
    return kl.mean()


def label_dependency_diversity(lcvs: torch.Tensor, y: torch.Tensor, offset: float = 1e-30,
                               log_offset: float = 1e-6) -> torch.Tensor:
    """(N, B, C) label-confusion vectors -> log(mean over pairs of exp(JSD_ij) + log_offset).

    JSD_ij of the members' non-true-class entries (C-1, not renormalised, + offset), in bits, where each KL is the
    mean over all B x (C-1) elements (the authors' `KLDivLoss()` with its default reduction).
    """
    n, b, c = lcvs.shape
    keep = ~F.one_hot(y, c).bool()
    rest = lcvs[:, keep].view(n, b, c - 1) + offset

    def kl(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (p * (p.log() - m.log())).mean() / math.log(2.0)

    jsds = []
    for i, j in combinations(range(n), 2):
        mid = (rest[i] + rest[j]) / 2
        jsds.append((kl(rest[i], mid) + kl(rest[j], mid)) / 2)
    return torch.log(torch.stack(jsds).exp().mean() + log_offset)


class CLDL(BaseMethod):
    """CLDL's loss: L = (1/N) sum_i KL(s^i || h^i) - alpha * jsd + beta * coh (eq. 18, as coded).

    s^i = softmax(LCV(z_i) + ld_coeff * onehot(y)), z_i = the pre-activation of member i's hidden head layer.
    jsd: `label_dependency_diversity` of the members' LCVs. coh: |cos| of the input gradients of the members'
    KL losses (double backprop, through the LCM too), summed over pairs and divided by N.
    Parameters (the authors' README command):

    - `alpha` (2.0): weight of the label-dependency (JSD) diversity; `beta` (4.0): weight of the gradient term.
      (The authors' code is authoritative for which weight is which.)
    - `ld_coeff` (4.0): weight of the one-hot label added to the LCV before the softmax.
    - `coh_mean` ("members"): divide the summed pair cosines by N (the code); "pairs": by N(N-1)/2 (eq. 18).
    - `noise_std` (0.045), `noise_prob` (0.5): Gaussian noise on each image with probability 0.5, unclipped
      (the authors' loader); 0 turns it off.
    - `plus_adv` (False): add (1/N) sum_i KL(s^i || h^i) on PGD examples against the averaged ensemble;
      `adv_eps` (8/255), `adv_step` (2/255), `adv_steps` (10), `adv_random_start` (True), `model_mode` ("eval").

    Members need a hidden head layer: `configure_model` gives ResNet-20 a 64-unit `input_vec` layer (the
    authors' head); small_cnn and mlp already have one. The authors use LeakyReLU(0.1) members
    (`ensemble.activation: leaky_relu`). Authors' schedule: Adam (lr 1e-3, wd 1e-4) over members and LCM,
    200 epochs, decays at 100 and 150.
    """

    name = "cldl"
    has_state = True
    attack_params = {"eps": "adv_eps", "step": "adv_step", "steps": "adv_steps", "random_start": "adv_random_start"}

    def __init__(self, alpha: float = 2.0, beta: float = 4.0, ld_coeff: float = 4.0, coh_mean: str = "members",
                 noise_std: float = 0.045, noise_prob: float = 0.5, plus_adv: bool = False,
                 adv_eps: float = 8 / 255, adv_step: float = 2 / 255, adv_steps: int = 10,
                 adv_random_start: bool = True, model_mode: str = "eval", head_hidden: int = 64):
        self.alpha = as_float("alpha", alpha, 0.0)
        self.beta = as_float("beta", beta, 0.0)
        self.ld_coeff = as_float("ld_coeff", ld_coeff, 0.0)
        self.coh_mean = as_choice("coh_mean", coh_mean, ("members", "pairs"))
        self.noise_std = as_float("noise_std", noise_std, 0.0)
        self.noise_prob = as_float("noise_prob", noise_prob, 0.0, 1.0)
        self.plus_adv = as_bool("plus_adv", plus_adv)
        self.adv = PgdSettings.parse(adv_eps, adv_step, adv_steps, adv_random_start, model_mode)
        self.head_hidden = as_int("head_hidden", head_hidden, 1)
        self._lcm: LabelConfusionModel | None = None

    # -- the method-owned label-confusion model ---------------------------------------------------------------------
    def configure_model(self, config: ModelConfig) -> ModelConfig:
        if config.architecture == "resnet20" and not config.head_hidden:
            return dataclasses.replace(config, head_hidden=self.head_hidden)
        return config

    def setup(self, ensemble: Ensemble) -> None:
        config = ensemble.config
        if config.architecture == "resnet20" and not config.head_hidden:
            raise ValueError("CLDL needs a hidden head layer: build the ensemble from CLDL().configure_model(config)"
                             " (the runner does) or set ModelConfig.head_hidden")
        hidden_dim = ensemble.members[0].hidden_dim
        if self._lcm is None:
            self._lcm = LabelConfusionModel(config.num_classes, hidden_dim)
        elif self._lcm.label_emb.weight.shape != (config.num_classes, hidden_dim):
            raise ValueError(f"the label-confusion model is sized {tuple(self._lcm.label_emb.weight.shape)} but "
                             f"the ensemble has {config.num_classes} classes and hidden width {hidden_dim}")
        self._lcm.to(next(ensemble.parameters()).device)

    @property
    def lcm(self) -> LabelConfusionModel | None:
        return self._lcm

    def parameters(self) -> list[nn.Parameter]:
        return [] if self._lcm is None else list(self._lcm.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {} if self._lcm is None else {"lcm": self._lcm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "lcm" not in state:
            return
        num_classes, hidden_dim = state["lcm"]["label_emb.weight"].shape
        if self._lcm is None:
            self._lcm = LabelConfusionModel(int(num_classes), int(hidden_dim))
        self._lcm.load_state_dict(state["lcm"])

    def to(self, device: torch.device | str) -> CLDL:
        if self._lcm is not None:
            self._lcm.to(device)
        return self

    # -- the loss ---------------------------------------------------------------------------------------------------
    def member_terms(self, ensemble: Ensemble, xs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Member i on xs[i] -> (N,) KL(s^i || h^i) and (N, B, C) label-confusion vectors."""
        assert self._lcm is not None
        kls, lcvs = [], []
        for i, member in enumerate(ensemble.members):
            out = member.forward_all(xs[i])
            if out.hidden is None:
                raise ValueError("CLDL needs members with a hidden head layer")
            lcv = self._lcm(out.hidden)
            kls.append(soft_label_kl(soft_labels(lcv, y, self.ld_coeff), torch.softmax(out.logits, dim=-1)))
            lcvs.append(lcv)
        return torch.stack(kls).to(xs.dtype), torch.stack(lcvs)

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        check_members(ensemble, "CLDL")
        if self._lcm is None:
            self.setup(ensemble)
        self.to(x.device)
        n = ensemble.num_members
        xs = member_inputs(add_input_noise(x, self.noise_std, self.noise_prob, generator), n)
        kls, lcvs = self.member_terms(ensemble, xs, y)
        cosines = pairwise_cosines(member_input_gradients(kls, xs)).abs().mean(dim=1)
        coherence = cosines.sum() / n if self.coh_mean == "members" else cosines.mean()
        jsd = label_dependency_diversity(lcvs, y)
        # eq. (18) as coded: mean KL - alpha * log mean exp(JSD) + beta * gradient |cos|
        loss = kls.mean() - self.alpha * jsd + self.beta * coherence
        metrics = {"kl": float(kls.sum().detach()), "jsd": float(jsd.detach()), "coherence": float(coherence.detach())}
        if self.plus_adv:
            x_adv = self.adv.against_average(ensemble, x, y, generator)
            adv_kls, _ = self.member_terms(ensemble, x_adv.unsqueeze(0).expand(n, *x_adv.shape), y)
            loss = loss + adv_kls.mean()
            metrics["adv_kl"] = float(adv_kls.sum().detach())
        return LossOutput(loss, metrics)
