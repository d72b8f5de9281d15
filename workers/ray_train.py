"""Ray Train: one training phase of the runner as a `TorchTrainer` over `resources.num_workers` workers.

Each worker runs igat_core's own loop (`igat_core.train.fit`) on its rank's shard of every global batch, and
averages gradients over the workers (gloo on CPU, NCCL on GPU) between backward and the optimiser step. The
members are not wrapped in DDP: the objectives call ensemble methods (member_logits, ...) that bypass a DDP
wrapper's forward, so the gradient average is done by hand, which gives every rank the global-batch step.
Every worker uses `resources.threads` torch threads, as `igat run` does (igat_core.runtime), so one worker
trains igat run's weights bit for bit.

Only rank 0 writes: the epoch checkpoint (`<checkpoint_dir>/last.pt`, which is also what a resumed phase starts
from), the run's metrics.jsonl line (Train V2 keeps no metrics reported without a checkpoint, so the runner's
own report callback does it), and the checkpoint it hands to `ray.train.report`. Run names are deterministic
(`<prefix>-<phase>` under `<run dir>/ray`), so a relaunched runner continues the same Ray Train run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from igat_core.defenses.base import MethodHooks
from igat_core.ensemble import Ensemble, ensemble_from_checkpoint
from igat_core.train import FitRequest, divergence_in, fit, load_last_checkpoint

Scorer = Callable[[Ensemble, torch.device], dict[str, float]]


@dataclass(frozen=True)
class RayScaling:
    """How one phase is spread over Ray: workers, their resources (`cpus_per_worker`: what Ray reserves for each,
    resources.worker_cpus, at least its threads; `threads`: each worker's torch intra-op threads,
    resources.threads; `channels_last`: the members' layout, resources.channels_last), and where Ray Train keeps
    its run state."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    storage_path: Path
    name_prefix: str
    max_failures: int = 0
    threads: int = 1
    channels_last: bool = False

    @classmethod
    def from_spec(cls, resources: Any, storage_path: Path, name_prefix: str) -> RayScaling:
        return cls(resources.num_workers, resources.use_gpu, resources.worker_cpus, storage_path, name_prefix,
                   threads=resources.threads, channels_last=resources.channels_last)

    def trial_resources(self) -> dict[str, float]:
        """What one training run holds while it runs (its workers; the driver or Tune trial needs 1 CPU more)."""
        return {"CPU": self.num_workers * self.cpus_per_worker, "GPU": float(self.num_workers if self.use_gpu else 0)}


@dataclass
class WorkerJob:
    """What every worker receives (pickled into the object store once)."""

    request: FitRequest
    use_gpu: bool
    threads: int
    scorer: Scorer | None = None


def allreduce_mean_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average .grad over the process group (one flat all-reduce; a rank without a gradient contributes zeros).

    A parameter no rank has a gradient for keeps .grad None, so the optimiser skips it as it would on one worker.
    """
    import torch.distributed as dist

    params = list(parameters)
    has_grad = torch.tensor([float(p.grad is not None) for p in params])
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad.to(grads[0].device, grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    flags = flat[flat.numel() - len(params):]
    for p, g, flag in zip(params, grads, flags.tolist()):
        if flag > 0:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            p.grad = g
        else:
            p.grad = None
        offset += g.numel()


def optimised_parameters(request: FitRequest) -> list[torch.nn.Parameter]:
    """The members' parameters and the method-owned ones (CLDL's label-confusion model)."""
    hooks = request.objective.parameters() if isinstance(request.objective, MethodHooks) else []
    return [*request.ensemble.parameters(), *hooks]


def check_replicas_agree(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Raise unless every rank holds the same parameters (compared through a sum and a sum of squares)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in parameters])
    fingerprint = torch.stack([flat.sum(), flat.square().sum()])
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.allclose(g, gathered[0], rtol=1e-9, atol=1e-9) for g in gathered):
        raise RuntimeError(f"the Ray Train workers' parameters diverged: {[g.tolist() for g in gathered]}")


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer: igat_core's fit on this rank's shard."""
    import ray.train
    import ray.train.torch

    job: WorkerJob = config["job"]
    request = job.request
    torch.set_num_threads(job.threads)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")

    def report(metrics: dict, checkpoint_dir: Path) -> None:
        extra: dict[str, float] = {}
        checkpoint = None
        if rank == 0:
            if job.scorer is not None:
                extra = job.scorer(request.ensemble, device)
            request.report({**metrics, **extra}, checkpoint_dir)
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report({**metrics, **extra}, checkpoint=checkpoint)

    fit(request.ensemble, request.objective, request.train, request.config, request.checkpoint_dir, device=device,
        report=report, rank=rank, world_size=world_size, progress=False, phase=request.phase,
        gradient_sync=allreduce_mean_gradients if world_size > 1 else None,
        events=request.progress_events() if rank == 0 else None)
    if world_size > 1:
        check_replicas_agree(optimised_parameters(request))


@dataclass
class RayTrainFit:
    """A `FitFn` for igat_core's Runner: the phase as a Ray Train run; the driver's ensemble ends up trained."""

    scaling: RayScaling
    callbacks: list[Any] = field(default_factory=list)
    scorer: Scorer | None = None
    run_name: str | None = None

    def name_for(self, phase: str) -> str:
        return self.run_name or f"{self.scaling.name_prefix}-{phase.replace('/', '_')}"

    def __call__(self, request: FitRequest) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        s = self.scaling
        if isinstance(request.objective, MethodHooks):
            request.objective.setup(request.ensemble)  # method-owned modules start identical on every worker
        worker_request = replace(request, device=torch.device("cpu"), progress=False)
        job = WorkerJob(worker_request, s.use_gpu, s.threads, self.scorer)
        request.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"job": job},
            torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                         resources_per_worker={"CPU": s.cpus_per_worker,
                                                               **({"GPU": 1.0} if s.use_gpu else {})}),
            run_config=RunConfig(name=self.name_for(request.phase), storage_path=str(s.storage_path),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=s.max_failures),
                                 callbacks=list(self.callbacks)),
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps a worker's error; a diverged loss is reported as itself
            diverged = divergence_in(exc)
            if diverged is None:
                raise
            raise diverged from None
        state = load_last_checkpoint(request.checkpoint_dir)
        if state is None:
            raise RuntimeError(f"{request.phase}: the Ray Train run wrote no checkpoint to {request.checkpoint_dir}")
        trained = ensemble_from_checkpoint(state["ensemble"])
        request.ensemble.load_state_dict(trained.state_dict())
        if isinstance(request.objective, MethodHooks) and state.get("method"):
            request.objective.load_state_dict(state["method"])
