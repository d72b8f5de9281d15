"""Shared fixtures: small ensembles trained once per session on the real digits data."""

from __future__ import annotations

import pytest
import torch

from igat_core.data import dataset_info, load_dataset
from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble
from igat_core.models import ModelConfig
from igat_core.train import TrainConfig, fit


def digits_config(architecture: str = "small_cnn", width: int = 16) -> ModelConfig:
    info = dataset_info("digits")
    return ModelConfig(architecture, info.num_classes, info.channels, info.height, info.width, info.mean, info.std,
                       "relu", width)


@pytest.fixture(scope="session")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    return load_dataset("digits", "test")


@pytest.fixture(scope="session")
def trained_ensemble(digits_train, tmp_path_factory) -> Ensemble:
    """A plainly trained (undefended) 3-member small-CNN ensemble, about 97% natural accuracy on digits."""
    torch.manual_seed(0)
    ensemble = Ensemble(digits_config(), members=3)
    config = TrainConfig(epochs=12, batch_size=64, lr=0.05, milestones=(9,), seed=0)
    fit(ensemble, Plain(), digits_train, config, tmp_path_factory.mktemp("trained"), progress=False)
    return ensemble.eval()


from tests.ray_fixtures import ray_cluster, ray_driver  # noqa: E402,F401  (the shared local Ray, session-wide)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the attack and evaluation tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
