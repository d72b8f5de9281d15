"""The spec's size estimate (igat_core.model_size, igat_core.spec.ensemble_size) equals what the runner builds: the
exact parameter count of the ensemble, and the output elements of every leaf module one forward pass runs."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from igat_core.defenses import build_method
from igat_core.defenses.cldl import CLDL
from igat_core.ensemble import Ensemble
from igat_core.model_size import CLDL_HEAD_HIDDEN
from igat_core.runner import base_method_params, model_config
from igat_core.spec import SizeLimits, ensemble_size, parse_spec, size_problems


def built(spec) -> Ensemble:
    """The base ensemble the runner's pretrain phase builds for `spec`."""
    method = build_method(spec.base.method, base_method_params(spec))
    return Ensemble(method.configure_model(model_config(spec)), spec.ensemble.members, spec.ensemble.combiner)


def forward_activations(ensemble: Ensemble, spec) -> int:
    """Output elements of every leaf module the members' forward passes run on one example."""
    counted = [0]

    def count(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
        counted[0] += output[0].numel()

    leaves = [m for m in ensemble.members.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    info = ensemble.config
    with torch.no_grad():
        for member in ensemble.members:
            member(torch.zeros(1, info.in_channels, info.height, info.width_px))
    for hook in hooks:
        hook.remove()
    return counted[0]


CASES = [
    ("small_cnn", 4, "digits", "plain", {}),
    ("small_cnn", 37, "mnist5k", "soe", {}),
    ("small_cnn", 64, "cifar100", "cldl", {}),
    ("mlp", 5, "digits", "plain", {}),
    ("mlp", 50, "cifar10", "soe", {}),
    ("resnet20", 32, "digits", "plain", {}),
    ("resnet20", 32, "cifar10", "cldl", {}),
    ("resnet20", 32, "cifar100", "cldl", {"head_hidden": 13}),
    ("resnet20", 32, "mnist5k", "soe", {}),
]


@pytest.mark.parametrize("architecture,width,dataset,method,params", CASES)
def test_the_estimate_is_the_built_ensembles_size(architecture, width, dataset, method, params):
    spec = parse_spec({"dataset": {"name": dataset}, "base": {"method": method, "params": params},
                       "ensemble": {"members": 2, "architecture": architecture, "width": width}})
    ensemble = built(spec)
    size = ensemble_size(spec)
    assert size.parameters == sum(p.numel() for p in ensemble.parameters())
    assert size.members * size.member.activations == forward_activations(ensemble, spec)
    assert size.activation_bytes == 2 * size.member.activations * 512 * 4  # igat.train's default batch is the largest


def test_the_cldl_head_default_is_cldls():
    assert inspect.signature(CLDL).parameters["head_hidden"].default == CLDL_HEAD_HIDDEN


def test_the_batch_is_the_largest_one_the_spec_runs():
    spec = parse_spec({"base": {"checkpoint": "/x.pt"}, "igat": {"enabled": False}, "eval": {"batch_size": 7}})
    assert ensemble_size(spec).batch_size == 7
    spec = parse_spec({"base": {"train": {"epochs": 1, "lr": 0.1, "batch_size": 4096}}})
    assert ensemble_size(spec).batch_size == 4096


def test_size_problems_name_the_numbers_and_the_limits():
    spec = parse_spec({"ensemble": {"members": 64, "width": 4096}, "dataset": {"name": "cifar10"}})
    [(field, parameters), (_, activations)] = size_problems(spec)
    assert field == "ensemble"
    assert parameters == ("64 members x width 4096 of small_cnn on cifar10 is about 1.0e11 parameters (380 GiB in "
                          "float32); the limit is 1.0e9 (IGAT_MAX_PARAMETERS)")
    assert activations.startswith("64 members x width 4096 of small_cnn on cifar10 at batch size 512 keeps about "
                                  "3.14 TiB of float32 activations in one forward pass; the limit is 64 GiB")
    assert size_problems(spec, SizeLimits(max_parameters=10**12, max_activation_bytes=2**50)) == []
    assert size_problems(parse_spec({})) == []
