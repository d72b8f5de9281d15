"""GAL: gradient alignment loss (Kariyappa & Qureshi, "Improving Adversarial Robustness of Ensembles with
Diversity Training", 2019), as in the DVERGE port that later work (TRS, CLDL, iGAT) uses."""

from __future__ import annotations

import torch

from igat_core.defenses.base import (BaseMethod, LossOutput, PgdSettings, add_input_noise, as_bool, as_float,
                                    check_members)
from igat_core.defenses.diversity import (logits_on_member_inputs, member_cross_entropies, member_input_gradients,
                                          member_inputs, pairwise_cosines)
from igat_core.ensemble import Ensemble


def gal_coherence(grads: torch.Tensor, log_offset: float = 1e-20) -> torch.Tensor:
    """(N, B, D) input gradients -> batch mean of log(sum_{i<j} exp(cos(g_i, g_j)) + log_offset)."""
    return torch.log(pairwise_cosines(grads).exp().sum(dim=0) + log_offset).mean()


class GAL(BaseMethod):
    """GAL's loss: L = (1/N) sum_i CE(h^i(x), y) + lam * mean_x log sum_{i<j} exp(cos(g_i(x), g_j(x))).

    g_i is the input gradient of member i's batch-mean CE, taken with a graph (double backprop); the cosines
    are signed. Parameters (defaults of the DVERGE port):

    - `lam` (0.5): weight of the gradient-coherence term (the port's `--lambda`).
    - `log_offset` (1e-20): added inside the log.
    - `noise_std` (0.045), `noise_prob` (0.5): the port's loader adds N(0, 0.045^2) noise to each training image
      with probability 0.5, unclipped; here it is applied to the loss's input (0 turns it off).
    - `plus_adv` (False): add (1/N) sum_i CE(h^i(x_adv), y) with x_adv by PGD on the averaged ensemble;
      `adv_eps` (8/255), `adv_step` (2/255), `adv_steps` (10), `adv_random_start` (True), `model_mode` ("eval").

    The authors use LeakyReLU(0.1) members (`ensemble.activation: leaky_relu`), so that input gradients do not
    vanish. The port computes the CE in a second forward pass on the same inputs; one pass gives the same loss
    and gradients (BN running statistics are updated once instead of twice).
    Authors' schedule: Adam (lr 1e-3, wd 1e-4) for 200 epochs, decays at 100 and 150.
    """

    name = "gal"
    attack_params = {"eps": "adv_eps", "step": "adv_step", "steps": "adv_steps", "random_start": "adv_random_start"}

    def __init__(self, lam: float = 0.5, log_offset: float = 1e-20, noise_std: float = 0.045,
                 noise_prob: float = 0.5, plus_adv: bool = False, adv_eps: float = 8 / 255,
                 adv_step: float = 2 / 255, adv_steps: int = 10, adv_random_start: bool = True,
                 model_mode: str = "eval"):
        self.lam = as_float("lam", lam, 0.0)
        self.log_offset = as_float("log_offset", log_offset, 0.0, low_open=True)
        self.noise_std = as_float("noise_std", noise_std, 0.0)
        self.noise_prob = as_float("noise_prob", noise_prob, 0.0, 1.0)
        self.plus_adv = as_bool("plus_adv", plus_adv)
        self.adv = PgdSettings.parse(adv_eps, adv_step, adv_steps, adv_random_start, model_mode)

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        check_members(ensemble, "GAL")
        xs = member_inputs(add_input_noise(x, self.noise_std, self.noise_prob, generator), ensemble.num_members)
        ces = member_cross_entropies(logits_on_member_inputs(ensemble, xs), y)
        coherence = gal_coherence(member_input_gradients(ces, xs), self.log_offset)
        # GAL (DVERGE port): mean CE + lambda * log-sum-exp of pairwise gradient cosines
        loss = ces.mean() + self.lam * coherence
        metrics = {"ce": float(ces.sum().detach()), "coherence": float(coherence.detach())}
        if self.plus_adv:
            x_adv = self.adv.against_average(ensemble, x, y, generator)
            adv_ce = member_cross_entropies(ensemble.member_logits(x_adv), y).mean()
            loss = loss + adv_ce
            metrics["adv_ce"] = float(adv_ce.detach())
        return LossOutput(loss, metrics)
