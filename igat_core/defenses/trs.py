"""TRS: transferability-reduced smooth ensemble (Yang et al., "TRS: Transferability Reduced Ensemble via Promoting
Gradient Diversity and Model Smoothness", NeurIPS 2021), as in the authors' code, for any number of members."""

from __future__ import annotations

import torch

from igat_core.attacks import project_linf
from igat_core.defenses.base import (BaseMethod, LossOutput, as_bool, as_choice, as_eps, as_float, as_int,
                                     check_members, uniform)
from igat_core.defenses.diversity import (logits_on_member_inputs, member_cross_entropies, member_input_gradients,
                                          member_inputs, pairwise_cosines)
from igat_core.ensemble import Ensemble


def mean_abs_cosine(grads: torch.Tensor) -> torch.Tensor:
    """(N, B, D) input gradients -> mean over member pairs and examples of |cos(g_i, g_j)|."""
    return pairwise_cosines(grads).abs().mean()


def gradient_magnitude(grads: torch.Tensor) -> torch.Tensor:
    """(N, B, D) input gradients -> (1/N) sum_i 2 * mean over examples of ||g_i||^2 (the authors' `Magnitude`)."""
    return (2.0 * grads.pow(2).sum(dim=-1).mean(dim=-1)).mean()


def member_gradients(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
                     create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Member inputs xs (N, B, ...), per-member batch-mean CE (N,), and their input gradients (N, B, D)."""
    xs = member_inputs(x, ensemble.num_members)
    ces = member_cross_entropies(logits_on_member_inputs(ensemble, xs), y)
    return xs, ces, member_input_gradients(ces, xs, create_graph)


def gradient_norm_pgd(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 6,
                      step: float | None = None, accumulate: bool = True, model_mode: str = "eval",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """TRS's attack: L-inf PGD that maximises the members' mean gradient magnitude, from a uniform random start.

    Step size eps/3 unless given. With `accumulate` the signed step follows the running sum of the gradients
    (the authors' code never zeroes it between steps).
    """
    step = eps / 3 if step is None else step
    was_training = ensemble.training
    ensemble.train(model_mode == "train")
    try:
        adv = (x + (2 * uniform(x.shape, generator, x.device, x.dtype) - 1) * eps).clamp(0.0, 1.0).detach()
        total = torch.zeros_like(x)
        with torch.enable_grad():
            for _ in range(steps):
                xs, _, grads = member_gradients(ensemble, adv, y)
                grad = torch.autograd.grad(gradient_magnitude(grads), xs)[0].sum(dim=0)
                total = total + grad if accumulate else grad
                adv = project_linf(adv + step * total.sign(), x, eps).detach()
    finally:
        ensemble.train(was_training)
    return adv


class TRS(BaseMethod):
    """TRS's loss: L = sum_i CE(h^i(x), y) + lambda_a * L_cos + lambda_b * L_smooth.

    L_cos is the mean over member pairs and examples of |cos(g_i, g_j)| at the clean batch, g_i the input
    gradient of member i's batch-mean CE (double backprop). L_smooth = (1/N) sum_i 2 * mean ||g_i||^2 at x~, where
    x~ is the batch with its second half replaced by `gradient_norm_pgd` examples (with `plus_adv`, the real TRS),
    else the clean batch. Because g_i comes from the batch-mean CE, ||g_i||^2 carries a 1/B^2 factor, as in the
    authors' code: lambda_b is tied to the batch size (128 in the paper).

    Parameters (the authors' CIFAR-10 values, TRS issue #1):

    - `lambda_a` (40.0): weight of L_cos (the code's scale * coeff = 5 * 8).
    - `lambda_b` (2.5): weight of L_smooth (the code's scale * lamda = 5 * 0.5).
    - `plus_adv` (True): evaluate L_smooth on the half-clean, half-adversarial batch.
    - `init_eps` (0.01), `adv_eps` (0.03): the attack's L-inf radius rises linearly per epoch from init_eps
      (first epoch) towards adv_eps, eps_t = init_eps + (adv_eps - init_eps) * (t - 1) / epochs; adv_eps when
      TRS is L_E inside iGAT.
    - `adv_steps` (6) steps of eps_t/3, `accumulate_grad` (True): the authors' never-zeroed gradient.
    - `model_mode` ("eval"): members' mode during the attack ("train" as in the authors' code).

    The authors' code hard-codes three members (three cosines / 3, smoothness / 3); here the means run over all
    N(N-1)/2 pairs and N members. Authors' schedule: Adam (lr 1e-3, wd 1e-4), 120 epochs, x0.1 every 40.
    """

    name = "trs"
    attack_params = {"eps": "adv_eps", "steps": "adv_steps"}

    def __init__(self, lambda_a: float = 40.0, lambda_b: float = 2.5, plus_adv: bool = True, init_eps: float = 0.01,
                 adv_eps: float = 0.03, adv_steps: int = 6, accumulate_grad: bool = True, model_mode: str = "eval"):
        self.lambda_a = as_float("lambda_a", lambda_a, 0.0)
        self.lambda_b = as_float("lambda_b", lambda_b, 0.0)
        self.plus_adv = as_bool("plus_adv", plus_adv)
        self.init_eps = as_eps("init_eps", init_eps)
        self.adv_eps = as_eps("adv_eps", adv_eps)
        self.adv_steps = as_int("adv_steps", adv_steps, 1)
        self.accumulate_grad = as_bool("accumulate_grad", accumulate_grad)
        self.model_mode = as_choice("model_mode", model_mode, ("eval", "train"))
        self._eps = self.init_eps

    def start_epoch(self, ensemble: Ensemble, epoch: int, epochs: int, generator: torch.Generator | None = None,
                    finetuning: bool = False) -> None:
        if finetuning:
            self._eps = self.adv_eps
        else:
            self._eps = self.init_eps + (self.adv_eps - self.init_eps) * (epoch - 1) / max(epochs, 1)

    @property
    def current_eps(self) -> float:
        return self._eps

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        check_members(ensemble, "TRS")
        _, ces, grads = member_gradients(ensemble, x, y)
        cosine = mean_abs_cosine(grads)
        smooth_x = x
        if self.plus_adv:
            half = x.shape[0] // 2
            adv = gradient_norm_pgd(ensemble, x[half:], y[half:], self._eps, self.adv_steps,
                                    accumulate=self.accumulate_grad, model_mode=self.model_mode, generator=generator)
            smooth_x = torch.cat([x[:half], adv])
        smooth_grads = grads if smooth_x is x else member_gradients(ensemble, smooth_x, y)[2]
        smooth = gradient_magnitude(smooth_grads)
        ce = ces.sum()
        # TRS loss (authors' trainer, any N): sum CE + lambda_a L_cos + lambda_b L_smooth
        loss = ce + self.lambda_a * cosine + self.lambda_b * smooth
        return LossOutput(loss, {"ce": float(ce.detach()), "cosine": float(cosine.detach()),
                                 "smoothness": float(smooth.detach()), "eps": self._eps})
