"""SoE: synergy of experts (Cui et al., "Synergy-of-Experts: Collaborate to Improve Adversarial Robustness",
NeurIPS 2022), following the authors' `model_rectified_v2` / `learn_rectified_v2` (supplement section 1.4)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from igat_core.attacks import PGD
from igat_core.defenses.base import BaseMethod, LossOutput, PgdSettings, as_bool, as_choice, as_float, check_members
from igat_core.ensemble import ROUTED, Ensemble
from igat_core.models import ModelConfig


@dataclasses.dataclass
class SoETerms:
    expert: torch.Tensor
    aux: torch.Tensor
    weights: torch.Tensor


def soe_terms(member_logits: torch.Tensor, member_aux: torch.Tensor, y: torch.Tensor, weighting: str = "predicted",
              sigma: float = 1.0) -> SoETerms:
    """(N, B, C) logits, (N, B) auxiliary logits -> SoE's expert term, auxiliary BCE and routing weights.

    Routing score r_i = max_c h^i_c * sigmoid(g_i), with max_c h^i_c detached where expert i is already right.
    Auxiliary term: mean over experts and examples of BCE(r_i, h^i_y) with the target detached.
    Expert term, `predicted`: mean_x sum_i w_i CE_i with w = softmax_i(r_i) detached (the authors' code);
    `true`: mean_x -sigma log sum_i exp(-CE_i / sigma) (the supplement's eq. 22).
    """
    probs = torch.softmax(member_logits, dim=-1)
    max_prob = probs.amax(dim=-1)
    right = member_logits.argmax(dim=-1) == y.unsqueeze(0)
    score = torch.where(right, max_prob.detach(), max_prob) * torch.sigmoid(member_aux)
    target = probs.gather(2, y.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(2).detach()
    aux = F.binary_cross_entropy(score, target)
    n, b, c = member_logits.shape
    ce = F.cross_entropy(member_logits.reshape(n * b, c), y.repeat(n), reduction="none").view(n, b)
    weights = torch.softmax(score, dim=0).detach()
    if weighting == "predicted":
        expert = (weights * ce).sum(dim=0).mean()
    elif weighting == "true":
        # eq. (22): surrogate loss for vulnerability diversity, a soft minimum of the experts' CE
        expert = (-sigma * torch.logsumexp(-ce / sigma, dim=0)).mean()
    else:
        raise ValueError(f"parameter 'weighting' must be 'predicted' or 'true', got {weighting!r}")
    return SoETerms(expert, aux, weights)


class SoE(BaseMethod):
    """SoE's loss: L_soft(x) + L_soft(x_adv), L_soft = routed expert CE + aux_weight * auxiliary BCE (`soe_terms`).

    Each member carries a one-unit auxiliary head g_i on the input of its last linear layer (`configure_model`
    sets `ModelConfig.aux_head`); at inference the `routed` combiner lets the expert with the highest
    max_c h^i_c(x) * sigmoid(g_i(x)) answer alone, and the average/max combiners work on the same members.
    Parameters (authors' `run.sh` and `main.py` defaults):

    - `aux_weight` (1.0): weight of the auxiliary BCE (`--adaptivetrainlambda`).
    - `weighting` ("predicted"): expert weights softmax(r) by predicted competence; "true" uses the supplement's
      eq. (22) soft minimum with temperature `sigma` (1.0).
    - `plus_adv` (True): add L_soft on PGD examples; `attack_target` ("routed"): PGD against the routed system,
      or "each": PGD against every expert separately, all N*B examples used.
    - `adv_eps` (0.03), `adv_step` (0.01), `adv_steps` (10), `adv_random_start` (False): that PGD in [0,1] pixel
      units; `model_mode` ("eval"): members' mode while it runs ("train" as in the authors' code).

    The clean and adversarial terms are computed in one step with one backward, as in the authors' code (the
    paper's two phases both live in this loss). Authors' schedule: per-expert SGD (lr 0.1, momentum 0.9,
    wd 1e-4), 200 epochs, decays at 50 and 75, unshuffled loader. iGAT defaults: alpha 0.25, beta 0.5.
    """

    name = "soe"
    igat_defaults = (0.25, 0.5)
    attack_params = {"eps": "adv_eps", "step": "adv_step", "steps": "adv_steps", "random_start": "adv_random_start"}

    def __init__(self, aux_weight: float = 1.0, weighting: str = "predicted", sigma: float = 1.0,
                 plus_adv: bool = True, attack_target: str = "routed", adv_eps: float = 0.03, adv_step: float = 0.01,
                 adv_steps: int = 10, adv_random_start: bool = False, model_mode: str = "eval"):
        self.aux_weight = as_float("aux_weight", aux_weight, 0.0)
        self.weighting = as_choice("weighting", weighting, ("predicted", "true"))
        self.sigma = as_float("sigma", sigma, 0.0, low_open=True)
        self.plus_adv = as_bool("plus_adv", plus_adv)
        self.attack_target = as_choice("attack_target", attack_target, ("routed", "each"))
        self.adv = PgdSettings.parse(adv_eps, adv_step, adv_steps, adv_random_start, model_mode)

    def configure_model(self, config: ModelConfig) -> ModelConfig:
        return dataclasses.replace(config, aux_head=True)

    def soft_loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor) -> SoETerms:
        logits, aux = ensemble.member_logits_and_aux(x)
        return soe_terms(logits, aux, y, self.weighting, self.sigma)

    def adversarial(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        def pgd(model: torch.nn.Module) -> PGD:
            return self.adv.attack(model, generator)

        if self.attack_target == "routed":
            return pgd(ensemble.with_combiner(ROUTED))(x, y), y
        return torch.cat([pgd(m)(x, y) for m in ensemble.members]), y.repeat(ensemble.num_members)

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        check_members(ensemble, "SoE")
        if not ensemble.config.aux_head:
            raise ValueError("SoE needs members with an auxiliary head: build the ensemble from "
                             "SoE().configure_model(config) (the runner does)")
        clean = self.soft_loss(ensemble, x, y)
        # SoE (learn_rectified_v2): routed expert CE + lambda * auxiliary BCE
        loss = clean.expert + self.aux_weight * clean.aux
        metrics = {"expert_ce": float(clean.expert.detach()), "aux_bce": float(clean.aux.detach()),
                   "max_weight": float(clean.weights.amax(dim=0).mean())}
        if self.plus_adv:
            x_adv, y_adv = self.adversarial(ensemble, x, y, generator)
            adv = self.soft_loss(ensemble, x_adv, y_adv)
            loss = loss + adv.expert + self.aux_weight * adv.aux
            metrics |= {"adv_expert_ce": float(adv.expert.detach()), "adv_aux_bce": float(adv.aux.detach())}
        return LossOutput(loss, metrics)
