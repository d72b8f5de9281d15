"""A Monte-Carlo check of Theorem 4.1 with real MLPs.

Train `members` MLPs that differ only in their seed (optionally PGD adversarially trained, as the theorem's
setting has adversarial defense applied), estimate lambda~, B_0 and B over the pair split, build A(D), and
measure on it the empirical 0-1 risk of single members and of average and max ensembles of every two distinct
members (both sides of eq. 5), the measured p and the rates of Assumption 4.4.

When the J that A(D) needs is not above 2 (Definition 4.3 unmet), Assumption 4.4's score bar 0.5 + 1/J is
evaluated at `fallback_j` instead (4: inside the range [2.56, 7.14] that the toy example admits).
Tiny MLPs train fastest on one thread, so `threads` (default 1) caps torch's intra-op threads during the run.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from igat_core.data import Split, load_dataset
from igat_core.defenses import PgdAT, Plain
from igat_core.ensemble import Ensemble
from igat_core.models import ModelConfig
from igat_core.runtime import torch_threads
from igat_core.theory.acceptance import PairScores, assumption_rates, empirical_risks
from igat_core.theory.curvature import CurvatureConfig, default_radius
from igat_core.theory.pairs import AmbiguousPairs, BSource, ConstantEstimates, ambiguous_pairs, estimate_constants
from igat_core.theory.serialize import jsonable
from igat_core.train import TrainConfig, fit


@dataclass(frozen=True)
class MonteCarloConfig:
    dataset: str = "digits"
    pair_split: str = "test"
    members: int = 8
    width: int = 32
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    adversarial: bool = True
    eps: float = 0.1
    step: float = 0.025
    steps: int = 5
    pairs: int = 100
    j: float | None = None
    xi: float = 0.0
    b_source: BSource = "pinv"
    quantile: float = 1.0
    curvature_radius: float | None = None
    fallback_j: float = 4.0
    train_limit: int | None = None
    threads: int | None = 1
    seed: int = 0


@dataclass
class MonteCarloResult:
    config: MonteCarloConfig
    estimates: ConstantEstimates
    pairs: AmbiguousPairs
    labels: torch.Tensor
    natural_accuracy: list[float]
    risks: dict
    rates: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return jsonable({
            "config": asdict(self.config),
            "natural_accuracy": self.natural_accuracy,
            "estimates": self.estimates.to_dict(),
            "ambiguous_pairs": self.pairs.to_dict(self.labels),
            "risks": self.risks,
            "assumption_4_4": self.rates,
            "seconds": self.seconds,
        })

    def table(self) -> str:
        """Markdown: both sides of eq. (5), the measured p against the threshold, and the assumption rates."""
        r, a, c = self.risks, self.rates, self.estimates.constants
        fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"  # noqa: E731
        lines = [
            f"Theorem 4.1 on {self.config.dataset} ({self.config.pair_split} split): "
            f"{self.config.members} MLP members, "
            f"{'PGD-trained' if self.config.adversarial else 'plainly trained'}, |A(D)| = {len(self.pairs)}",
            "",
            "| quantity | value |",
            "|---|---:|",
            f"| lambda~ (eq. 2, radius {self.estimates.radius:.4g}) | {c.curvature:.4g} |",
            f"| B_0 = sup ‖M_h‖₂ | {c.factor_norm:.4g} |",
            f"| B = sup ‖M_h⁺‖₂ | {c.pinv_norm:.4g} |",
            f"| B used ({c.b_source}), xi | {c.b:.4g}, {c.xi:.4g} |",
            f"| J that A(D) needs | {self.pairs.j:.4g} |",
            f"| radius of eq. 10 | {self.pairs.radius:.4g} |",
            f"| Definition 4.3 met (J > 2) | {'yes' if self.pairs.definition_met else 'no'} |",
            f"| risk, single member | {fmt(r['single'])} |",
            f"| risk, average of two | {fmt(r['average'])} |",
            f"| risk, max of two | {fmt(r['max'])} |",
            f"| eq. 5 holds (average / max) | {r['inequality_holds']['average']} / {r['inequality_holds']['max']} |",
        ]
        if a:
            lines += [
                f"| measured p (correct on a pair example) | {fmt(a['p'])} |",
                f"| threshold p* | {a['theory']['threshold']:.12f} |",
                f"| r1(p), r2(p) | {fmt(a['theory']['single'])}, {fmt(a['theory']['ensemble'])} |",
                f"| J of Assumption 4.4's score bar, 0.5 + 1/J | {a['J']:.4g}, {a['score_bar']:.4f} |",
                f"| Assumption 4.4 part 1 rate | {fmt(a['part1'])} |",
                f"| part 1 given correct | {fmt(a['part1_given_correct'])} |",
                f"| Assumption 4.4 part 2 rate (literal; Table 7 form) | {fmt(a['part2'])}; "
                f"{fmt(a['part2_relaxed'])} |",
                f"| Assumption 4.4 acceptance rate (literal; Table 7 form) | {fmt(a['acceptance'])}; "
                f"{fmt(a['acceptance_relaxed'])} |",
                f"| both examples of a pair correct (excluded by Lemma 2.1) | {fmt(a['both_examples_correct'])} |",
                f"| members with p > p* | {a['members_above_threshold']} of {self.config.members} |",
            ]
        lines += [
            f"| natural accuracy per member (%) | {', '.join(f'{v:.1f}' for v in self.natural_accuracy)} |",
            f"| seconds (train, measure, total) | {self.seconds.get('train', 0):.1f}, "
            f"{self.seconds.get('measure', 0):.1f}, {self.seconds.get('total', 0):.1f} |",
        ]
        return "\n".join(lines)

    def pairs_table(self, limit: int = 20) -> str:
        rows = self.pairs.rows(self.labels)[:limit]
        lines = ["| i | j | y_i | y_j | distance |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['i']} | {p['j']} | {p['y_i']} | {p['y_j']} | {p['distance']:.4f} |" for p in rows]
        return "\n".join(lines)


def mlp_config(dataset: str, width: int) -> ModelConfig:
    from igat_core.data import dataset_info

    info = dataset_info(dataset)
    return ModelConfig("mlp", info.num_classes, info.channels, info.height, info.width, info.mean, info.std,
                       "relu", width)


def train_members(config: MonteCarloConfig, train: Split) -> list[nn.Module]:
    """`members` one-member ensembles trained independently, seeds seed, seed + 1, ..."""
    models: list[nn.Module] = []
    objective = PgdAT(config.eps, config.step, config.steps) if config.adversarial else Plain()
    milestones = (max(1, int(config.epochs * 0.75)),)
    with tempfile.TemporaryDirectory(prefix="igat-montecarlo-") as tmp:
        for m in range(config.members):
            torch.manual_seed(config.seed * 1009 + m)
            ensemble = Ensemble(mlp_config(config.dataset, config.width), members=1)
            train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                                       milestones=milestones, seed=config.seed * 1009 + m)
            fit(ensemble, objective, train, train_config, Path(tmp) / f"member{m}", progress=False)
            models.append(ensemble.members[0].eval())
    return models


@torch.no_grad()
def member_probs(models: list[nn.Module], images: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.softmax(m(images), dim=-1) for m in models]).double()


def run_montecarlo(config: MonteCarloConfig, models: list[nn.Module] | None = None) -> MonteCarloResult:
    """Train (unless `models` are given), build A(D) on `pair_split` and measure eq. (5) and Assumption 4.4."""
    if not config.threads:
        return _run(config, models)
    with torch_threads(min(config.threads, torch.get_num_threads())):
        return _run(config, models)


def _run(config: MonteCarloConfig, models: list[nn.Module] | None) -> MonteCarloResult:
    started = time.perf_counter()
    if models is None:
        models = train_members(config, load_dataset(config.dataset, "train", seed=config.seed,
                                                    train_limit=config.train_limit))
    trained = time.perf_counter()
    data = load_dataset(config.dataset, config.pair_split, seed=config.seed)
    images, labels = data.images, data.labels
    radius = config.curvature_radius or default_radius(config.eps, images)
    estimates = estimate_constants(models, images, labels, data.info.num_classes,
                                   curvature=CurvatureConfig(radius, seed=config.seed), quantile=config.quantile,
                                   xi=config.xi, b_source=config.b_source)
    pairs = ambiguous_pairs(images, labels, estimates.constants, j=config.j, min_pairs=config.pairs)
    probs = member_probs(models, images)
    accuracy = [100.0 * float((p.argmax(-1) == labels).double().mean()) for p in probs]
    scores = PairScores(probs[:, pairs.first], probs[:, pairs.second], labels[pairs.first], labels[pairs.second])
    if len(pairs) == 0:
        risks: dict = {"single": None, "average": None, "max": None,
                       "inequality_holds": {"average": False, "max": False}}
        rates: dict = {}
    else:
        risks = empirical_risks(scores)
        rates = assumption_rates(scores, pairs.j if pairs.definition_met else config.fallback_j)
    done = time.perf_counter()
    seconds = {"train": trained - started, "measure": done - trained, "total": done - started}
    return MonteCarloResult(config, estimates, pairs, labels, accuracy, risks, rates, seconds)


def write_montecarlo(result: MonteCarloResult, out: Path) -> list[Path]:
    """montecarlo.json, montecarlo.md (the table and the nearest pairs) and risks.png under `out`."""
    import json

    from igat_core.theory.plots import plot_risks

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "montecarlo.json", out / "montecarlo.md"
    json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    md_path.write_text("# Monte-Carlo check of Theorem 4.1\n\n" + result.table() + "\n\n## Ambiguous pairs "
                       f"(first 20 of {len(result.pairs)})\n\n" + result.pairs_table() + "\n")
    measured = None
    if result.rates:
        measured = {"p": result.rates["p"], "single": result.risks["single"], "average": result.risks["average"],
                    "max": result.risks["max"]}
    png = plot_risks(out / "risks.png", measured)
    return [json_path, md_path, png]
