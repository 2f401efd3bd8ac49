"""Datasets as device tensors: splits, scaling, class filtering, and the torchvision loaders on tiny
files written here (no download)."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets

from conftest import write_mnist_like
from dnnrun import data
from dnnrun.data import Arrays, DataConfig, load
from dnnrun.errors import DataError

CPU = torch.device("cpu")


def _ids_loader(n: int = 500, n_classes: int = 5):
    """Examples whose two features encode their own index, so splits can be traced back."""

    def loader(root, download):
        ids = torch.arange(n)
        x = torch.stack([ids // 256, ids % 256], dim=1).to(torch.uint8)
        return Arrays(x, ids % n_classes, None, None, max_value=255.0, n_classes=n_classes)

    return loader


@pytest.fixture
def ids_data(monkeypatch):
    monkeypatch.setitem(data.DATASETS, "ids", _ids_loader())
    return lambda **kw: load(DataConfig(name="ids", scaling="none", **kw), CPU)


def _ids(split) -> set[int]:
    x = split.x.long()
    return set((x[:, 0] * 256 + x[:, 1]).tolist())


def test_splits_are_disjoint_cover_everything_and_have_the_asked_sizes(ids_data):
    d = ids_data(val_size=0.1, test_size=100)
    assert (len(d.train), len(d.val), len(d.test)) == (360, 40, 100)
    train, val, test = _ids(d.train), _ids(d.val), _ids(d.test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(500))
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64


def test_the_validation_split_depends_only_on_split_seed(ids_data):
    torch.manual_seed(123)  # the training seed must not move examples between splits
    a = ids_data()
    torch.manual_seed(456)
    b = ids_data()
    c = ids_data(split_seed=1)
    assert _ids(a.val) == _ids(b.val)
    assert _ids(a.val) != _ids(c.val)


def test_classes_are_filtered_and_relabelled_in_the_given_order(ids_data):
    d = ids_data(classes=[3, 1])
    for split in (d.train, d.val, d.test):
        original = torch.tensor(sorted(_ids(split)))  # label = id % 5
        assert set((original % 5).tolist()) == {1, 3}
        ids = split.x[:, 0].long() * 256 + split.x[:, 1].long()
        assert torch.equal(split.y, torch.where(ids % 5 == 3, 0, 1))
    assert d.n_classes == 2


def test_a_class_that_does_not_exist_is_a_data_error(ids_data):
    with pytest.raises(DataError, match=r"data.classes: \[7\] are not labels of ids \(valid: 0..4\)"):
        ids_data(classes=[0, 7])


def test_max_train_caps_the_training_set_only(ids_data):
    d = ids_data(max_train=50)
    assert (len(d.train), len(d.val), len(d.test)) == (50, 40, 100)


def test_a_validation_split_that_leaves_nothing_is_a_data_error(ids_data):
    with pytest.raises(DataError, match="data.val_size"):
        ids_data(val_size=400)


def test_scaling():
    cfg = DataConfig(name="digits")
    standard = load(cfg, CPU)
    varying = standard.train.x.std(0) > 0
    assert torch.allclose(standard.train.x.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(standard.train.x.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4)
    unit = load(DataConfig(name="digits", scaling="unit"), CPU)
    assert unit.train.x.min() == 0 and unit.train.x.max() == 1  # digits' pixels run 0..16
    raw = load(DataConfig(name="digits", scaling="none"), CPU)
    assert torch.equal(raw.train.x, unit.train.x * 16)
    # The test split is scaled with the training set's statistics, not its own.
    mean, std = raw.train.x.mean(0), raw.train.x.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    assert torch.allclose(standard.test.x, (raw.test.x - mean) / std, atol=1e-5)


def test_digits_is_the_bundled_set():
    d = load(DataConfig(name="digits"), CPU)
    assert (len(d.train), len(d.val), len(d.test), d.n_features, d.n_classes) == (1294, 144, 359, 64, 10)


def test_synthetic_is_deterministic_and_configurable():
    a = load(DataConfig(name="synthetic", params={"n_samples": 300, "n_features": 8, "n_classes": 3}), CPU)
    b = load(DataConfig(name="synthetic", params={"n_samples": 300, "n_features": 8, "n_classes": 3}), CPU)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert (a.n_features, a.n_classes, len(a.train) + len(a.val) + len(a.test)) == (8, 3, 300)
    c = load(DataConfig(name="synthetic", params={"seed": 1}), CPU)
    d = load(DataConfig(name="synthetic"), CPU)
    assert not torch.equal(c.train.x, d.train.x)


def test_batches_are_index_slices_of_a_permutation():
    split = data.Split(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    batches = list(split.batches(4, torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)
    assert [y.tolist() for _, y in split.batches(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ---------------------------------------------------------------------------------------------
# torchvision loaders on tiny files


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_files_load_through_torchvision(tmp_path: Path, name, folder):
    arrays = write_mnist_like(tmp_path / folder / "raw")
    d = load(DataConfig(name=name, root=str(tmp_path), download=False, val_size=10, scaling="none"), CPU)
    assert (len(d.train), len(d.val), len(d.test), d.n_features, d.n_classes) == (30, 10, 12, 784, 10)
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].reshape(12, -1)).float()
    assert torch.equal(d.test.x, expected)  # the test split keeps its order and raw pixel values
    assert torch.equal(d.test.y, torch.arange(12) % 10)


def test_cifar10_batches_load_through_torchvision(tmp_path: Path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]):
        batch = {"data": rng.integers(0, 256, (6, 3072)).astype(np.uint8), "labels": [(i + j) % 10 for j in range(6)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    # torchvision checks each file's MD5 against the real CIFAR-10; these tiny files cannot match.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    d = load(DataConfig(name="cifar10", root=str(tmp_path), download=False, val_size=5, scaling="unit"), CPU)
    assert (len(d.train), len(d.val), len(d.test), d.n_features, d.n_classes) == (25, 5, 6, 3072, 10)
    assert 0 <= d.train.x.min() and d.train.x.max() <= 1


def test_missing_files_name_the_folder_and_the_files(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False), CPU)
    message = str(info.value)
    assert f"{tmp_path}/FashionMNIST/raw" in message and "data.download=false" in message
    assert "train-images-idx3-ubyte.gz" in message and "DNNRUN_DATA" in message


def test_a_failed_download_names_the_reason(tmp_path: Path, monkeypatch):
    def offline(self):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError, match="Name or service not known.*could not download them"):
        load(DataConfig(name="mnist", root=str(tmp_path), download=True), CPU)
