"""ADP: adaptive diversity promoting (Pang et al., "Improving Adversarial Robustness via Promoting Ensemble
Diversity", ICML 2019), as in the authors' code and the DVERGE port (supplement section 1.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igat_core.defenses.base import BaseMethod, LossOutput, PgdSettings, as_bool, as_float, check_members
from igat_core.defenses.diversity import member_cross_entropies
from igat_core.ensemble import Ensemble


def ensemble_entropy(member_probs: torch.Tensor, log_offset: float = 1e-20) -> torch.Tensor:
    """(N, B, C) probabilities -> batch mean of H(mean_i h^i) = -sum_c p_c log(p_c + log_offset)."""
    mean = member_probs.mean(dim=0)
    return -(mean * torch.log(mean + log_offset)).sum(dim=-1).mean()


def log_det_diversity(member_probs: torch.Tensor, labels: torch.Tensor, det_offset: float = 1e-6) -> torch.Tensor:
    """(N, B, C) probabilities -> batch mean of log det(H~^T H~ + det_offset I) (ADP's ensemble diversity).

    Columns of H~ are each member's non-true-class probabilities (C-1 entries, not renormalised), L2-normalised.
    The Gram matrix is formed in float64: near-identical members leave eigenvalues of order det_offset, which
    float32 rounding of the unit entries would distort.
    """
    n, b, c = member_probs.shape
    keep = ~F.one_hot(labels, c).bool()
    non_true = member_probs[:, keep].view(n, b, c - 1)
    unit = F.normalize(non_true.double(), dim=-1, eps=1e-20)
    gram = torch.einsum("ibc,jbc->bij", unit, unit)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    return torch.logdet(gram + det_offset * eye).mean().to(member_probs.dtype)


class ADP(BaseMethod):
    """ADP's loss: L = sum_i CE(h^i(x), y) - alpha * H(mean_i h^i(x)) - beta * log det(H~^T H~ + 1e-6 I).

    Parameters (authors' defaults, from the original TF code and the DVERGE port):

    - `alpha` (2.0): weight of the ensemble-entropy regulariser H, in nats.
    - `beta` (0.5): weight of the log-determinant diversity of the members' normalised non-true-class predictions.
    - `log_offset` (1e-20): added inside log p of the entropy; `det_offset` (1e-6): ridge added to the Gram matrix.
    - `plus_adv` (False): ADP+AT as ported by DVERGE: also add sum_i CE(h^i(x_adv), y), where x_adv is an
      L-inf PGD example against the averaged ensemble; the ADP regularisers stay on clean inputs.
    - `adv_eps` (8/255), `adv_step` (2/255), `adv_steps` (10), `adv_random_start` (True): that PGD, in [0,1]
      pixel units; `model_mode` ("eval"): members' mode while it runs ("train" as in the authors' code).

    The CE is summed over members (not averaged), as in the authors' code. The supplement writes the log-det term
    with a plus sign; ADP maximises diversity, so it enters the loss with a minus sign, as in the code.
    Authors' schedule: Adam (lr 1e-3, wd 1e-4) for 200 epochs, decays at 100 and 150 (DVERGE port).
    """

    name = "adp"
    attack_params = {"eps": "adv_eps", "step": "adv_step", "steps": "adv_steps", "random_start": "adv_random_start"}

    def __init__(self, alpha: float = 2.0, beta: float = 0.5, log_offset: float = 1e-20, det_offset: float = 1e-6,
                 plus_adv: bool = False, adv_eps: float = 8 / 255, adv_step: float = 2 / 255, adv_steps: int = 10,
                 adv_random_start: bool = True, model_mode: str = "eval"):
        self.alpha = as_float("alpha", alpha, 0.0)
        self.beta = as_float("beta", beta, 0.0)
        self.log_offset = as_float("log_offset", log_offset, 0.0, low_open=True)
        self.det_offset = as_float("det_offset", det_offset, 0.0, low_open=True)
        self.plus_adv = as_bool("plus_adv", plus_adv)
        self.adv = PgdSettings.parse(adv_eps, adv_step, adv_steps, adv_random_start, model_mode)

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        check_members(ensemble, "ADP")
        logits = ensemble.member_logits(x)
        probs = torch.softmax(logits, dim=-1)
        ce = member_cross_entropies(logits, y).sum()
        entropy = ensemble_entropy(probs, self.log_offset)
        log_det = log_det_diversity(probs, y, self.det_offset)
        # ADP loss (supplement section 1.1): sum CE - alpha H - beta log det
        loss = ce - self.alpha * entropy - self.beta * log_det
        metrics = {"ce": float(ce.detach()), "entropy": float(entropy.detach()), "log_det": float(log_det.detach())}
        if self.plus_adv:
            x_adv = self.adv.against_average(ensemble, x, y, generator)
            adv_ce = member_cross_entropies(ensemble.member_logits(x_adv), y).sum()
            loss = loss + adv_ce
            metrics["adv_ce"] = float(adv_ce.detach())
        return LossOutput(loss, metrics)
