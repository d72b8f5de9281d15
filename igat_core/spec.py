"""ExperimentSpec: the one contract the CLI, the service and the Ray workers share.

Importable without torch. A spec is read from YAML (`load_spec`) or JSON (the REST body); extra fields are
forbidden and every number is bounded, so a typo is an error naming the field instead of a silent default.
Perturbation sizes accept fractions written as strings ("8/255"). No number may be NaN or infinite, and every
list and string is bounded.

`base.checkpoint` is a path (no NUL or control characters, at most MAX_PATH_LENGTH characters) or, for the
service, `experiment:<id>[/<model>]`, another experiment's saved ensemble (`checkpoint_reference`); where a path
may point is the service's rule, not the spec's. `size_problems` measures an ensemble against `SizeLimits`
without building it; the service applies it with its own limits (IGAT_MAX_PARAMETERS,
IGAT_MAX_ACTIVATION_BYTES).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from igat_core.dataset_info import dataset_info
from igat_core.model_size import CLDL_HEAD_HIDDEN, MemberShape, MemberSize, member_size

DatasetName = Literal["digits", "mnist5k", "cifar10", "cifar100", "synthetic"]
Architecture = Literal["resnet20", "small_cnn", "mlp"]
Combiner = Literal["average", "max"]
BaseMethodName = Literal["plain", "pgd_at", "adp", "gal", "dverge", "trs", "soe", "cldl"]
DistributionRule = Literal["soft", "hard", "random", "opposite"]
RegularizerForm = Literal["paper", "per_member"]
AttackName = Literal["natural", "pgd", "cw", "mim", "autoattack", "signhunter", "simba", "bandits", "mora",
                     "logit_pgd", "transfer"]
#: `eval.transfer_from: standard`: the run trains the transfer attack's source, a plain ensemble of its own shape.
STANDARD_TRANSFER_SOURCE = "standard"
ModelMode = Literal["eval", "train"]
ControlName = Literal["continued", "global_at"]

MAX_PATH_LENGTH = 4096
MAX_PATH_SEGMENT = 255
MAX_PARAM_STRING = 256
MAX_MILESTONES = 256
#: `base.checkpoint: experiment:<id>[/<model>]`: the saved ensemble `model` (default base) of another experiment.
EXPERIMENT_REFERENCE = "experiment:"
REFERENCE_MODELS = ("base", "igat", *get_args(ControlName))
_REFERENCE = re.compile(r"experiment:(?P<id>[A-Za-z0-9_-]{1,64})(?:/(?P<model>[A-Za-z0-9_]{1,32}))?")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")

# The `base.params` names each method's constructor takes (igat_core.defenses; test_defenses keeps the two equal),
# so that a misspelt parameter is refused when the spec is read rather than when its run starts.
_ADV = ("plus_adv", "adv_eps", "adv_step", "adv_steps", "adv_random_start", "model_mode")
METHOD_PARAMETERS: dict[str, frozenset[str]] = {
    "plain": frozenset(),
    "pgd_at": frozenset({"eps", "step", "steps", "random_start", "model_mode"}),
    "adp": frozenset({"alpha", "beta", "log_offset", "det_offset", *_ADV}),
    "gal": frozenset({"lam", "log_offset", "noise_std", "noise_prob", *_ADV}),
    "dverge": frozenset({"eps", "step", "steps", "momentum", "random_start", "layer", "before_relu", "pairs",
                         "dverge_coeff", "warmup_epochs", *_ADV}),
    "trs": frozenset({"lambda_a", "lambda_b", "plus_adv", "init_eps", "adv_eps", "adv_steps", "accumulate_grad",
                      "model_mode"}),
    "soe": frozenset({"aux_weight", "weighting", "sigma", "attack_target", *_ADV}),
    "cldl": frozenset({"alpha", "beta", "ld_coeff", "coh_mean", "noise_std", "noise_prob", "head_hidden", *_ADV}),
}


def _parse_fraction(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"expected a number or a fraction such as '8/255', got {value!r}") from exc
    return value


_Unit = Annotated[float, Field(ge=0.0, le=1.0)]
#: A number in [0, 1], or a fraction written as a string; the JSON schema says both (bounds as minimum/maximum).
Perturbation = Annotated[_Unit, BeforeValidator(_parse_fraction, json_schema_input_type=_Unit | Annotated[
    str, Field(pattern=r"^ *[0-9]+(\.[0-9]*)? *(/ *[0-9]+ *)?$", description="a fraction such as '8/255'")])]


#: For the JSON schema of lists a validator keeps free of repeats (and non-empty).
_UNIQUE = {"uniqueItems": True}
_UNIQUE_NON_EMPTY = {"uniqueItems": True, "minItems": 1}


def _param_value(value: Any) -> Any:
    """A `base.params` value: a finite number, true/false, or a short string (the method checks its range)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ValueError("must be an integer within the signed 64-bit range")
    if isinstance(value, str) and len(value) > MAX_PARAM_STRING:
        raise ValueError(f"must be a string of at most {MAX_PARAM_STRING} characters, got {len(value)}")
    if not isinstance(value, bool | int | float | str):
        raise ValueError(f"must be a number, true/false or a string, got {type(value).__name__}")
    return value


# The Field bounds repeat what the validators check so that the JSON Schema shows them to clients.
ParamValue = Annotated[float | int | bool | Annotated[str, Field(max_length=MAX_PARAM_STRING)],
                       BeforeValidator(_param_value)]


@dataclass(frozen=True)
class CheckpointReference:
    """`experiment:<id>[/<model>]`: the saved ensemble `model` of the experiment `experiment_id`."""

    experiment_id: str
    model: str = "base"


def checkpoint_reference(value: str) -> CheckpointReference | None:
    """The reference `value` writes, None when it is a path; a malformed reference raises ValueError."""
    if not value.startswith(EXPERIMENT_REFERENCE):
        return None
    match = _REFERENCE.fullmatch(value)
    if match is None or (match["model"] or "base") not in REFERENCE_MODELS:
        raise ValueError(f"a reference to another experiment is experiment:<id> or experiment:<id>/<model> with "
                         f"<model> one of {', '.join(REFERENCE_MODELS)}")
    return CheckpointReference(match["id"], match["model"] or "base")


def _checkpoint_form(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # None, or a type the field refuses
    if len(value) > MAX_PATH_LENGTH:
        raise ValueError(f"must be at most {MAX_PATH_LENGTH} characters, got {len(value)}")
    if not value.strip():
        raise ValueError("must name a file (or be left out)")
    if _CONTROL_CHARACTER.search(value):
        raise ValueError("must not contain NUL or other control characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be text that UTF-8 can encode (no lone surrogates)") from None
    if checkpoint_reference(value) is None and any(len(part.encode()) > MAX_PATH_SEGMENT for part in value.split("/")):
        raise ValueError(f"a path segment is longer than {MAX_PATH_SEGMENT} bytes")
    return value


CheckpointValue = Annotated[Annotated[str, Field(max_length=MAX_PATH_LENGTH)] | None,
                            BeforeValidator(_checkpoint_form)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DatasetSpec(_Strict):
    name: DatasetName = "digits"
    val_fraction: float = Field(0.1, ge=0.0, le=0.5, description="share of the training split held out as `val`")
    augment: bool | None = Field(None, description="crop+flip; default: on for CIFAR, off otherwise")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples")


class EnsembleSpec(_Strict):
    members: int = Field(3, ge=1, le=64)
    architecture: Architecture = "small_cnn"
    activation: Literal["relu", "leaky_relu"] = "relu"
    width: int = Field(32, ge=4, le=4096, description="base width of small_cnn / hidden units of mlp")
    combiner: Combiner = Field("average", description="combiner attacked and tested (delta_0/1) during iGAT")


class OptimSpec(_Strict):
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="adam: the ADP/GAL/TRS/CLDL authors' choice "
                                              "(momentum unused)")
    epochs: int = Field(ge=0, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    lr: float = Field(gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    milestones: list[int] = Field(default_factory=list, max_length=MAX_MILESTONES,
                                  description="epochs at which lr is multiplied by gamma: strictly increasing, "
                                  "each >= 1")
    gamma: float = Field(0.1, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _milestones_increase(self) -> OptimSpec:
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError("milestones must be strictly increasing")
        if any(m < 1 for m in self.milestones):
            raise ValueError("milestones must be epochs >= 1")
        return self


class AttackSpec(_Strict):
    eps: Perturbation = 8 / 255
    step: Perturbation = 2 / 255
    steps: int = Field(20, ge=1, le=10_000)
    random_start: bool = True


class BaseSpec(_Strict):
    method: BaseMethodName = "plain"
    params: dict[Annotated[str, Field(max_length=64)], ParamValue] = Field(
        default_factory=dict, max_length=64, description="method-specific settings; only the names base.method's "
        "constructor takes")
    checkpoint: CheckpointValue = Field(
        None, description="pretrained ensemble to load instead of training one: a path, or (service) "
        "experiment:<id>[/<model>], the saved ensemble of another experiment (model: base, igat or a control; "
        "default base)")
    train: OptimSpec = Field(
        default_factory=lambda: OptimSpec(epochs=200, batch_size=128, lr=0.1, milestones=[100, 150], gamma=0.1)
    )
    attack: AttackSpec = Field(default_factory=AttackSpec, description="per-member PGD used by pgd_at (other "
                               "methods take their PGD settings in params)")

    @model_validator(mode="after")
    def _known_params(self) -> BaseSpec:
        known = METHOD_PARAMETERS[self.method]
        unknown = sorted(set(self.params) - known)
        if unknown:
            raise ValueError(f"params: unknown parameter {unknown[0]!r} for base method {self.method!r}; "
                             f"known: {', '.join(sorted(known)) or '(none)'}")
        return self


class IgatSpec(_Strict):
    enabled: bool = True
    alpha: float | None = Field(None, ge=0.0, le=1e4, description="weight of the global adversarial loss (eq. 16); "
                                "default: the base method's (5; SoE 0.25)")
    beta: float | None = Field(None, ge=0.0, le=1e4, description="weight of the misclassification regulariser "
                               "(eq. 16); default: the base method's (10; SoE 0.5)")
    rule: DistributionRule = "soft"
    regularizer: RegularizerForm = "paper"
    regularizer_clip: float = Field(0.99, gt=0.0, lt=1.0, description="cap on the wrong-class probability in L_R")
    regularizer_on: Literal["both", "adversarial"] = Field(
        "both", description="examples L_R averages over: natural and global adversarial (eq. 16), or the adversarial "
        "ones only (official code's ADP-2 / DVERGE scripts)")
    misclassified_only: bool = Field(False, description="official code: charge only examples the ensemble gets wrong")
    global_loss_mean: Literal["member", "batch"] = Field(
        "member", description="alpha-term: mean over each member's examples (eq. 16) or summed / batch (official code)"
    )
    model_mode: ModelMode = Field("eval", validation_alias=AliasChoices("model_mode", "bn_mode"),
                                  description="members' BatchNorm/dropout mode during the global PGD (train: the "
                                  "official code's, running statistics updated); bn_mode is its former name")
    reuse_natural_pass: bool = Field(False, description="the training pass over cat(x, x_adv) takes its natural "
                                     "half from L_E's pass where the members have no batch statistics (no "
                                     "BatchNorm): the same loss values, gradients equal up to float round-off, "
                                     "which training grows into other numbers")
    attack: AttackSpec = Field(default_factory=AttackSpec)
    train: OptimSpec = Field(
        default_factory=lambda: OptimSpec(epochs=20, batch_size=512, lr=0.01, milestones=[10], gamma=0.2)
    )


class EvalSpec(_Strict):
    attacks: list[AttackName] = Field(default_factory=lambda: ["natural", "pgd"], max_length=len(get_args(AttackName)),
                                      json_schema_extra=_UNIQUE_NON_EMPTY,
                                      description="natural, pgd, cw, mim, autoattack, signhunter, simba, bandits, "
                                      "mora, logit_pgd, transfer; at least one, none repeated")
    eps: Perturbation = 8 / 255
    step: Perturbation = Field(2 / 255, description="step of PGD, CW-L-inf and MIM")
    steps: int = Field(20, ge=1, le=10_000, description="iterations of PGD, CW-L-inf and MIM")
    n_examples: int = Field(1000, ge=1, le=1_000_000, description="equidistant examples of the test split")
    combiners: list[Combiner] = Field(default_factory=lambda: ["average", "max"], max_length=len(get_args(Combiner)),
                                      json_schema_extra=_UNIQUE_NON_EMPTY, description="at least one, none repeated")
    batch_size: int = Field(500, ge=1, le=65_536)
    cw_kappa: float = Field(50.0, ge=0.0, le=1e4, description="CW margin cap: the loss stops at margin -kappa")
    mim_decay: float = Field(1.0, ge=0.0, le=10.0, description="MIM momentum decay mu")
    signhunter_queries: int = Field(500, ge=1, le=1_000_000, description="forward queries per example")
    simba_queries: int = Field(10_000, ge=1, le=10_000_000, description="forward queries per example")
    bandits_queries: int = Field(10_000, ge=1, le=10_000_000, description="forward queries per example")
    autoattack_steps: int = Field(100, ge=1, le=10_000, description="iterations of APGD-CE, APGD-T and FAB-T")
    square_queries: int = Field(5000, ge=1, le=1_000_000, description="queries of AutoAttack's Square")
    mora_steps: int = Field(100, ge=1, le=10_000, description="iterations of each MORA run (authors' n_iter: 100)")
    mora_restarts: int = Field(5, ge=1, le=100, description="MORA runs, over the authors' mixing weights "
                               "0.5, 0, 0.25, 0.75, 1 (authors: 5)")
    transfer_from: CheckpointValue = Field(
        None, description="the transfer attack's source ensemble: 'standard' (the run trains a plain ensemble of "
        "its own shape, base.train's budget, another seed), a checkpoint path, or (service) experiment:<id>[/<model>]")
    eps_sweep: bool = Field(False, description="also evaluate eps_sweep_attack at every eps of eps_sweep_values")
    eps_sweep_values: list[Perturbation] = Field(default_factory=lambda: [k / 255 for k in (2, 4, 6, 8, 10)],
                                                 min_length=1, max_length=64)
    eps_sweep_attack: AttackName = Field("autoattack", description="any attack but natural")
    sanity_pgd_steps: int = Field(100, ge=1, le=10_000, description="the strong PGD of the convergence check")
    sanity_pgd_restarts: int = Field(5, ge=1, le=100)
    sanity_examples: int = Field(500, ge=0, le=1_000_000,
                                 description="examples for the PGD convergence check (0 skips it)")
    diagnostics_examples: int = Field(200, ge=0, le=1_000_000,
                                      description="examples for the supplement's Tables 4-8 and the curvature, "
                                      "measured on global adversarial examples at eps (0 skips them)")

    @field_validator("eps_sweep_attack")
    @classmethod
    def _sweep_attack(cls, name: str) -> str:
        if name == "natural":
            raise ValueError("the eps sweep needs an attack, not 'natural'")
        return name

    @model_validator(mode="after")
    def _non_empty(self) -> EvalSpec:
        if not self.attacks:
            raise ValueError("attacks must name at least one attack")
        if not self.combiners:
            raise ValueError("combiners must name at least one combiner")
        if len(set(self.attacks)) != len(self.attacks) or len(set(self.combiners)) != len(self.combiners):
            raise ValueError("attacks and combiners must not repeat")
        transfers = "transfer" in self.attacks or (self.eps_sweep and self.eps_sweep_attack == "transfer")
        if transfers and not self.transfer_from:
            raise ValueError("the transfer attack needs its source: set transfer_from ('standard' trains one)")
        if self.transfer_from and not transfers:
            raise ValueError("transfer_from is set but no transfer attack runs: add transfer to attacks")
        return self


def default_threads(cpus_per_worker: float) -> int:
    """resources.threads when the spec leaves it out: the whole CPUs of one worker, at least one."""
    return max(1, int(cpus_per_worker))


class ResourcesSpec(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(1, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0)
    threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads of every process that "
                                "trains or evaluates (igat run, the Ray Job's runner, each Ray Train worker); the "
                                "thread count changes how reductions are summed, hence the numbers; default: "
                                "floor(cpus_per_worker), at least 1, written into the resolved spec; each worker "
                                "reserves at least this many CPUs (worker_cpus)")
    engine: Literal["loop", "fused"] = Field(
        "loop", description="how the members run in the passes where they all see one batch (iGAT's global PGD, "
        "the member pass over cat(x, x_adv)): loop, one member after another; fused, one batched computation "
        "(torch.func.vmap over the members' stacked weights; same results to float round-off). Every other pass "
        "runs the loop, and the run's events say which passes did")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: bfloat16 autocast in every training step (the global PGD included); "
        "evaluation and its attacks stay fp32")
    cuda_graphs: bool = Field(False, description="with engine fused on a CUDA device: capture the global PGD's "
                              "step as a CUDA graph, replayed for every batch of the same shape (untested on a GPU)")
    channels_last: bool = Field(False, description="convolutional members keep weights and inputs channels_last "
                                "(NHWC): faster on the CPU, the same results up to float round-off, which training "
                                "grows into other numbers (igat_core.runtime)")

    @model_validator(mode="after")
    def _resolve_threads(self) -> ResourcesSpec:
        if self.threads is None:
            self.threads = default_threads(self.cpus_per_worker)
        return self

    @property
    def worker_cpus(self) -> float:
        """The CPUs one training process holds: cpus_per_worker, or its threads when they are more, so that
        workers packed onto one node never run more threads than the CPUs they hold."""
        return max(self.cpus_per_worker, float(self.threads or 1))

    @property
    def requested_cpus(self) -> float:
        """What the run holds while it trains: every worker's `worker_cpus`."""
        return self.num_workers * self.worker_cpus


TuneMode = Literal["grid", "random", "asha"]


class TuneSpec(_Strict):
    """The alpha/beta search before the iGAT fine-tune; it runs on Ray Tune (``python -m workers.runner``, the
    service). Every trial fine-tunes the base ensemble with one (alpha, beta) and is scored by PGD accuracy of
    the combined ensemble on the validation split (never the test split); the best pair is then used by `igat`.
    `igat run` (no Ray) refuses a spec with the search enabled."""

    enabled: bool = Field(False, description="needs igat.enabled")
    mode: TuneMode = Field("grid", description="grid: every alphas x betas pair; random: num_samples pairs drawn "
                           "uniformly from [min, max] of alphas and betas; asha: random plus ASHA early stopping")
    alphas: list[Annotated[float, Field(ge=0.0, le=1e4)]] = Field(
        default_factory=lambda: [1.0, 5.0, 10.0], min_length=1, max_length=64, json_schema_extra=_UNIQUE)
    betas: list[Annotated[float, Field(ge=0.0, le=1e4)]] = Field(
        default_factory=lambda: [5.0, 10.0, 20.0], min_length=1, max_length=64, json_schema_extra=_UNIQUE)
    num_samples: int = Field(1, ge=1, le=1000, description="random/asha: trials drawn; grid: repeats of the grid")
    epochs: int | None = Field(None, ge=1, le=10_000, description="fine-tune epochs per trial; default igat.train")
    val_examples: int = Field(256, ge=1, le=1_000_000, description="equidistant validation examples scored")
    pgd_steps: int = Field(10, ge=1, le=10_000, description="PGD iterations of the score (eps/step from eval)")
    grace_period: int = Field(1, ge=1, le=10_000, description="asha: epochs before a trial may be stopped")
    reduction_factor: int = Field(2, ge=2, le=100, description="asha: halving rate")

    @model_validator(mode="after")
    def _distinct(self) -> TuneSpec:
        if len(set(self.alphas)) != len(self.alphas) or len(set(self.betas)) != len(self.betas):
            raise ValueError("alphas and betas must not repeat")
        return self


class ExperimentSpec(_Strict):
    name: str = Field("experiment", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    base: BaseSpec = Field(default_factory=BaseSpec)
    igat: IgatSpec = Field(default_factory=IgatSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tune: TuneSpec = Field(default_factory=TuneSpec)
    controls: list[ControlName] = Field(
        default_factory=list, max_length=2, json_schema_extra=_UNIQUE,
        description="equal-budget control models fine-tuned from the same base with iGAT's budget (igat.train, "
        "seed): continued (L_E alone), global_at (L_E + alpha * ensemble adversarial training on the same global "
        "adversarial examples); none repeated, and only with igat.enabled")

    @model_validator(mode="after")
    def _tune_needs_igat(self) -> ExperimentSpec:
        if self.tune.enabled and not self.igat.enabled:
            raise ValueError("tune.enabled needs igat.enabled: the search picks alpha/beta for the iGAT fine-tune")
        return self

    @model_validator(mode="after")
    def _controls_need_igat(self) -> ExperimentSpec:
        if len(set(self.controls)) != len(self.controls):
            raise ValueError("controls must not repeat")
        if self.controls and not self.igat.enabled:
            raise ValueError("controls need igat.enabled: each control gets the iGAT fine-tune's budget")
        return self


# ------------------------------------------------------------------------------------------------ ensemble size

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class SizeLimits:
    """The largest ensemble a submission may ask for (the service's IGAT_MAX_PARAMETERS and
    IGAT_MAX_ACTIVATION_BYTES default to these)."""

    max_parameters: int = 1_000_000_000
    max_activation_bytes: int = 64 * 2**30


DEFAULT_SIZE_LIMITS = SizeLimits()


@dataclass(frozen=True)
class EnsembleSize:
    """The members' parameters and the float32 activations of one forward pass over the largest batch the spec
    runs (igat_core.model_size says what is counted)."""

    members: int
    member: MemberSize
    batch_size: int

    @property
    def parameters(self) -> int:
        return self.members * self.member.parameters

    @property
    def activation_bytes(self) -> int:
        return self.members * self.member.activations * self.batch_size * FLOAT32_BYTES


def _whole_number(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def member_shape(spec: ExperimentSpec) -> MemberShape:
    """The member the runner builds: the dataset's shape, the ensemble's architecture and width, and the modules a
    base method adds (CLDL's hidden head on ResNet-20, SoE's auxiliary head; see their `configure_model`)."""
    info = dataset_info(spec.dataset.name)
    e, base = spec.ensemble, spec.base
    head_hidden = 0
    if base.method == "cldl" and e.architecture == "resnet20":
        head_hidden = _whole_number(base.params.get("head_hidden", CLDL_HEAD_HIDDEN))
    return MemberShape(e.architecture, info.channels, info.height, info.width, info.num_classes, e.width,
                       head_hidden, aux_head=base.method == "soe")


def ensemble_size(spec: ExperimentSpec) -> EnsembleSize:
    batches = [spec.eval.batch_size]
    if not spec.base.checkpoint:
        batches.append(spec.base.train.batch_size)
    if spec.igat.enabled:
        batches.append(spec.igat.train.batch_size)
    return EnsembleSize(spec.ensemble.members, member_size(member_shape(spec)), max(batches))


def _count(n: float) -> str:
    mantissa, exponent = f"{n:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 2**10:.3g} KiB"


def size_problems(spec: ExperimentSpec, limits: SizeLimits = DEFAULT_SIZE_LIMITS) -> list[tuple[str, str]]:
    """(field path, reason) when the ensemble's parameters or activations exceed `limits`; empty when it fits."""
    size = ensemble_size(spec)
    e = spec.ensemble
    what = f"{e.members} members x width {e.width} of {e.architecture} on {spec.dataset.name}"
    problems = []
    if size.parameters > limits.max_parameters:
        problems.append(("ensemble", f"{what} is about {_count(size.parameters)} parameters "
                         f"({_bytes(size.parameters * FLOAT32_BYTES)} in float32); the limit is "
                         f"{_count(limits.max_parameters)} (IGAT_MAX_PARAMETERS)"))
    if size.activation_bytes > limits.max_activation_bytes:
        problems.append(("ensemble", f"{what} at batch size {size.batch_size} keeps about "
                         f"{_bytes(size.activation_bytes)} of float32 activations in one forward pass; the limit is "
                         f"{_bytes(limits.max_activation_bytes)} (IGAT_MAX_ACTIVATION_BYTES): fewer members, a "
                         "smaller width or smaller batch sizes"))
    return problems


class SpecError(ValueError):
    """A spec that cannot be used; `problems` lists (field path, reason) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        super().__init__(f"invalid experiment spec {source}:\n{lines}")


def validation_problems(error: ValidationError) -> list[tuple[str, str]]:
    return [(".".join(str(p) for p in e["loc"]) or "(root)", e["msg"]) for e in error.errors()]


def parse_spec(data: Any, source: str = "<spec>") -> ExperimentSpec:
    if not isinstance(data, dict):
        raise SpecError(source, [("(root)", "expected a mapping of spec fields")])
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, validation_problems(exc)) from None


def load_spec(path: str | Path) -> ExperimentSpec:
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), [("(file)", exc.strerror or str(exc))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [("(yaml)", str(exc).replace("\n", " "))]) from None
    return parse_spec(data, str(path))


def dump_spec(spec: ExperimentSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
