"""Ray Train: igat_core's loop as a 2-worker CPU TorchTrainer (gloo) against one worker, same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from igat_core.data import load_dataset
from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble
from igat_core.train import FitRequest, TrainConfig, batch_indices
from tests.conftest import digits_config


def test_every_rank_gets_the_same_number_of_batches_of_one_shared_permutation():
    for n, batch, world in [(1293, 64, 2), (641, 64, 2), (100, 32, 3), (10, 4, 2)]:
        shards = [batch_indices(n, batch, torch.Generator().manual_seed(5), r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1, (n, batch, world)
        whole = batch_indices(n, batch, torch.Generator().manual_seed(5))
        for step, global_batch in enumerate(whole):
            if len(global_batch) >= world:
                merged = torch.cat([s[step] for s in shards])
                assert sorted(merged.tolist()) == sorted(global_batch.tolist())


def _fit_on_ray(tmp_path: Path, workers: int, train, config: TrainConfig) -> tuple[Ensemble, Path]:
    from workers.ray_train import RayScaling, RayTrainFit
    from workers.runner import MetricsWriter

    torch.manual_seed(0)
    ensemble = Ensemble(digits_config(), members=2)
    run_dir = tmp_path / f"w{workers}"
    run_dir.mkdir()
    scaling = RayScaling(workers, False, 1.0, run_dir / "ray", f"test-w{workers}")
    request = FitRequest("pretrain", ensemble, Plain(), train, config, run_dir / "checkpoints" / "base",
                         torch.device("cpu"), MetricsWriter(run_dir), progress=False)
    RayTrainFit(scaling)(request)
    return ensemble.eval(), run_dir


def _accuracy(ensemble: Ensemble, split) -> float:
    with torch.no_grad():
        return float((ensemble(split.images).argmax(1) == split.labels).float().mean()) * 100


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_workers_reach_the_accuracy_of_one_with_the_same_global_batch(ray_driver, tmp_path):
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    config = TrainConfig(epochs=6, batch_size=64, lr=0.05, milestones=(5,), seed=0)
    one, one_dir = _fit_on_ray(tmp_path, 1, train, config)
    two, two_dir = _fit_on_ray(tmp_path, 2, train, config)
    acc_one, acc_two = _accuracy(one, test), _accuracy(two, test)
    print(f"digits test accuracy: 1 worker {acc_one:.2f}%, 2 workers {acc_two:.2f}%")
    assert acc_one > 85 and acc_two > 85
    assert abs(acc_one - acc_two) <= 3.0

    for run_dir, name in ((one_dir, "test-w1-pretrain"), (two_dir, "test-w2-pretrain")):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in lines] == [1, 2, 3, 4, 5, 6], "rank 0 alone writes one line per epoch"
        assert torch.load(run_dir / "checkpoints/base/last.pt", weights_only=True)["epoch"] == 6
        assert sorted(p.name for p in (run_dir / "ray" / name).glob("checkpoint_*")), "checkpoints reached Ray"
    # the loss every worker minimises is the global batch's: the 2-worker history tracks the 1-worker one
    first = [json.loads(x)["loss"] for x in (one_dir / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(x)["loss"] for x in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert second[-1] < second[0] / 2 and abs(first[-1] - second[-1]) < 0.25


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_method_with_its_own_parameters_trains_on_two_workers_that_stay_identical(ray_driver, tmp_path):
    from workers.ray_train import RayScaling, RayTrainFit
    from workers.runner import MetricsWriter

    from igat_core.data import Split
    from igat_core.defenses import build_method

    digits = load_dataset("digits", "train")
    train = Split(digits.images[:512], digits.labels[:512], digits.info)
    method = build_method("cldl", {})
    torch.manual_seed(0)
    ensemble = Ensemble(method.configure_model(digits_config()), members=2)
    request = FitRequest("pretrain", ensemble, method, train,
                         TrainConfig(epochs=2, batch_size=64, lr=0.01, optimizer="adam", seed=0),
                         tmp_path / "checkpoints", torch.device("cpu"), MetricsWriter(tmp_path), progress=False)
    RayTrainFit(RayScaling(2, False, 1.0, tmp_path / "ray", "test-cldl"))(request)  # raises if the ranks diverged

    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and losses[1] < losses[0]
    state = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state["method"]) == {"lcm"}
    assert all(torch.isfinite(t).all() for t in state["method"]["lcm"].values())


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["dverge", "soe"])
def test_methods_with_member_optimisers_or_routing_heads_train_on_two_workers_then_igat(name, ray_driver, tmp_path):
    from workers.ray_train import RayScaling, RayTrainFit
    from workers.runner import MetricsWriter

    from igat_core.data import Split
    from igat_core.defenses import build_method
    from igat_core.igat import IgatConfig, IgatObjective
    from tests.test_defenses_training import FAST

    digits = load_dataset("digits", "train")
    train = Split(digits.images[:256], digits.labels[:256], digits.info)
    method = build_method(name, FAST[name])
    torch.manual_seed(0)
    ensemble = Ensemble(method.configure_model(digits_config(width=8)), members=3)
    method.setup(ensemble)
    phases = [("pretrain", method, TrainConfig(epochs=1, batch_size=32, lr=0.01, optimizer="adam", seed=0)),
              ("igat", IgatObjective(method, IgatConfig(*method.igat_defaults, eps=0.1, step=0.05, steps=2)),
               TrainConfig(epochs=1, batch_size=64, lr=0.01, seed=0))]
    for phase, objective, config in phases:  # each raises if the two ranks' parameters diverged
        request = FitRequest(phase, ensemble, objective, train, config, tmp_path / phase, torch.device("cpu"),
                             MetricsWriter(tmp_path, phase), progress=False)
        RayTrainFit(RayScaling(2, False, 1.0, tmp_path / "ray", f"test-{name}-{phase}"))(request)

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["pretrain", "igat"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any(k.startswith("base_") for k in rows[1]) and "global_adv_loss" in rows[1]
    state = torch.load(tmp_path / "igat" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["method"].keys() == method.state_dict().keys()


def test_gradient_average_keeps_unused_parameters_without_a_gradient(tmp_path):
    import torch.distributed as dist

    from workers.ray_train import allreduce_mean_gradients

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        (used * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        allreduce_mean_gradients([used, unused])
        assert torch.equal(used.grad, torch.tensor([1.0, 2.0, 3.0]))
        assert unused.grad is None
        optimizer = torch.optim.SGD([used, unused], lr=0.1, weight_decay=0.5)
        optimizer.step()
        assert torch.equal(unused.detach(), torch.ones(2)), "weight decay must not move a parameter without a gradient"
    finally:
        dist.destroy_process_group()
