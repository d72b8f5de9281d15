"""What a dataset is without its data: shape, class count and normalisation, by name. Imports no torch, so the spec
estimates an ensemble's size from it (`igat_core.spec.ensemble_size`); `igat_core.data` loads the data."""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("digits", "mnist5k", "synthetic", "cifar10", "cifar100")


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, class count and the per-channel normalisation the models apply inside."""

    name: str
    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_INFO = {
    "digits": DatasetInfo("digits", 1, 8, 8, 10, (0.3053,), (0.3760,)),
    "mnist5k": DatasetInfo("mnist5k", 1, 28, 28, 10, (0.1313,), (0.3086,)),
    "synthetic": DatasetInfo("synthetic", 3, 8, 8, 10, (0.4934, 0.4998, 0.4938), (0.2002, 0.2003, 0.2015)),
    "cifar10": DatasetInfo("cifar10", 3, 32, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": DatasetInfo("cifar100", 3, 32, 32, 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


def check_dataset_name(name: str) -> None:
    if name not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about a dataset; loads no data."""
    check_dataset_name(name)
    return DATASET_INFO[name]


def input_shape_mismatch(channels: int, height: int, width: int, classes: int, name: str) -> str | None:
    """Why a model for `channels`x`height`x`width` images and `classes` classes cannot take dataset `name`'s
    examples, or None when it can."""
    info = dataset_info(name)
    if (info.channels, info.height, info.width, info.num_classes) == (channels, height, width, classes):
        return None
    return (f"takes {channels}x{height}x{width} images with {classes} classes, but {name} has "
            f"{info.channels}x{info.height}x{info.width} with {info.num_classes}")
