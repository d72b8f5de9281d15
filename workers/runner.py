"""The experiment runner of a Ray Job: ``python -m workers.runner SPEC.yaml --out RUN_DIR``.

The phases are igat_core's Runner (same run directory, same state.json / events.jsonl / metrics.jsonl /
results.json, same resume rules), with two substitutions:

- every training phase (pretrain, igat) is a Ray Train run over ``resources.num_workers`` workers
  (`workers.ray_train.RayTrainFit`), named ``<prefix>-<phase>`` under ``RUN_DIR/ray``;
- ``tune.enabled`` adds the alpha/beta search between pretraining and the iGAT fine-tune: Ray Tune trials, each
  a Train run (Train inside Tune) fine-tuning the base ensemble with one pair, scored every epoch by PGD
  accuracy on the validation split (never the test split). Each trial's epochs land in metrics.jsonl under the
  phase ``tune/alpha=A,beta=B``; results.json ``tune`` lists every trial and the chosen pair, which the igat
  phase then uses. A trial's ``epochs`` are those Tune scored before its decision; ASHA's stop reaches a Train
  run a moment late, so ``trained_epochs`` (its last checkpoint) may be higher.

A relaunched runner (same RUN_DIR) skips finished phases and trials and resumes the others from their last
epoch checkpoint. It connects to ``--address`` (default: RAY_ADDRESS, which a Ray Job sets), or starts a
local Ray when neither is given (never the newest cluster of the machine, which Ray's own default would join).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from igat_core.data import Split, equidistant_indices, load_dataset
from igat_core.ensemble import Ensemble, ensemble_from_checkpoint, load_ensemble
from igat_core.igat import IgatConfig, IgatObjective
from igat_core.rundir import RESULTS_FILE, SCORE_FILE, RunLog, checkpoint_dir, write_json_atomic
from igat_core.runner import Runner, TuneRequest, train_config
from igat_core.runtime import torch_threads
from igat_core.spec import ExperimentSpec, SpecError, TuneSpec, load_spec
from igat_core.train import FitRequest, TrainConfig, TrainingDiverged, last_checkpoint_epoch
from workers.ray_train import RayScaling, RayTrainFit

VAL_METRIC = "val_pgd"
MAX_PHASE_CHARS = 32


@dataclass(frozen=True)
class MetricsWriter:
    """A `Report` that appends each epoch's metrics to RUN_DIR/metrics.jsonl (and an event), as `phase`."""

    run_dir: Path
    phase: str | None = None

    def __call__(self, metrics: dict, _checkpoint_dir: Path) -> None:
        RunLog(self.run_dir).metrics({**metrics, "phase": self.phase} if self.phase else metrics)


@dataclass(frozen=True)
class ValScorer:
    """PGD and natural accuracy (%) of the combined ensemble on fixed validation examples."""

    images: torch.Tensor
    labels: torch.Tensor
    combiner: str
    eps: float
    step: float
    steps: int
    seed: int

    def __call__(self, ensemble: Ensemble, device: torch.device) -> dict[str, float]:
        from igat_core.attacks.pgd import PGD

        was_training = ensemble.training
        model = ensemble.with_combiner(self.combiner).eval()
        x, y = self.images.to(device), self.labels.to(device)
        with torch.no_grad():
            natural = float((model(x).argmax(1) == y).float().mean()) * 100
        attack = PGD(model, self.eps, self.step, self.steps, random_start=True,
                     generator=torch.Generator().manual_seed(self.seed))
        adversarial = attack(x, y)
        with torch.no_grad():
            robust = float((model(adversarial).argmax(1) == y).float().mean()) * 100
        ensemble.train(was_training)
        return {VAL_METRIC: robust, "val_natural": natural}


def trial_key(alpha: float, beta: float) -> str:
    return f"alpha={alpha:g},beta={beta:g}"


def trial_phase(alpha: float, beta: float) -> str:
    phase = f"tune/{trial_key(alpha, beta)}"
    return phase if len(phase) <= MAX_PHASE_CHARS else f"tune/a={alpha:.4g},b={beta:.4g}"[:MAX_PHASE_CHARS]


def trial_checkpoint_dir(run_dir: Path, alpha: float, beta: float) -> Path:
    return checkpoint_dir(run_dir, f"tune/{trial_key(alpha, beta)}")


@dataclass
class TrialContext:
    """Everything a trial needs, put into the object store once (tune.with_parameters)."""

    run_dir: Path
    base: dict[str, Any]
    method: Any
    igat: IgatConfig
    train: Split
    config: TrainConfig
    scaling: RayScaling
    scorer: ValScorer


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: fine-tune the base ensemble with (alpha, beta) as a Train run, reporting the val score."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    alpha, beta = float(config["alpha"]), float(config["beta"])
    phase = trial_phase(alpha, beta)
    trial_dir = trial_checkpoint_dir(context.run_dir, alpha, beta)
    score_file = trial_dir / SCORE_FILE
    if score_file.exists():  # finished by an earlier launch of the runner
        tune.report(json.loads(score_file.read_text()))
        return
    ensemble = ensemble_from_checkpoint(context.base, channels_last=context.scaling.channels_last)
    objective = IgatObjective(copy.deepcopy(context.method), replace(context.igat, alpha=alpha, beta=beta))
    request = FitRequest(phase, ensemble, objective, context.train, context.config, trial_dir, torch.device("cpu"),
                         MetricsWriter(context.run_dir, phase), progress=False, log=RunLog(context.run_dir))
    name = f"{context.scaling.name_prefix}-tune-{trial_key(alpha, beta).replace(',', '-')}"
    RayTrainFit(context.scaling, callbacks=[TuneReportCallback()], scorer=context.scorer, run_name=name)(request)
    with torch_threads(context.scaling.threads):
        final = context.scorer(ensemble, torch.device("cpu"))
    score = {**final, "epochs": last_checkpoint_epoch(trial_dir)}
    write_json_atomic(score_file, score)
    tune.report(score)


def max_concurrent_trials(scaling: RayScaling, cluster: dict[str, float], trials: int) -> int:
    """How many trials fit at once: each holds its workers plus its driver, which scores the trial with the
    workers' threads (at least one CPU)."""
    need = scaling.trial_resources()
    fits = math.floor(cluster.get("CPU", 0.0) / (need["CPU"] + max(1.0, float(scaling.threads))))
    if need["GPU"]:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / need["GPU"]))
    return max(1, min(fits, trials))


@dataclass(frozen=True)
class RayTune:
    """The alpha/beta search on Ray Tune (igat_core.runner's `TunePhase`); returns results.json's `tune` record."""

    scaling: RayScaling

    def __call__(self, request: TuneRequest) -> dict:
        import ray

        spec, t = request.spec, request.spec.tune
        context = trial_context(request, self.scaling)
        space, trials = search_space(t)
        concurrent = max_concurrent_trials(self.scaling, ray.cluster_resources(), trials)
        request.log.event("tune", "message", f"{trials} trial(s), {concurrent} at a time, scored by PGD accuracy on "
                          f"{len(context.scorer.labels)} validation examples", trials=trials, concurrent=concurrent)
        grid = self._tuner(context, space, concurrent, spec).fit()
        records = [trial_record(result, context) for result in grid]
        best = best_trial(records)
        log_trials(request.log, records, best)
        return {
            "mode": t.mode,
            "metric": VAL_METRIC,
            "split": "val",
            "val_examples": len(context.scorer.labels),
            "pgd": {"eps": spec.eval.eps, "step": spec.eval.step, "steps": t.pgd_steps},
            "trials": sorted(records, key=lambda r: (r["alpha"], r["beta"])),
            "chosen": {"alpha": best["alpha"], "beta": best["beta"], VAL_METRIC: best[VAL_METRIC]},
        }

    def _tuner(self, context: TrialContext, space: dict, concurrent: int, spec: ExperimentSpec):
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.basic_variant import BasicVariantGenerator

        t, epochs = spec.tune, context.config.epochs
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                  grace_period=min(t.grace_period, epochs),
                                  reduction_factor=t.reduction_factor) if t.mode == "asha" else None
        return tune.Tuner(
            tune.with_parameters(run_trial, context=context),
            param_space=space,
            tune_config=tune.TuneConfig(metric=VAL_METRIC, mode="max", num_samples=t.num_samples, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(max_concurrent=concurrent,
                                                                         random_state=spec.seed)),
            run_config=tune.RunConfig(name=f"{self.scaling.name_prefix}-tune",
                                      storage_path=str(self.scaling.storage_path.resolve()), verbose=0),
        )


def val_scorer(spec: ExperimentSpec) -> ValScorer:
    """The trials' score: PGD accuracy on `tune.val_examples` equidistant examples of the validation split."""
    d, t = spec.dataset, spec.tune
    val = load_dataset(d.name, "val", val_fraction=d.val_fraction, seed=spec.seed)
    if len(val.labels) == 0:
        raise ValueError("tune.enabled needs a validation split: set dataset.val_fraction > 0")
    idx = equidistant_indices(len(val.labels), t.val_examples)
    return ValScorer(val.images[idx], val.labels[idx], spec.ensemble.combiner, spec.eval.eps, spec.eval.step,
                     t.pgd_steps, spec.seed)


def trial_context(request: TuneRequest, scaling: RayScaling) -> TrialContext:
    """What every trial reads: the base ensemble, the base method with its state, the iGAT settings, the budget."""
    spec, t = request.spec, request.spec.tune
    optim = spec.igat.train if t.epochs is None else spec.igat.train.model_copy(update={"epochs": t.epochs})
    base = load_ensemble(request.base_checkpoint, spec.ensemble.combiner)
    return TrialContext(request.out.resolve(), base.checkpoint_payload(), request.method, request.igat, request.train,
                        train_config(optim, spec, seed_offset=1), scaling, val_scorer(spec))


def search_space(t: TuneSpec) -> tuple[dict, int]:
    """Tune's parameter space for `tune.mode`, and how many trials it makes."""
    from ray import tune

    if t.mode == "grid":
        space = {"alpha": tune.grid_search(list(t.alphas)), "beta": tune.grid_search(list(t.betas))}
        return space, len(t.alphas) * len(t.betas) * t.num_samples
    space = {"alpha": tune.uniform(min(t.alphas), max(t.alphas)), "beta": tune.uniform(min(t.betas), max(t.betas))}
    return space, t.num_samples


def trial_record(result: Any, context: TrialContext) -> dict:
    """One trial of results.json's `tune`: its pair, score, the epochs Tune scored and trained, its status."""
    alpha, beta = float(result.config["alpha"]), float(result.config["beta"])
    metrics = result.metrics or {}
    epochs = int(metrics.get("epochs", metrics.get("epoch", 0)) or 0)
    status = "error" if result.error else ("completed" if epochs >= context.config.epochs else "stopped early")
    return {"alpha": alpha, "beta": beta, "phase": trial_phase(alpha, beta), VAL_METRIC: metrics.get(VAL_METRIC),
            "val_natural": metrics.get("val_natural"), "epochs": epochs,
            "trained_epochs": last_checkpoint_epoch(trial_checkpoint_dir(context.run_dir, alpha, beta)),
            "status": status, **({"error": str(result.error).splitlines()[0][:500]} if result.error else {})}


def best_trial(records: list[dict]) -> dict:
    """The trial with the highest validation PGD accuracy (natural accuracy breaks ties)."""
    scored = [r for r in records if r[VAL_METRIC] is not None]
    if not scored:
        errors = "; ".join(r.get("error", "no score") for r in records)
        raise RuntimeError(f"no alpha/beta trial finished with a score: {errors}")
    return max(scored, key=lambda r: (r[VAL_METRIC], r["val_natural"] or 0.0))


def log_trials(log: RunLog, records: list[dict], best: dict) -> None:
    for r in records:
        score = r[VAL_METRIC] if r[VAL_METRIC] is None else round(r[VAL_METRIC], 2)
        log.event("tune", "trial", f"{trial_key(r['alpha'], r['beta'])}: {VAL_METRIC} {score} ({r['status']})",
                  alpha=r["alpha"], beta=r["beta"], score=r[VAL_METRIC])
    log.event("tune", "chosen", f"chosen alpha={best['alpha']:g}, beta={best['beta']:g} "
              f"({VAL_METRIC} {best[VAL_METRIC]:.2f}%)", alpha=best["alpha"], beta=best["beta"])


def check_resources(spec: ExperimentSpec, cluster: dict[str, float]) -> None:
    """Fail early (naming the field) when the cluster can never hold one training run of this spec."""
    r = spec.resources
    if r.use_gpu and cluster.get("GPU", 0.0) < r.num_workers:
        raise SpecError("resources", [("resources.use_gpu", f"{r.num_workers} GPU worker(s) asked, the Ray "
                                       f"cluster has {cluster.get('GPU', 0.0):g} GPU(s)")])
    if r.requested_cpus > cluster.get("CPU", 0.0):
        raise SpecError("resources", [("resources.num_workers", f"{r.num_workers} worker(s) x {r.worker_cpus:g} "
                                       f"CPU (cpus_per_worker, at least the threads) need more than the cluster's "
                                       f"{cluster.get('CPU', 0.0):g} CPUs")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="experiment spec (YAML)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/<name>)")
    parser.add_argument("--address", default=None, help="Ray cluster (GCS address; default RAY_ADDRESS, else a "
                        "local Ray)")
    parser.add_argument("--name-prefix", default=None, help="prefix of the Ray run names (default: run dir name)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    out = (args.out or Path("runs") / spec.name).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from igat_core.data import DatasetUnavailable
    from igat_core.report import accuracy_table

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    try:
        check_resources(spec, ray.cluster_resources())
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    scaling = RayScaling.from_spec(spec.resources, out / "ray", args.name_prefix or out.name)
    runner = Runner(spec, out, progress=False, fit_fn=RayTrainFit(scaling), tune_fn=RayTune(scaling))
    try:
        results = runner.run()
    except (DatasetUnavailable, TrainingDiverged, ValueError) as exc:
        print(f"igat runner failed: {exc}", file=sys.stderr)
        return 1
    print(accuracy_table(results))
    if results.get("tune"):
        chosen = results["tune"]["chosen"]
        print(f"alpha/beta search: chose alpha={chosen['alpha']:g}, beta={chosen['beta']:g}")
    print(f"results: {out / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
