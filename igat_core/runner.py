"""A whole experiment as phases: pretrain (or load) the base ensemble, tune alpha/beta (on Ray), fine-tune iGAT and
the equal-budget controls, train the transfer attack's source when `eval.transfer_from: standard`, evaluate,
report.

Each phase is a function of a `RunContext` (spec, run directory, device, how to train) and its explicit inputs;
it writes its files in the run directory (igat_core.rundir) and returns what it made. `Runner` composes them for
`igat run` and the Ray runner, skipping the phases state.json marks done and resuming an interrupted one from its
last epoch checkpoint. Every fine-tune (iGAT and each control of `spec.controls`) starts from the same base
checkpoint, with the base method's state, and gets the same budget: `igat.train`, the same seed and so the same
batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from igat_core.data import Split, dataset_info, equidistant_indices, load_dataset
from igat_core.dataset_info import input_shape_mismatch
from igat_core.defenses import DEFENSES, BaseMethod, build_method
from igat_core.defenses.base import MethodHooks
from igat_core.ensemble import (CheckpointError, Ensemble, MethodState, checkpoint_errors, ensemble_from_checkpoint,
                               import_dverge_checkpoint, load_ensemble, method_state, read_checkpoint)
from igat_core.evaluate import EvalConfig, attack_factory_for, evaluate_ensemble, evaluation_record
from igat_core.igat import CONTROLS, FineTuning, GlobalStepObjective, IgatConfig, fine_tune_objective
from igat_core.models import ModelConfig
from igat_core.progress import EvalProgress, Heartbeat, heartbeat
from igat_core.report import write_report
from igat_core.results import results_record
from igat_core.rundir import (EVAL_STATE_DIR, EVALUATION_FILE, REPORT_FILE, RESULTS_FILE, SPEC_FILE, STATE_FILE,
                              TRANSFER_SOURCE, TUNE_FILE, RunLog, checkpoint_dir, model_checkpoint, read_json,
                              write_json_atomic)
from igat_core.runtime import channels_last_members, torch_threads, usable_cpus
from igat_core.spec import (STANDARD_TRANSFER_SOURCE, AttackSpec, ExperimentSpec, OptimSpec, checkpoint_reference,
                            dump_spec, load_spec)
from igat_core.train import FitFn, FitRequest, TrainConfig, last_checkpoint_epoch, load_last_checkpoint, local_fit

MODELS: tuple[str, ...] = ("base", *CONTROLS, "igat")
Listener = Callable[[dict], None]
BASE_CHECKPOINT = model_checkpoint("base")
IGAT_CHECKPOINT = model_checkpoint("igat")
DIAGNOSED_MODELS = ("base", "igat")
TRANSFER_SOURCE_CHECKPOINT = model_checkpoint(TRANSFER_SOURCE)
TRANSFER_SEED_OFFSET = 1000


# ----------------------------------------------------------------------------------------- the spec, resolved


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
                       tuple(optim.milestones), optim.gamma, augment, spec.seed + seed_offset, optim.optimizer,
                       spec.resources.precision)


def fine_tune_config(spec: ExperimentSpec) -> TrainConfig:
    """The budget every fine-tune gets: `igat.train`, seeded one past the pretraining."""
    return train_config(spec.igat.train, spec, seed_offset=1)


def igat_config(spec: ExperimentSpec, tuned: Mapping[str, Any] | None = None) -> IgatConfig:
    """iGAT settings: alpha/beta from the search's `tuned` pair, else the spec, else the base method's defaults
    (section 6.1)."""
    g = spec.igat
    default_alpha, default_beta = DEFENSES[spec.base.method].igat_defaults
    alpha = default_alpha if g.alpha is None else g.alpha
    beta = default_beta if g.beta is None else g.beta
    if tuned is not None:
        alpha, beta = float(tuned["alpha"]), float(tuned["beta"])
    return IgatConfig(alpha=alpha, beta=beta, rule=g.rule, regularizer=g.regularizer,
                      regularizer_clip=g.regularizer_clip, regularizer_on=g.regularizer_on,
                      misclassified_only=g.misclassified_only,
                      global_loss_mean=g.global_loss_mean, combiner=spec.ensemble.combiner, eps=g.attack.eps,
                      step=g.attack.step, steps=g.attack.steps, random_start=g.attack.random_start,
                      model_mode=g.model_mode, engine=spec.resources.engine, cuda_graphs=spec.resources.cuda_graphs,
                      reuse_natural_pass=g.reuse_natural_pass)


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


def fine_tuned_models(spec: ExperimentSpec) -> list[str]:
    """The models fine-tuned from the base, in the order they train: iGAT, then the spec's controls."""
    return ["igat", *(c for c in CONTROLS if c in spec.controls)] if spec.igat.enabled else []


def trained_models(spec: ExperimentSpec) -> list[str]:
    """Every model of a run in results.json's order: base, the controls, iGAT."""
    return [m for m in MODELS if m == "base" or m in fine_tuned_models(spec)]


# ---------------------------------------------------------------------------------------- context and state


@dataclass(frozen=True)
class RunContext:
    """What every phase reads: the spec, the run directory, the device, and how a training phase runs;
    `listener` also gets every event the run writes (`igat run`'s progress bars)."""

    spec: ExperimentSpec
    out: Path
    device: torch.device
    fit_fn: FitFn = local_fit
    progress: bool = True
    listener: Listener | None = None
    log: RunLog = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "log", RunLog(self.out, self.listener))


@dataclass(frozen=True)
class RunState:
    """state.json: the finished phases, each with its seconds (and what it chose, for the search)."""

    path: Path

    def phases(self) -> dict[str, dict]:
        return (read_json(self.path) or {"phases": {}})["phases"]

    def done(self, phase: str) -> bool:
        return self.phases().get(phase, {}).get("done", False)

    def finish(self, phase: str, seconds: float, **extra: object) -> None:
        phases = self.phases()
        phases[phase] = {"done": True, "seconds": seconds, **extra}
        write_json_atomic(self.path, {"phases": phases})

    def timing(self) -> dict[str, float]:
        return {phase: info["seconds"] for phase, info in self.phases().items()}


# ------------------------------------------------------------------------------------------------ training


def train_phase(ctx: RunContext, phase: str, ensemble: Ensemble, objective: Any, train: Split,
                config: TrainConfig, model: str, method: str | None = None) -> None:
    """Train `ensemble` as `phase` through `ctx.fit_fn` (resuming from its last epoch checkpoint) and save it, with
    the method state the objective holds (of `method`, default the base method), as `model`'s checkpoint."""
    ckpt_dir = checkpoint_dir(ctx.out, model)
    resumed_epoch = last_checkpoint_epoch(ckpt_dir)
    ctx.log.drop_metrics_after(phase, resumed_epoch)
    ctx.log.event(phase, "started", f"{phase}: epochs {resumed_epoch + 1}..{config.epochs}",
                  resumed_from_epoch=resumed_epoch, epochs=config.epochs)
    ctx.fit_fn(FitRequest(phase, ensemble, objective, train, config, ckpt_dir, ctx.device,
                          lambda m, _: ctx.log.metrics(m), ctx.progress, log=ctx.log))
    state = objective.state_dict() if isinstance(objective, MethodHooks) else {}
    ensemble.cpu().save(ctx.out / model_checkpoint(model), MethodState(method or ctx.spec.base.method, state))


def pretrain(ctx: RunContext, train: Split) -> dict[str, object]:
    """The base ensemble: trained with the base method, or loaded from `base.checkpoint`. Returns state extras."""
    base = ctx.spec.base
    if base.checkpoint:
        ctx.log.event("pretrain", "started", f"loading pretrained ensemble {base.checkpoint}")
        ensemble, stored = load_pretrained(ctx.spec, base.checkpoint)
        ensemble.save(ctx.out / BASE_CHECKPOINT, stored)
        return {"loaded": base.checkpoint}
    method = build_method(base.method, base_method_params(ctx.spec))
    torch.manual_seed(ctx.spec.seed)
    ensemble = Ensemble(method.configure_model(model_config(ctx.spec)), ctx.spec.ensemble.members,
                        ctx.spec.ensemble.combiner)
    train_phase(ctx, "pretrain", ensemble, method, train, train_config(base.train, ctx.spec, 0), "base")
    return {}


def load_pretrained(spec: ExperimentSpec, path: str) -> tuple[Ensemble, MethodState | None]:
    """The ensemble of `base.checkpoint` and the method state saved with it (an igat checkpoint's)."""
    if checkpoint_reference(path) is not None:
        raise CheckpointError(f"checkpoint {path} names an experiment of the service, which resolves it to a file "
                              "when the spec is submitted; here, give the file's path")
    payload = read_checkpoint(path)
    if isinstance(payload, dict) and "format" in payload:
        with checkpoint_errors(path):
            return ensemble_from_checkpoint(payload, spec.ensemble.combiner).eval(), method_state(payload)
    return import_dverge_checkpoint(path, model_config(spec), spec.ensemble.combiner), None


def base_method(ctx: RunContext) -> BaseMethod:
    """The base method with the state it trained the base ensemble with (CLDL's label-confusion model)."""
    method = build_method(ctx.spec.base.method, base_method_params(ctx.spec))
    payload = torch.load(ctx.out / BASE_CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
    stored = method_state(payload) or _legacy_method_state(ctx.out, method.name)
    if stored is not None and stored.name == method.name:
        method.load_state_dict(stored.state)
    elif method.has_state:
        found = f"state of {stored.name!r}" if stored else "no method state"
        ctx.log.event("pretrain", "warning", f"the base checkpoint holds {found}: {method.name}'s own state "
                      "(e.g. CLDL's label-confusion model) starts untrained in the fine-tunes")
    return method


def _legacy_method_state(out: Path, name: str) -> MethodState | None:
    """Runs made before base checkpoints carried their method state keep it in checkpoints/base/last.pt."""
    last = load_last_checkpoint(checkpoint_dir(out, "base"))
    return MethodState(name, last["method"]) if last is not None and last.get("method") else None


def fine_tune(ctx: RunContext, model: str, train: Split, objective: FineTuning) -> None:
    """Fine-tune `model` (iGAT or a control) from the base checkpoint with `objective`, on iGAT's budget."""
    ensemble = load_ensemble(ctx.out / BASE_CHECKPOINT, ctx.spec.ensemble.combiner)
    engine = objective.engine if isinstance(objective, GlobalStepObjective) else None
    if engine is not None and engine.kind != "loop":
        ctx.log.event(model, "engine", engine.summary(), **engine.report())
    train_phase(ctx, model, ensemble, objective, train, fine_tune_config(ctx.spec), model)
    if engine is not None and engine.fused_calls:
        ctx.log.event(model, "engine", f"after training: {engine.summary()}", **engine.report())


def train_transfer_source(ctx: RunContext, train: Split) -> None:
    """`eval.transfer_from: standard`: a plain ensemble of the run's shape on base.train's budget, seeded
    TRANSFER_SEED_OFFSET past the run (its own initialisation and batches), saved as TRANSFER_SOURCE."""
    method = build_method("plain", {})
    torch.manual_seed(ctx.spec.seed + TRANSFER_SEED_OFFSET)
    ensemble = Ensemble(method.configure_model(model_config(ctx.spec)), ctx.spec.ensemble.members, "average")
    config = train_config(ctx.spec.base.train, ctx.spec, TRANSFER_SEED_OFFSET)
    train_phase(ctx, TRANSFER_SOURCE, ensemble, method, train, config, TRANSFER_SOURCE, method=method.name)


def transfer_source(ctx: RunContext) -> Ensemble | None:
    """The transfer attack's source ensemble (`eval.transfer_from`), None when no transfer attack runs."""
    source = ctx.spec.eval.transfer_from
    if not source:
        return None
    if source == STANDARD_TRANSFER_SOURCE:
        return load_ensemble(ctx.out / TRANSFER_SOURCE_CHECKPOINT)
    ensemble = load_pretrained(ctx.spec, source)[0]
    found = ensemble.config
    mismatch = input_shape_mismatch(found.in_channels, found.height, found.width_px, found.num_classes,
                                    ctx.spec.dataset.name)
    if mismatch:
        raise CheckpointError(f"eval.transfer_from {source} {mismatch}")
    return ensemble


# ------------------------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class TuneRequest:
    """What the alpha/beta search reads: the spec (its `tune`, `dataset`, `eval`), the run directory, the
    training split, the base method with its state, and the iGAT settings the trials vary alpha/beta of."""

    spec: ExperimentSpec
    out: Path
    train: Split
    method: BaseMethod
    igat: IgatConfig
    log: RunLog

    @property
    def base_checkpoint(self) -> Path:
        return self.out / BASE_CHECKPOINT


TunePhase = Callable[[TuneRequest], dict]


def tune(ctx: RunContext, train: Split, tune_fn: TunePhase) -> dict:
    """Run the search (`tune_fn`, the Ray workers' `RayTune`) and write its record, results.json's `tune`."""
    ctx.log.event("tune", "started", f"alpha/beta search ({ctx.spec.tune.mode}) on the validation split")
    record = tune_fn(TuneRequest(ctx.spec, ctx.out, train, base_method(ctx), igat_config(ctx.spec), ctx.log))
    write_json_atomic(ctx.out / TUNE_FILE, record)
    return record


def tune_record(out: Path) -> dict | None:
    """The search's record (tune.json), when a search ran."""
    return read_json(out / TUNE_FILE)


# ------------------------------------------------------------------------------------------- evaluation


def test_examples(spec: ExperimentSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The `eval.n_examples` equidistant test examples every model is evaluated on."""
    test = load_dataset(spec.dataset.name, "test")
    idx = equidistant_indices(len(test.labels), spec.eval.n_examples)
    return test.images[idx], test.labels[idx]


def evaluate(ctx: RunContext, models: list[str]) -> dict:
    """Every model under every combiner and attack of `spec.eval`, plus the diagnostics; writes evaluation.json."""
    ctx.log.event("evaluate", "started", "evaluating on the test split")
    images, labels = test_examples(ctx.spec)
    config = EvalConfig.from_spec(ctx.spec.eval, ctx.spec.seed)
    factory = attack_factory_for(transfer_source(ctx), config)
    evaluations = {}
    for model in models:
        ctx.log.event("evaluate", "model", f"evaluating {model}", model=model)
        evaluations[model] = evaluate_ensemble(load_ensemble(ctx.out / model_checkpoint(model)), images, labels,
                                               config, device=ctx.device, progress=ctx.progress,
                                               desc=f"evaluate {model}", state_dir=ctx.out / EVAL_STATE_DIR,
                                               attack_factory=factory, events=EvalProgress(ctx.log, model))
    record = evaluation_record(evaluations, config, len(labels))
    record["diagnostics"] = diagnostics(ctx, [m for m in DIAGNOSED_MODELS if m in models], images, labels)
    write_json_atomic(ctx.out / EVALUATION_FILE, record)
    return record


def diagnostics(ctx: RunContext, models: list[str], images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Supplement Tables 4-8 and the curvature of `models`, on `diagnostics_examples` of the evaluated examples."""
    from igat_core.theory.diagnostics import ensemble_diagnostics

    e = ctx.spec.eval
    if e.diagnostics_examples == 0:
        return {}
    idx = equidistant_indices(len(labels), min(e.diagnostics_examples, len(labels)))
    found = {}
    for model in models:
        ctx.log.event("evaluate", "diagnostics", f"supplement Tables 4-8 for {model}")
        found[model] = ensemble_diagnostics(load_ensemble(ctx.out / model_checkpoint(model)), images[idx], labels[idx],
                                            combiner="average", eps=e.eps, step=e.step, steps=e.steps,
                                            device=ctx.device, seed=ctx.spec.seed)
    return found


def run_results(spec: ExperimentSpec, out: Path, device: torch.device) -> dict:
    """results.json of the run in `out`, from its evaluation.json, state.json and tune.json."""
    evaluation = read_json(out / EVALUATION_FILE)
    if evaluation is None:
        raise RuntimeError(f"{out / EVALUATION_FILE} is missing: the evaluate phase has not finished")
    return results_record(evaluation, name=spec.name, spec=spec.model_dump(mode="json"), eps=spec.eval.eps,
                          timing=RunState(out / STATE_FILE).timing(), tune=tune_record(out), device=device,
                          artifacts={f"{m}_checkpoint": model_checkpoint(m) for m in evaluation["accuracy"]})


# ----------------------------------------------------------------------------------------------- the run


class Runner:
    """`fit_fn` runs each training phase (default: in this process); `tune_fn` runs the alpha/beta search of
    `spec.tune` and returns results.json's `tune` record (the Ray workers supply both: workers.runner)."""

    def __init__(self, spec: ExperimentSpec, out: str | Path, *, progress: bool = True, fit_fn: FitFn = local_fit,
                 tune_fn: TunePhase | None = None, listener: Listener | None = None):
        self.spec = spec
        self.context = RunContext(spec, Path(out), resolve_device(spec.resources.device), fit_fn, progress, listener)
        self.state = RunState(self.context.out / STATE_FILE)
        self.tune_fn = tune_fn
        self.beat: Heartbeat | None = None

    @property
    def out(self) -> Path:
        return self.context.out

    def run(self) -> dict:
        if self.spec.tune.enabled and self.tune_fn is None:
            raise ValueError("tune.enabled: the alpha/beta search runs on Ray Tune; submit the spec to the service "
                             "(igat submit) or run `python -m workers.runner SPEC.yaml`, or set tune.enabled: false")
        self.out.mkdir(parents=True, exist_ok=True)
        r = self.spec.resources
        with torch_threads(r.threads), channels_last_members(r.channels_last), \
                heartbeat(self.context.log, "run") as self.beat:
            return self._run_phases()

    def _say_if_oversubscribed(self) -> None:
        threads, cpus = self.spec.resources.threads or 1, usable_cpus()
        if threads > cpus:
            self.context.log.event("run", "oversubscribed", f"resources.threads is {threads} but this process may "
                                   f"use {cpus} CPUs (affinity, cgroup quota): the same numbers, more slowly",
                                   threads=threads, usable_cpus=cpus)

    def _run_phases(self) -> dict:
        ctx = self.context
        check_same_spec(self.spec, ctx.out)
        ctx.log.event("run", "started", f"run {self.spec.name} on {ctx.device}")
        self._say_if_oversubscribed()
        torch.manual_seed(self.spec.seed)
        d = self.spec.dataset
        train = load_dataset(d.name, "train", val_fraction=d.val_fraction, seed=self.spec.seed,
                             train_limit=d.train_limit)
        self._phase("pretrain", lambda: pretrain(ctx, train), record=dict)
        if self.spec.tune.enabled:
            self._phase("tune", lambda: tune(ctx, train, self.tune_fn), record=chosen_pair)
        config = igat_config(self.spec, (tune_record(ctx.out) or {}).get("chosen"))
        for model in fine_tuned_models(self.spec):
            self._phase(model, lambda m=model: fine_tune(ctx, m, train, fine_tune_objective(m, base_method(ctx),
                                                                                          config)))
        if self.spec.eval.transfer_from == STANDARD_TRANSFER_SOURCE:
            self._phase(TRANSFER_SOURCE, lambda: train_transfer_source(ctx, train))
        self._phase("evaluate", lambda: evaluate(ctx, trained_models(self.spec)))
        return self._write_results()

    def _phase(self, phase: str, body: Callable[[], Any], record: Callable[[Any], dict] | None = None) -> None:
        """Run `body` unless state.json marks `phase` done; then mark it done, with its seconds and `record` of
        what it returned."""
        if self.state.done(phase):
            return
        started = time.perf_counter()
        if self.beat is not None:
            self.beat.enter(phase)
        try:
            made = body()
        except Exception as exc:  # the reason in the run's events too; the traceback stays on stderr
            self.context.log.event(phase, "failed", f"{phase} failed: {exc}", error=type(exc).__name__)
            raise
        finally:
            if self.beat is not None:
                self.beat.enter("run")
        seconds = time.perf_counter() - started
        self.state.finish(phase, seconds, **(record(made) if record else {}))
        self.context.log.event(phase, "finished", f"{phase} finished in {seconds:.1f}s")

    def _write_results(self) -> dict:
        results = run_results(self.spec, self.out, self.context.device)
        write_json_atomic(self.out / RESULTS_FILE, results)
        write_report(results, self.out)
        self.context.log.event("run", "finished", f"{RESULTS_FILE} and {REPORT_FILE} written")
        return results


def chosen_pair(record: dict) -> dict[str, float]:
    """The (alpha, beta) a search record chose."""
    return {"alpha": record["chosen"]["alpha"], "beta": record["chosen"]["beta"]}


def check_same_spec(spec: ExperimentSpec, out: Path) -> None:
    """Write spec.yaml into a new run directory; refuse one that holds a run of a different spec."""
    spec_path = out / SPEC_FILE
    if spec_path.exists() and load_spec(spec_path) != spec:
        raise RuntimeError(f"{out} holds a run of a different spec; use another --out directory")
    if not spec_path.exists():
        spec_path.write_text(dump_spec(spec))


def run_experiment(spec: ExperimentSpec, out: str | Path, *, progress: bool = True, fit_fn: FitFn = local_fit,
                   tune_fn: TunePhase | None = None, listener: Listener | None = None) -> dict:
    return Runner(spec, out, progress=progress, fit_fn=fit_fn, tune_fn=tune_fn, listener=listener).run()

