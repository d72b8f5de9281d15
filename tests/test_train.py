"""The training loop: it learns, checkpoints every epoch, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble
from igat_core.igat import IgatConfig, IgatObjective
from igat_core.train import TrainConfig, batch_indices, fit
from tests.conftest import digits_config


def fresh_ensemble(width: int = 8) -> Ensemble:
    torch.manual_seed(3)
    return Ensemble(digits_config(width=width), members=2)


def weights(ensemble: Ensemble) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in ensemble.parameters()])


def test_loss_falls_and_lr_follows_the_milestones(digits_train, tmp_path):
    calls = []
    config = TrainConfig(epochs=4, batch_size=32, lr=0.1, milestones=(3, 4), gamma=0.1)
    result = fit(fresh_ensemble(width=16), Plain(), digits_train, config, tmp_path, progress=False,
                 report=lambda m, d: calls.append((m, d)))
    losses = [m["loss"] for m in result.history]
    assert losses[-1] < losses[0] * 0.5
    assert [round(m["lr"], 6) for m in result.history] == [0.1, 0.1, 0.1, 0.01]
    assert [m["epoch"] for m, _ in calls] == [1, 2, 3, 4] and calls[0][1] == tmp_path
    assert (tmp_path / "last.pt").exists()


def test_resumed_training_matches_uninterrupted_training(digits_train, tmp_path):
    objective = IgatObjective(Plain(), IgatConfig(eps=0.1, step=0.05, steps=2))
    subset = type(digits_train)(digits_train.images[:256], digits_train.labels[:256], digits_train.info)
    full = fresh_ensemble()
    fit(full, objective, subset, TrainConfig(epochs=3, batch_size=64, lr=0.05, milestones=(2,)), tmp_path / "a",
        progress=False)
    interrupted = fresh_ensemble()
    fit(interrupted, objective, subset, TrainConfig(epochs=2, batch_size=64, lr=0.05, milestones=(2,)),
        tmp_path / "b", progress=False)
    resumed = fresh_ensemble()
    result = fit(resumed, objective, subset, TrainConfig(epochs=3, batch_size=64, lr=0.05, milestones=(2,)),
                 tmp_path / "b", progress=False)
    assert result.epochs_run == 1 and result.history[0]["epoch"] == 3
    assert torch.allclose(weights(resumed), weights(full), atol=1e-6)


def test_batches_shard_the_permutation_across_workers():
    g = torch.Generator().manual_seed(0)
    whole = torch.cat(batch_indices(10, 4, g, 0, 1))
    parts = [torch.cat(batch_indices(10, 4, torch.Generator().manual_seed(0), r, 2)) for r in (0, 1)]
    assert sorted(whole.tolist()) == list(range(10))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert set(parts[0].tolist()).isdisjoint(parts[1].tolist())


def test_a_diverging_loss_stops_the_run_at_that_epoch_and_batch_naming_the_learning_rate(tmp_path):
    """ADP at lr 10 (inside the spec's bounds) blows up within a few epochs of the tiny experiment: training stops
    at the first non-finite loss, before its step; the last checkpoint and every metric are finite, and the run's
    events say why it failed."""
    from igat_core.rundir import checkpoint_dir, read_json
    from igat_core.runner import run_experiment
    from igat_core.spec import parse_spec
    from igat_core.train import TrainingDiverged, last_checkpoint_epoch
    from tests.service_fixtures import DIVERGING_EXPERIMENT, read_jsonl

    with pytest.raises(TrainingDiverged) as caught:
        run_experiment(parse_spec(DIVERGING_EXPERIMENT), tmp_path, progress=False)
    diverged = caught.value
    assert diverged.phase == "pretrain" and diverged.lr == 10.0 and not math.isfinite(diverged.loss)
    assert 1 < diverged.epoch <= DIVERGING_EXPERIMENT["base"]["train"]["epochs"]
    assert 1 <= diverged.batch <= diverged.batches == 2
    assert str(diverged) == (f"training diverged: the pretrain loss became {diverged.loss} at epoch {diverged.epoch}, "
                             f"batch {diverged.batch} of 2; the learning rate is likely too high (lr=10): lower it")
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, diverged.epoch))
    assert all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))
    assert last_checkpoint_epoch(checkpoint_dir(tmp_path, "base")) == diverged.epoch - 1
    assert read_jsonl(tmp_path / "events.jsonl")[-1] == {
        **read_jsonl(tmp_path / "events.jsonl")[-1], "phase": "pretrain", "event": "failed",
        "message": f"pretrain failed: {diverged}", "error": "TrainingDiverged"}
    assert read_json(tmp_path / "state.json") is None  # no phase finished
    assert pickle.loads(pickle.dumps(diverged)).args == diverged.args


def test_a_divergence_is_found_inside_the_errors_that_wrap_it():
    from igat_core.train import TrainingDiverged, divergence_in

    original = TrainingDiverged("igat", 3, 2, 4, math.nan, 0.5)

    class WorkerError(Exception):  # the shape of Ray's errors: the worker's exception as `cause`
        def __init__(self, cause):
            super().__init__("a worker failed:\nTraceback ...")
            self.cause = cause

    class GroupError(Exception):
        def __init__(self, failures):
            super().__init__("training failed")
            self.worker_failures = failures

    try:
        raise GroupError({0: WorkerError(original)}) from RuntimeError("controller")
    except GroupError as exc:
        found = divergence_in(exc)
    assert found is not None and found.args == original.args and found.__cause__ is None
    assert divergence_in(RuntimeError("something else")) is None


def conv_output_dtypes_of_a_step(digits_train, tmp_path, precision: str) -> tuple[set[torch.dtype], Ensemble]:
    """The dtypes member 0's first convolution outputs during one iGAT training step at `precision`."""
    ensemble = fresh_ensemble()
    seen: set[torch.dtype] = set()
    ensemble.members[0].net.features[0].register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    subset = type(digits_train)(digits_train.images[:32], digits_train.labels[:32], digits_train.info)
    objective = IgatObjective(Plain(), IgatConfig(eps=0.1, step=0.05, steps=2))
    fit(ensemble, objective, subset, TrainConfig(epochs=1, batch_size=32, lr=0.05, precision=precision), tmp_path,
        progress=False)
    return seen, ensemble


def test_bf16_precision_runs_the_training_step_and_its_global_pgd_in_bfloat16(digits_train, tmp_path):
    seen, ensemble = conv_output_dtypes_of_a_step(digits_train, tmp_path / "bf16", "bf16")
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in ensemble.parameters())
    fp32_seen, _ = conv_output_dtypes_of_a_step(digits_train, tmp_path / "fp32", "fp32")
    assert fp32_seen == {torch.float32}
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(epochs=1, precision="fp16")


def test_fp32_precision_is_bit_identical_to_a_plain_step(digits_train, tmp_path):
    """fit at fp32 against the step written out by hand (objective, backward, SGD step) without any autocast."""
    from igat_core.train import epoch_seed, make_optimizer

    config = TrainConfig(epochs=1, batch_size=32, lr=0.05, seed=2, precision="fp32")
    subset = type(digits_train)(digits_train.images[:32], digits_train.labels[:32], digits_train.info)
    objective = IgatObjective(Plain(), IgatConfig(eps=0.1, step=0.05, steps=2))
    trained = fresh_ensemble()
    fit(trained, objective, subset, config, tmp_path, progress=False)
    reference = fresh_ensemble().train()
    optimizer, _ = make_optimizer(reference, config)
    generator = torch.Generator().manual_seed(epoch_seed(config.seed, 1))
    idx, = batch_indices(32, 32, generator)
    objective(reference, subset.images[idx], subset.labels[idx], generator).loss.backward()
    optimizer.step()
    assert torch.equal(weights(trained), weights(reference))
