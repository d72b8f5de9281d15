"""igat_core.data: real offline datasets, split carving, CIFAR's on-disk format, augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from igat_core.data import (
    DATASETS,
    DatasetInfo,
    DatasetUnavailable,
    Split,
    augment_crop_flip,
    dataset_info,
    equidistant_indices,
    load_dataset,
    split_indices,
)

PACKAGE_DATASETS = {"digits": (1797, 1, 8), "mnist5k": (5000, 1, 28), "synthetic": (2500, 3, 8)}


@pytest.mark.parametrize("name", sorted(PACKAGE_DATASETS))
def test_package_dataset_shapes_dtypes_ranges(name: str) -> None:
    n_total, channels, side = PACKAGE_DATASETS[name]
    info = dataset_info(name)
    assert (info.channels, info.height, info.width, info.num_classes) == (channels, side, side, 10)
    sizes = 0
    for split in ("train", "val", "test"):
        part = load_dataset(name, split)
        assert isinstance(part, Split) and part.info == info
        assert part.images.shape == (len(part), channels, side, side)
        assert part.images.dtype == torch.float32 and part.images.is_contiguous()
        assert part.labels.dtype == torch.int64 and part.labels.shape == (len(part),)
        assert 0.0 <= part.images.min() and part.images.max() <= 1.0
        assert set(part.labels.tolist()) == set(range(10))
        sizes += len(part)
    assert sizes == n_total


@pytest.mark.parametrize("name", sorted(PACKAGE_DATASETS))
def test_normalisation_constants_match_the_data(name: str) -> None:
    info = dataset_info(name)
    everything = torch.cat([load_dataset(name, s).images for s in ("train", "val", "test")]).double()
    mean = everything.mean(dim=(0, 2, 3))
    std = everything.permute(1, 0, 2, 3).reshape(info.channels, -1).std(dim=1, unbiased=False)
    assert len(info.mean) == len(info.std) == info.channels
    assert torch.allclose(mean, torch.tensor(info.mean, dtype=torch.float64), atol=6e-5)
    assert torch.allclose(std, torch.tensor(info.std, dtype=torch.float64), atol=6e-5)


def test_digits_splits_are_disjoint_covering_and_stratified() -> None:
    parts = {s: split_indices("digits", s, val_fraction=0.1, seed=3) for s in ("train", "val", "test")}
    joined = torch.cat(list(parts.values()))
    assert joined.numel() == 1797 and torch.equal(joined.sort().values, torch.arange(1797))
    assert len(parts["test"]) == pytest.approx(0.2 * 1797, abs=10)
    assert len(parts["val"]) == round(0.1 * (1797 - len(parts["test"])))
    test_labels = load_dataset("digits", "test").labels
    per_class = torch.bincount(test_labels, minlength=10)
    full_per_class = torch.bincount(torch.cat([load_dataset("digits", s).labels for s in ("train", "val", "test")]))
    assert torch.all((per_class - 0.2 * full_per_class).abs() <= 0.5 + 1e-9)


def test_split_content_matches_the_source_at_its_indices() -> None:
    from sklearn.datasets import load_digits

    source = load_digits()
    idx = split_indices("digits", "val", seed=5)
    part = load_dataset("digits", "val", seed=5)
    expected = torch.tensor(source.images[idx.numpy()], dtype=torch.float32).unsqueeze(1) / 16
    assert torch.equal(part.images, expected)
    assert torch.equal(part.labels, torch.tensor(source.target[idx.numpy()], dtype=torch.int64))


def test_seed_changes_train_and_val_but_never_test() -> None:
    a = {s: split_indices("mnist5k", s, seed=0) for s in ("train", "val", "test")}
    b = {s: split_indices("mnist5k", s, seed=0) for s in ("train", "val", "test")}
    c = {s: split_indices("mnist5k", s, seed=1) for s in ("train", "val", "test")}
    for s in a:
        assert torch.equal(a[s], b[s])
    assert not torch.equal(a["train"], c["train"]) and not torch.equal(a["val"], c["val"])
    assert torch.equal(a["test"], c["test"])
    assert torch.equal(a["test"], split_indices("mnist5k", "test", val_fraction=0.3, seed=9))
    assert set(a["train"].tolist()) | set(a["val"].tolist()) == set(c["train"].tolist()) | set(c["val"].tolist())


def test_test_order_mixes_classes() -> None:
    labels = load_dataset("mnist5k", "test").labels
    assert len(set(labels[:50].tolist())) >= 8


def test_val_fraction_zero_and_train_limit() -> None:
    full = load_dataset("digits", "train", val_fraction=0.0)
    assert len(full) + len(load_dataset("digits", "test")) == 1797
    with pytest.raises(ValueError, match="val"):
        load_dataset("digits", "val", val_fraction=0.0)
    limited = load_dataset("digits", "train", seed=2, train_limit=100)
    assert len(limited) == 100
    assert torch.equal(limited.images, load_dataset("digits", "train", seed=2).images[:100])
    assert len(load_dataset("digits", "train", train_limit=10**6)) == len(load_dataset("digits", "train"))
    assert len(load_dataset("digits", "val", train_limit=5)) == len(load_dataset("digits", "val"))


def test_bad_arguments_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="digits.*mnist5k.*synthetic.*cifar10.*cifar100"):
        load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="train, val, test"):
        load_dataset("digits", "validation")
    with pytest.raises(ValueError, match="digits"):
        dataset_info("svhn")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", "train", val_fraction=1.0)
    with pytest.raises(ValueError, match="train_limit"):
        load_dataset("digits", "train", train_limit=-1)
    assert set(DATASETS) == {"digits", "mnist5k", "synthetic", "cifar10", "cifar100"}


def test_returned_tensors_are_fresh() -> None:
    first = load_dataset("synthetic", "train")
    reference = first.images.clone()
    first.images.zero_()
    first.labels.fill_(-1)
    second = load_dataset("synthetic", "train")
    assert torch.equal(second.images, reference) and second.labels.min() >= 0


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    train, test = load_dataset("synthetic", "train", val_fraction=0.0), load_dataset("synthetic", "test")
    assert (len(train), len(test)) == (2000, 500)
    means = torch.stack([train.images[train.labels == c].mean(0) for c in range(10)]).flatten(1)
    predicted = torch.cdist(test.images.flatten(1), means).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.5


def test_cifar_infos() -> None:
    c10, c100 = dataset_info("cifar10"), dataset_info("cifar100")
    assert isinstance(c10, DatasetInfo) and (c10.channels, c10.height, c10.width, c10.num_classes) == (3, 32, 32, 10)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2023, 0.1994, 0.2010)
    assert c100.num_classes == 100 and c100.mean == (0.5071, 0.4867, 0.4408) and c100.std == (0.2675, 0.2565, 0.2761)


def test_equidistant_indices() -> None:
    assert torch.equal(equidistant_indices(10000, 1000), torch.arange(0, 10000, 10))
    assert torch.equal(equidistant_indices(7, 3), torch.tensor([0, 2, 4]))
    assert torch.equal(equidistant_indices(5, 50), torch.arange(5))
    assert equidistant_indices(5, 0).numel() == 0 and equidistant_indices(0, 3).numel() == 0
    assert equidistant_indices(10, 3).dtype == torch.int64


def _asymmetric_batch(n: int, channels: int = 2, h: int = 6, w: int = 5) -> torch.Tensor:
    ramp = torch.arange(n * channels * h * w, dtype=torch.float32).reshape(n, channels, h, w)
    return ramp / ramp.max()


def test_augment_keeps_shape_range_and_is_deterministic() -> None:
    images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = augment_crop_flip(images, torch.Generator().manual_seed(7))
    b = augment_crop_flip(images, torch.Generator().manual_seed(7))
    c = augment_crop_flip(images, torch.Generator().manual_seed(8))
    assert a.shape == images.shape and a.dtype == images.dtype
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, images)


def test_augment_without_padding_flips_exactly_like_torch_flip() -> None:
    images = _asymmetric_batch(32)
    out = augment_crop_flip(images, torch.Generator().manual_seed(1), padding=0)
    flipped = [i for i in range(32) if not torch.equal(out[i], images[i])]
    assert 0 < len(flipped) < 32
    for i in range(32):
        expected = torch.flip(images[i], dims=(-1,)) if i in flipped else images[i]
        assert torch.equal(out[i], expected)


def test_augment_output_is_a_crop_of_the_zero_padded_image() -> None:
    images = _asymmetric_batch(24) + 0.1
    padding = 2
    out = augment_crop_flip(images, torch.Generator().manual_seed(3), padding=padding)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    h, w = images.shape[-2:]
    seen_flip, seen_offsets = set(), set()
    for i in range(len(images)):
        matches = []
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                crop = padded[i, :, dy : dy + h, dx : dx + w]
                for flip, view in ((False, crop), (True, crop.flip(-1))):
                    if torch.equal(out[i], view):
                        matches.append((dy, dx, flip))
        assert len(matches) == 1
        seen_offsets.add(matches[0][:2])
        seen_flip.add(matches[0][2])
    assert seen_flip == {False, True} and len(seen_offsets) > 5


def _write_pickle(path: Path, entry: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(entry, f)


def _write_fake_cifar(root: Path, name: str, per_file: int, str_keys: bool = False) -> dict[str, np.ndarray]:
    """Writes CIFAR's on-disk layout with random content; returns the concatenated train/test arrays."""
    rng = np.random.RandomState(0)

    def key(k: str) -> str | bytes:
        return k if str_keys else k.encode()

    if name == "cifar10":
        folder, test_file, meta = root / "cifar-10-batches-py", "test_batch", "batches.meta"
        train_files, num_classes, label_key = [f"data_batch_{i}" for i in range(1, 6)], 10, "labels"
    else:
        folder, test_file, meta = root / "cifar-100-python", "test", "meta"
        train_files, num_classes, label_key = ["train"], 100, "fine_labels"
    folder.mkdir(parents=True)
    arrays: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for file, part in [*((f, "train") for f in train_files), (test_file, "test")]:
        n = per_file * (5 if name == "cifar100" and part == "train" else 1)
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = rng.randint(0, num_classes, size=n)
        entry = {key("batch_label"): b"fake", key("data"): data, key(label_key): labels.tolist()}
        if name == "cifar100":
            entry[key("coarse_labels")] = (labels // 5).tolist()
        _write_pickle(folder / file, entry)
        arrays[f"{part}_x"].append(data)
        arrays[f"{part}_y"].append(labels)
    _write_pickle(folder / meta, {key("label_names"): [b"x"] * num_classes})
    return {k: np.concatenate(v) for k, v in arrays.items()}


@pytest.mark.parametrize(("name", "str_keys"), [("cifar10", False), ("cifar10", True), ("cifar100", False)])
def test_cifar_reads_the_on_disk_format(tmp_path: Path, name: str, str_keys: bool) -> None:
    truth = _write_fake_cifar(tmp_path, name, per_file=6, str_keys=str_keys)
    test = load_dataset(name, "test", data_root=tmp_path)
    assert test.images.shape == (6, 3, 32, 32) and test.images.dtype == torch.float32
    assert torch.equal(test.images, torch.from_numpy(truth["test_x"]).reshape(-1, 3, 32, 32).float() / 255)
    assert torch.equal(test.labels, torch.from_numpy(truth["test_y"]).long())
    train = load_dataset(name, "train", data_root=tmp_path, val_fraction=0.2, seed=4)
    val = load_dataset(name, "val", data_root=tmp_path, val_fraction=0.2, seed=4)
    assert (len(train), len(val)) == (24, 6)
    idx = torch.cat([split_indices(name, s, data_root=tmp_path, val_fraction=0.2, seed=4) for s in ("train", "val")])
    assert torch.equal(idx.sort().values, torch.arange(30))
    all_train = torch.from_numpy(truth["train_x"]).reshape(-1, 3, 32, 32).float() / 255
    assert torch.equal(torch.cat([train.images, val.images]), all_train[idx])
    assert torch.equal(torch.cat([train.labels, val.labels]), torch.from_numpy(truth["train_y"]).long()[idx])
    assert train.info == dataset_info(name)


def test_cifar_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake_cifar(tmp_path / "elsewhere", "cifar10", per_file=2)
    monkeypatch.setenv("IGAT_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert len(load_dataset("cifar10", "train", val_fraction=0.0)) == 10


@pytest.mark.parametrize(("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_raises_one_clear_error(tmp_path: Path, name: str, folder: str) -> None:
    root = tmp_path / "nothing here"
    with pytest.raises(DatasetUnavailable) as excinfo:
        load_dataset(name, "test", data_root=root)
    message = str(excinfo.value)
    assert str(root.resolve()) in message and folder in message
    assert "IGAT_DATA_ROOT" in message and "download=True" in message
    assert isinstance(excinfo.value, RuntimeError)


def test_corrupted_cifar_raises_dataset_unavailable(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path, "cifar10", per_file=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetUnavailable, match=str(tmp_path.resolve())):
        load_dataset("cifar10", "train", data_root=tmp_path)
