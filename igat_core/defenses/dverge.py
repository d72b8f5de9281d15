"""DVERGE: diversifying vulnerabilities (Yang et al., "DVERGE: Diversifying Vulnerabilities for Enhanced Robust
Generation of Ensembles", NeurIPS 2020), as in the authors' code (supplement section 1.3, eqs. 20-21).

One optimiser instead of one per member. The authors give each member its own SGD optimiser and update the
members one after another, but every distilled batch x'_j is computed (and detached) before any update, and
member i's loss sum_{j != i} CE(h^i(x'_j), y_s) depends on member i's parameters only. The gradient of the summed
loss sum_i loss_i with respect to member i's parameters is therefore exactly d loss_i / d theta_i, and SGD (or
Adam) with the same hyperparameters for every member acts on each parameter separately, so one optimiser over
the summed loss takes exactly the steps of the per-member optimisers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from igat_core.attacks import project_linf
from igat_core.defenses.base import (BaseMethod, LossOutput, PgdSettings, as_bool, as_choice, as_eps, as_float, as_int,
                                    check_members, randint, randperm, uniform)
from igat_core.defenses.diversity import member_cross_entropies
from igat_core.ensemble import Ensemble


def distill_features(member: nn.Module, source: torch.Tensor, target: torch.Tensor, layer: int, eps: float = 0.07,
                     step: float = 0.007, steps: int = 10, momentum: float = 1.0, random_start: bool = False,
                     before_relu: bool = True, model_mode: str = "eval",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (20): argmin over z in the eps-ball around `source` of ||f_l(z) - f_l(target)||^2 (mean squared error).

    Signed steps of size `step` down the MSE gradient; with `momentum` > 0 the per-example gradient is divided
    by its L1 norm and accumulated (MI-FGSM). f_l is `member.get_features(., layer, before_relu)`. The target
    features are computed once (they do not change between steps in eval mode).
    """
    was_training = member.training
    member.train(model_mode == "train")
    try:
        with torch.no_grad():
            wanted = member.get_features(target, layer, before_relu)
        x = source.detach()
        if random_start:
            x = (x + (2 * uniform(x.shape, generator, x.device, x.dtype) - 1) * eps).clamp(0.0, 1.0)
        accumulated = torch.zeros_like(x)
        with torch.enable_grad():
            for _ in range(steps):
                x = x.detach().requires_grad_(True)
                grad, = torch.autograd.grad(F.mse_loss(member.get_features(x, layer, before_relu), wanted), x)
                if momentum > 0:
                    l1 = grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
                    accumulated = momentum * accumulated + grad / l1
                    direction = accumulated
                else:
                    direction = grad
                x = project_linf(x.detach() - step * direction.sign(), source, eps)
    finally:
        member.train(was_training)
    return x.detach()


class DVERGE(BaseMethod):
    """DVERGE's loss: sum_i sum_{j != i} CE(h^i(x'_j), y_s), x'_j = distilled by member j (eqs. 20-21).

    For a batch (x_s, y_s) the targets x_t are the same batch in a random order (the authors zip two
    independently shuffled loaders). x'_j starts at x_s and matches member j's features of x_t at one layer.
    Parameters (authors' defaults):

    - `eps` (0.07), `step` (0.007), `steps` (10): the distillation's L-inf radius, step and step count, in [0,1]
      pixel units; `momentum` (1.0): MI-FGSM momentum with L1-normalised gradients (0 = plain signed steps);
      `random_start` (False).
    - `layer` (0 = random): the feature layer, 1..L with L = the logits (20 for ResNet-20); 0 draws it uniformly
      once per epoch, as the authors do. `before_relu` (True): features before the activation.
    - `pairs` ("all"): member i trains on every other member's distilled batch; "round_robin" (our cheaper
      option, not in the authors' code): member i trains on member (i+1) mod N's batch only.
    - `plus_adv` (False): DVERGE+AT: each member also gets CE on its own PGD example (against itself);
      `adv_eps` (8/255), `adv_step` (2/255), `adv_steps` (10), `adv_random_start` (True).
      `dverge_coeff` (1.0) weights the diversity term.
    - `warmup_epochs` (0): train with the plain summed CE for this many epochs first. The authors start from an
      ensemble trained for 200 epochs with plain CE; with a warm-up both stages share one learning-rate
      schedule. Never applied when DVERGE is L_E inside iGAT.
    - `model_mode` ("eval"): members' mode during distillation and PGD ("train" as in the authors' code).

    Authors' schedule: SGD (lr 0.1, momentum 0.9, wd 1e-4), 200 epochs, decays at 100 and 150, from the baseline.
    """

    name = "dverge"
    attack_params = {"eps": "adv_eps", "step": "adv_step", "steps": "adv_steps", "random_start": "adv_random_start"}

    def __init__(self, eps: float = 0.07, step: float = 0.007, steps: int = 10, momentum: float = 1.0,
                 random_start: bool = False, layer: int = 0, before_relu: bool = True, pairs: str = "all",
                 plus_adv: bool = False, adv_eps: float = 8 / 255, adv_step: float = 2 / 255, adv_steps: int = 10,
                 adv_random_start: bool = True, dverge_coeff: float = 1.0, warmup_epochs: int = 0,
                 model_mode: str = "eval"):
        self.eps = as_eps("eps", eps)
        self.step = as_eps("step", step)
        self.steps = as_int("steps", steps, 1)
        self.momentum = as_float("momentum", momentum, 0.0)
        self.random_start = as_bool("random_start", random_start)
        self.layer = as_int("layer", layer, 0)
        self.before_relu = as_bool("before_relu", before_relu)
        self.pairs = as_choice("pairs", pairs, ("all", "round_robin"))
        self.plus_adv = as_bool("plus_adv", plus_adv)
        self.adv = PgdSettings.parse(adv_eps, adv_step, adv_steps, adv_random_start, model_mode)
        self.model_mode = self.adv.model_mode
        self.dverge_coeff = as_float("dverge_coeff", dverge_coeff, 0.0)
        self.warmup_epochs = as_int("warmup_epochs", warmup_epochs, 0)
        self._epoch_layer: int | None = None
        self._warming_up = False

    def start_epoch(self, ensemble: Ensemble, epoch: int, epochs: int, generator: torch.Generator | None = None,
                    finetuning: bool = False) -> None:
        self._warming_up = not finetuning and epoch <= self.warmup_epochs
        self._epoch_layer = self._draw_layer(ensemble, generator)

    def _draw_layer(self, ensemble: Ensemble, generator: torch.Generator | None) -> int:
        num_layers = ensemble.members[0].num_feature_layers
        if self.layer:
            if self.layer > num_layers:
                raise ValueError(f"parameter 'layer' is {self.layer} but the members have {num_layers} layers")
            return self.layer
        return 1 + randint(num_layers, generator)

    def sources(self, n: int) -> list[list[int]]:
        """For each member i, the members whose distilled batches it trains on."""
        if self.pairs == "round_robin":
            return [[(i + 1) % n] for i in range(n)]
        return [[j for j in range(n) if j != i] for i in range(n)]

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        check_members(ensemble, "DVERGE")
        if self._warming_up:
            ce = member_cross_entropies(ensemble.member_logits(x), y).sum()
            return LossOutput(ce, {"ce": float(ce.detach()), "warmup": 1.0})
        if self._epoch_layer is None:
            self._epoch_layer = self._draw_layer(ensemble, generator)
        layer = self._epoch_layer
        n = ensemble.num_members
        target = x[randperm(x.shape[0], generator, x.device)]
        sources = self.sources(n)
        needed = sorted({j for js in sources for j in js})
        distilled = {j: distill_features(ensemble.members[j], x, target, layer, self.eps, self.step, self.steps,
                                         self.momentum, self.random_start, self.before_relu, self.model_mode,
                                         generator) for j in needed}
        diversity = x.new_zeros(())
        adv = x.new_zeros(())
        for i, member in enumerate(ensemble.members):
            # eq. (21): member i classifies the other members' distilled images as the source labels
            diversity = diversity + sum(F.cross_entropy(member(distilled[j]), y) for j in sources[i])
            if self.plus_adv:
                attack = self.adv.attack(member, generator)
                adv = adv + F.cross_entropy(member(attack(x, y)), y)
        loss = self.dverge_coeff * diversity + adv
        metrics = {"dverge_ce": float(diversity.detach()), "layer": float(layer)}
        if self.plus_adv:
            metrics["adv_ce"] = float(adv.detach())
        return LossOutput(loss, metrics)
