"""A whole experiment in-process: pretrain (or load) the base ensemble, iGAT fine-tune, the equal-budget control
fine-tunes, evaluate, report.

The run directory holds spec.yaml, checkpoints/{base,igat,continued,global_at}/, metrics.jsonl, events.jsonl,
results.json, report.md. Every phase is resumable: rerunning on the same directory skips finished phases and
continues the interrupted one from its last epoch checkpoint. Each fine-tune (iGAT and every control in
`spec.controls`) starts from the same base checkpoint, with the base method's state, and gets the same budget:
`igat.train`, the same seed and so the same batches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from igat_core.data import Split, dataset_info, equidistant_indices, load_dataset
from igat_core.defenses import DEFENSES, BaseMethod, build_method
from igat_core.defenses.base import MethodHooks
from igat_core.ensemble import Ensemble, MethodState, import_dverge_checkpoint, load_ensemble, method_state
from igat_core.evaluate import (EvalConfig, evaluate_ensemble, evaluation_record, point_differences,
                                relative_improvement)
from igat_core.igat import CONTROLS, FineTuning, IgatConfig, IgatObjective, control_objective
from igat_core.models import ModelConfig
from igat_core.report import write_report
from igat_core.rundir import (EVAL_STATE_DIR, EVALUATION_FILE, RESULTS_FILE, SPEC_FILE, STATE_FILE,
                             TUNE_FILE, RunLog, checkpoint_dir, model_checkpoint, write_json_atomic)
from igat_core.runtime import runtime_record, torch_threads
from igat_core.spec import AttackSpec, ExperimentSpec, OptimSpec, dump_spec, load_spec
from igat_core.train import FitFn, FitRequest, TrainConfig, last_checkpoint_epoch, load_last_checkpoint, local_fit

MODELS: tuple[str, ...] = ("base", *CONTROLS, "igat")


BASE_CHECKPOINT = model_checkpoint("base")
IGAT_CHECKPOINT = model_checkpoint("igat")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("resources.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def model_config(spec: ExperimentSpec) -> ModelConfig:
    info = dataset_info(spec.dataset.name)
    e = spec.ensemble
    return ModelConfig(e.architecture, info.num_classes, info.channels, info.height, info.width, info.mean, info.std,
                       e.activation, e.width, dataset=spec.dataset.name)


def train_config(optim: OptimSpec, spec: ExperimentSpec, seed_offset: int) -> TrainConfig:
    augment = spec.dataset.augment if spec.dataset.augment is not None else spec.dataset.name.startswith("cifar")
    return TrainConfig(optim.epochs, optim.batch_size, optim.lr, optim.momentum, optim.weight_decay,
                       tuple(optim.milestones), optim.gamma, augment, spec.seed + seed_offset, optim.optimizer)


def igat_config(spec: ExperimentSpec) -> IgatConfig:
    """iGAT settings; alpha/beta not given in the spec take the base method's defaults (section 6.1)."""
    g = spec.igat
    default_alpha, default_beta = DEFENSES[spec.base.method].igat_defaults
    alpha = default_alpha if g.alpha is None else g.alpha
    beta = default_beta if g.beta is None else g.beta
    return IgatConfig(alpha=alpha, beta=beta, rule=g.rule, regularizer=g.regularizer,
                      regularizer_clip=g.regularizer_clip, regularizer_on=g.regularizer_on,
                      misclassified_only=g.misclassified_only,
                      global_loss_mean=g.global_loss_mean, combiner=spec.ensemble.combiner, eps=g.attack.eps,
                      step=g.attack.step, steps=g.attack.steps, random_start=g.attack.random_start, bn_mode=g.bn_mode)


def base_method_params(spec: ExperimentSpec) -> dict:
    """`base.params`, plus `base.attack` for pgd_at; other methods set their PGD through `base.params`."""
    params = dict(spec.base.params)
    a = spec.base.attack
    if spec.base.method == "pgd_at":
        return {"eps": a.eps, "step": a.step, "steps": a.steps, "random_start": a.random_start, **params}
    if a != AttackSpec():
        names = DEFENSES[spec.base.method].attack_params
        hint = f"; set {', '.join(names.values())} in base.params instead" if names else ""
        raise ValueError(f"base.attack applies to pgd_at only, not to base method {spec.base.method!r}{hint}")
    return params


TunePhase = Callable[["Runner", Split], dict]


class Runner:
    """`fit_fn` runs each training phase (default: in this process); `tune_fn` runs the alpha/beta search of
    `spec.tune` and returns results.json's `tune` record (the Ray workers supply both: workers.runner)."""

    def __init__(self, spec: ExperimentSpec, out: str | Path, *, progress: bool = True, fit_fn: FitFn = local_fit,
                 tune_fn: TunePhase | None = None):
        self.spec = spec
        self.out = Path(out)
        self.progress = progress
        self.fit_fn = fit_fn
        self.tune_fn = tune_fn
        self.device = resolve_device(spec.resources.device)
        self.log = RunLog(self.out)
        self.state_path = self.out / STATE_FILE

    # -- state ---------------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {"phases": {}}

    def _finish_phase(self, phase: str, seconds: float, **extra: object) -> None:
        state = self._state()
        state["phases"][phase] = {"done": True, "seconds": seconds, **extra}
        write_json_atomic(self.state_path, state)
        self.log.event(phase, "finished", f"{phase} finished in {seconds:.1f}s")

    def _done(self, phase: str) -> bool:
        return self._state()["phases"].get(phase, {}).get("done", False)

    # -- phases --------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        with torch_threads(self.spec.resources.threads):
            return self._run_phases()

    def _run_phases(self) -> dict:
        if self.spec.tune.enabled and self.tune_fn is None:
            raise ValueError("tune.enabled: the alpha/beta search runs on Ray Tune; submit the spec to the service "
                             "(igat submit) or run `python -m workers.runner SPEC.yaml`, or set tune.enabled: false")
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_spec()
        self.log.event("run", "started", f"run {self.spec.name} on {self.device}")
        torch.manual_seed(self.spec.seed)
        d = self.spec.dataset
        train = load_dataset(d.name, "train", val_fraction=d.val_fraction, seed=self.spec.seed,
                             train_limit=d.train_limit)
        if not self._done("pretrain"):
            self._pretrain(train)
        if self.spec.tune.enabled and not self._done("tune"):
            self._tune(train)
        for model in self.fine_tuned_models():
            if not self._done(model):
                self._fine_tune(model, train)
        if not self._done("evaluate"):
            self._evaluate()
        results = self._results()
        write_json_atomic(self.out / RESULTS_FILE, results)
        write_report(results, self.out)
        self.log.event("run", "finished", "results.json and report.md written")
        return results

    def _check_same_spec(self) -> None:
        spec_path = self.out / SPEC_FILE
        text = dump_spec(self.spec)
        if spec_path.exists() and load_spec(spec_path) != self.spec:
            raise RuntimeError(f"{self.out} holds a run of a different spec; use another --out directory")
        if not spec_path.exists():
            spec_path.write_text(text)

    def _fit(self, phase: str, ensemble: Ensemble, objective, train: Split, optim: OptimSpec, seed_offset: int,
             checkpoint_name: str) -> float:
        ckpt_dir = checkpoint_dir(self.out, checkpoint_name)
        config = train_config(optim, self.spec, seed_offset)
        resumed_epoch = last_checkpoint_epoch(ckpt_dir)
        self.log.drop_metrics_after(phase, resumed_epoch)
        self.log.event(phase, "started", f"{phase}: epochs {resumed_epoch + 1}..{optim.epochs}",
                       resumed_from_epoch=resumed_epoch)
        started = time.perf_counter()
        self.fit_fn(FitRequest(phase, ensemble, objective, train, config, ckpt_dir, self.device,
                               lambda m, _: self.log.metrics(m), self.progress))
        state = objective.state_dict() if isinstance(objective, MethodHooks) else {}
        ensemble.cpu().save(self.out / model_checkpoint(checkpoint_name), MethodState(self.spec.base.method, state))
        return time.perf_counter() - started

    def _pretrain(self, train: Split) -> None:
        base = self.spec.base
        if base.checkpoint:
            self.log.event("pretrain", "started", f"loading pretrained ensemble {base.checkpoint}")
            started = time.perf_counter()
            ensemble, stored = self._load_pretrained(base.checkpoint)
            ensemble.save(self.out / BASE_CHECKPOINT, stored)
            self._finish_phase("pretrain", time.perf_counter() - started, loaded=base.checkpoint)
            return
        method = build_method(base.method, base_method_params(self.spec))
        torch.manual_seed(self.spec.seed)
        ensemble = Ensemble(method.configure_model(model_config(self.spec)), self.spec.ensemble.members,
                            self.spec.ensemble.combiner)
        seconds = self._fit("pretrain", ensemble, method, train, base.train, seed_offset=0, checkpoint_name="base")
        self._finish_phase("pretrain", seconds)

    def _load_pretrained(self, path: str) -> tuple[Ensemble, MethodState | None]:
        """The ensemble of `base.checkpoint` and the method state saved with it (an igat checkpoint's)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and "format" in payload:
            return load_ensemble(path, self.spec.ensemble.combiner), method_state(payload)
        return import_dverge_checkpoint(path, model_config(self.spec), self.spec.ensemble.combiner), None

    def fine_tuned_models(self) -> list[str]:
        """The models fine-tuned from the base, in the order they train: iGAT, then the spec's controls."""
        if not self.spec.igat.enabled:
            return []
        return ["igat", *(c for c in CONTROLS if c in self.spec.controls)]

    def trained_models(self) -> list[str]:
        """Every model of this run in results.json's order: base, the controls, iGAT."""
        return [m for m in MODELS if m == "base" or m in self.fine_tuned_models()]

    def base_method(self) -> BaseMethod:
        """The base method with the state it trained the base ensemble with (CLDL's label-confusion model)."""
        method = build_method(self.spec.base.method, base_method_params(self.spec))
        payload = torch.load(self.out / BASE_CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
        stored = method_state(payload) or _legacy_method_state(self.out, method.name)
        if stored is not None and stored.name == method.name:
            method.load_state_dict(stored.state)
        elif method.has_state:
            found = f"state of {stored.name!r}" if stored else "no method state"
            self.log.event("pretrain", "warning", f"the base checkpoint holds {found}: {method.name}'s own state "
                           "(e.g. CLDL's label-confusion model) starts untrained in the fine-tunes")
        return method

    def fine_tune_objective(self, model: str) -> FineTuning:
        method, config = self.base_method(), self.tuned_igat_config()
        return IgatObjective(method, config) if model == "igat" else control_objective(model, method, config)

    def _fine_tune(self, model: str, train: Split) -> None:
        ensemble = load_ensemble(self.out / BASE_CHECKPOINT, self.spec.ensemble.combiner)
        seconds = self._fit(model, ensemble, self.fine_tune_objective(model), train, self.spec.igat.train,
                            seed_offset=1, checkpoint_name=model)
        self._finish_phase(model, seconds)

    def _tune(self, train: Split) -> None:
        assert self.tune_fn is not None
        self.log.event("tune", "started", f"alpha/beta search ({self.spec.tune.mode}) on the validation split")
        started = time.perf_counter()
        record = self.tune_fn(self, train)
        write_json_atomic(self.out / TUNE_FILE, record)
        chosen = record["chosen"]
        self._finish_phase("tune", time.perf_counter() - started, alpha=chosen["alpha"], beta=chosen["beta"])

    def tuned_igat_config(self) -> IgatConfig:
        """igat_config(spec), with the pair chosen by the search when one ran."""
        config = igat_config(self.spec)
        tuned = self._state()["phases"].get("tune", {})
        if tuned.get("done"):
            config = replace(config, alpha=float(tuned["alpha"]), beta=float(tuned["beta"]))
        return config

    def _evaluate(self) -> None:
        self.log.event("evaluate", "started", "evaluating on the test split")
        started = time.perf_counter()
        test = load_dataset(self.spec.dataset.name, "test")
        idx = equidistant_indices(len(test.labels), self.spec.eval.n_examples)
        images, labels = test.images[idx], test.labels[idx]
        config = EvalConfig.from_spec(self.spec.eval, self.spec.seed)
        evaluation = {}
        for model in self.trained_models():
            self.log.event("evaluate", "model", f"evaluating {model}", model=model)
            ensemble = load_ensemble(self.out / model_checkpoint(model))
            evaluation[model] = evaluate_ensemble(ensemble, images, labels, config, device=self.device,
                                                  progress=self.progress, desc=f"evaluate {model}",
                                                  state_dir=self.out / EVAL_STATE_DIR)
        record = evaluation_record(evaluation, config, len(labels))
        record["diagnostics"] = self._diagnostics(images, labels)
        write_json_atomic(self.out / EVALUATION_FILE, record)
        self._finish_phase("evaluate", time.perf_counter() - started)

    def _diagnostics(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Supplement Tables 4-8 and the curvature of every trained ensemble, on `diagnostics_examples` of the
        evaluated examples."""
        from igat_core.theory.diagnostics import ensemble_diagnostics

        e = self.spec.eval
        if e.diagnostics_examples == 0:
            return {}
        idx = equidistant_indices(len(labels), min(e.diagnostics_examples, len(labels)))
        diagnostics = {}
        for model in (m for m in ("base", "igat") if m in self.trained_models()):
            self.log.event("evaluate", "diagnostics", f"supplement Tables 4-8 for {model}")
            diagnostics[model] = ensemble_diagnostics(load_ensemble(self.out / model_checkpoint(model)),
                                                      images[idx], labels[idx], combiner="average", eps=e.eps,
                                                      step=e.step, steps=e.steps, device=self.device,
                                                      seed=self.spec.seed)
        return diagnostics

    def _results(self) -> dict:
        state = self._state()
        evaluation_file = json.loads((self.out / EVALUATION_FILE).read_text())
        accuracy = evaluation_file["accuracy"]
        evaluation: dict = {"eps": self.spec.eval.eps, "n_examples": evaluation_file["n_examples"], **accuracy}
        if evaluation_file.get("eps_sweep"):
            evaluation["eps_sweep"] = evaluation_file["eps_sweep"]
        references = [m for m in accuracy if m != "igat"] if "igat" in accuracy else []
        improvement_over = {m: relative_improvement(accuracy[m], accuracy["igat"]) for m in references}
        artifacts = {f"{model}_checkpoint": model_checkpoint(model) for model in accuracy}
        return {
            "name": self.spec.name,
            "spec": self.spec.model_dump(mode="json"),
            "evaluation": evaluation,
            "improvement": improvement_over.get("base", {}),
            "improvement_over": improvement_over,
            "gain_points": {m: point_differences(accuracy[m], accuracy["igat"]) for m in references},
            "attack_cost": evaluation_file.get("cost", {}),
            "diagnostics": evaluation_file.get("diagnostics", {}),
            "sanity": evaluation_file["sanity"],
            "timing": {phase: info["seconds"] for phase, info in state["phases"].items()},
            "tune": json.loads((self.out / TUNE_FILE).read_text()) if (self.out / TUNE_FILE).exists() else None,
            "artifacts": artifacts,
            "device": str(self.device),
            "torch": torch.__version__,
            "runtime": runtime_record(self.device),
        }


def _legacy_method_state(out: Path, name: str) -> MethodState | None:
    """Runs made before base checkpoints carried their method state keep it in checkpoints/base/last.pt."""
    last = load_last_checkpoint(checkpoint_dir(out, "base"))
    return MethodState(name, last["method"]) if last is not None and last.get("method") else None


def run_experiment(spec: ExperimentSpec, out: str | Path, *, progress: bool = True, fit_fn: FitFn = local_fit,
                   tune_fn: TunePhase | None = None) -> dict:
    return Runner(spec, out, progress=progress, fit_fn=fit_fn, tune_fn=tune_fn).run()
