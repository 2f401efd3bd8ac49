"""Datasets as device tensors: splits, scaling, class filtering, and the torchvision loaders on tiny
files written here (no download)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import re
import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets

from conftest import compose_raw, run_cli, write_cifar_like, write_idx, write_mnist_like
from dnnrun.config.run_config import parse_run_config
from dnnrun.data import datasets as data
from dnnrun.data.datasets import Arrays, DataConfig, load
from dnnrun.errors import ConfigError, DataError

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


def test_val_from_end_takes_the_file_s_last_examples_before_the_classes_filter(monkeypatch):
    """As the book (X_train_full[-5000:], then the tasks' classes): the tail of the training file,
    in its order, then filtered; max_train keeps the first examples of what is left."""
    monkeypatch.setitem(data.DATASETS, "ids", _ids_loader())
    x_test, y_test = torch.zeros(10, 2, dtype=torch.uint8), torch.arange(10) % 5
    monkeypatch.setitem(
        data.DATASETS,
        "ids_test",
        lambda root, download: dataclasses.replace(_ids_loader()(root, download), x_test=x_test, y_test=y_test),
    )
    cfg = dict(scaling="none", val_from="end", val_size=100)
    d = load(DataConfig(name="ids_test", **cfg), CPU)
    assert _ids(d.val) == set(range(400, 500)) and _ids(d.train) == set(range(400))
    d = load(DataConfig(name="ids_test", classes=[3, 1], max_train=7, **cfg), CPU)
    assert _ids(d.val) == {i for i in range(400, 500) if i % 5 in (1, 3)}
    assert sorted(_ids(d.train)) == [1, 3, 6, 8, 11, 13, 16]
    # without a test file (digits): the tail first, then the test split drawn from the rest
    d = load(DataConfig(name="ids", **cfg, test_size=50), CPU)
    assert _ids(d.val) == set(range(400, 500)) and len(d.test) == 50 and len(d.train) == 350
    d = load(DataConfig(name="ids", scaling="none", val_from="end", val_size=0.1, test_size=0.2), CPU)
    assert (len(d.train), len(d.val), len(d.test)) == (360, 40, 100)  # the same sizes as val_from=random
    assert _ids(d.val) == set(range(460, 500))
    with pytest.raises(DataError, match="data.val_size"):
        load(DataConfig(name="ids_test", scaling="none", val_from="end", val_size=500), CPU)


def test_a_validation_split_that_leaves_nothing_is_a_data_error(ids_data):
    with pytest.raises(DataError, match="data.val_size"):
        ids_data(val_size=400)


def test_scaling():
    cfg = DataConfig(name="digits")
    standard = load(cfg, CPU)
    varying = standard.train.x.std(0) > 0
    assert standard.shape == (1, 8, 8) and standard.train.x.shape[1:] == (1, 8, 8)  # images stay images
    assert torch.allclose(standard.train.x.mean(0), torch.zeros(1, 8, 8), atol=1e-5)  # per pixel
    assert torch.allclose(standard.train.x.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4)
    unit = load(DataConfig(name="digits", scaling="unit"), CPU)
    assert unit.train.x.min() == 0 and unit.train.x.max() == 1  # digits' pixels run 0..16
    raw = load(DataConfig(name="digits", scaling="none"), CPU)
    assert torch.equal(raw.train.x, unit.train.x * 16)
    # The test split is scaled with the training set's statistics, not its own.
    mean, std = raw.train.x.mean(0), raw.train.x.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    assert torch.allclose(standard.test.x, (raw.test.x - mean) / std, atol=1e-5)


@pytest.mark.parametrize("features", [[0, 1, 2], [1]], ids=["three", "one"])
def test_a_feature_constant_in_training_is_only_centred(monkeypatch, features):
    """As scikit-learn's StandardScaler: scale 1 where the training std is (within rounding of) 0, so
    a test value there stays value - mean instead of being divided by ~0."""
    rng = torch.Generator().manual_seed(0)
    x = torch.stack([torch.zeros(200), torch.full((200,), 1234.567), torch.rand(200, generator=rng) * 255], dim=1)
    x_test = torch.tensor([[1.0, 1235.567, 100.0], [0.0, 1234.567, 50.0]])
    monkeypatch.setitem(
        data.DATASETS,
        "consts",
        lambda root, download: Arrays(
            x[:, features],
            torch.arange(200) % 2,
            x_test[:, features],
            torch.tensor([0, 1]),
            max_value=255.0,
            n_classes=2,
        ),
    )
    d = load(DataConfig(name="consts", val_size=10), CPU)
    constant = [i for i, f in enumerate(features) if f < 2]
    # Taken directly, a lone float32 feature of 1234.567 has a std of ~1e-4 on the CPU: dividing by it gave ~8000.
    assert torch.equal(
        d.test.x[:, constant], torch.tensor([[1.0, 1.0], [0.0, 0.0]])[:, [features[i] for i in constant]]
    )
    assert torch.equal(d.train.x[:, constant], torch.zeros(190, len(constant)))
    if 2 in features:  # a varying feature is still scaled to std 1
        assert torch.allclose(d.train.x[:, -1].std(), torch.tensor(1.0), atol=1e-4)


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


def _config_problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:  # a UserError: the CLI exits 2 before anything is trained
        parse_run_config(compose_raw("data=synthetic", *overrides))
    return info.value.problems


@pytest.mark.parametrize(
    "override", ["data.split_seed=-1", "data.split_seed=4294967296", "data.seed=-1", "data.seed=4294967296"]
)
def test_seeds_outside_0_to_2_to_the_32_are_config_problems(override):
    key = override.split("=")[0]
    assert _config_problems(override) == [f"{key}: must be in [0, 2**32), got {override.split('=')[1]}"]


def test_the_largest_seeds_are_accepted():
    cfg = parse_run_config(compose_raw("data=synthetic", "data.split_seed=4294967295", "data.seed=4294967295"))
    assert (cfg.data.split_seed, cfg.data.params["seed"]) == (2**32 - 1, 2**32 - 1)


def test_the_synthetic_settings_are_range_checked_together():
    problems = _config_problems(
        "data.n_samples=-5", "data.n_features=0", "data.n_classes=0", "data.noise=-1", "data.split_seed=-2"
    )
    assert sorted(problems) == [
        "data.n_classes: must be >= 2, got 0",
        "data.n_features: must be > 0, got 0",
        "data.n_samples: must be > 0, got -5",
        "data.noise: must be >= 0, got -1.0",
        "data.split_seed: must be in [0, 2**32), got -2",
    ]
    assert _config_problems("data.n_samples=3", "data.n_classes=4") == [
        "data.n_samples: must be >= n_classes (4) so that every class has an example, got 3"
    ]


@pytest.mark.parametrize("sizes", [(0.2, 0.1), (3, 2), (0.5, 0.4)])  # fractions adding up to 1: refused apart
def test_too_few_synthetic_examples_are_a_config_problem_exactly_when_load_could_not_split_them(sizes):
    test_size, val_size = sizes
    for n in range(2, 9):
        overrides = [
            f"data.n_samples={n}",
            "data.n_classes=2",
            f"data.test_size={test_size}",
            f"data.val_size={val_size}",
        ]
        try:
            cfg = parse_run_config(compose_raw("data=synthetic", *overrides)).data
        except ConfigError as exc:
            assert exc.problems == [
                f"data.n_samples: {n} examples leave none for training after data.test_size "
                f"({test_size:g}) and data.val_size ({val_size:g}); raise it"
            ]
            with pytest.raises(DataError):
                load(
                    DataConfig(
                        name="synthetic",
                        test_size=test_size,
                        val_size=val_size,
                        params={"n_samples": n, "n_classes": 2},
                    ),
                    CPU,
                )
        else:
            assert len(load(cfg, CPU).train) >= 1


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
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].reshape(12, 1, 28, 28)).float()
    assert torch.equal(d.test.x, expected)  # the test split keeps its order and raw pixel values
    assert torch.equal(d.test.y, torch.arange(12) % 10)


def test_cifar10_batches_load_through_torchvision(tmp_path: Path, cifar_files_accepted):
    written = write_cifar_like(tmp_path)
    d = load(DataConfig(name="cifar10", root=str(tmp_path), download=False, val_size=5, scaling="none"), CPU)
    assert (len(d.train), len(d.val), len(d.test), d.n_features, d.n_classes) == (25, 5, 6, 3072, 10)
    assert d.shape == (3, 32, 32)  # each channel's plane where the file has it
    assert torch.equal(d.test.x, torch.from_numpy(written["test_batch"].reshape(6, 3, 32, 32)).float())


def _missing(name: str, root: Path, download: bool) -> str:
    with pytest.raises(DataError) as info:
        load(DataConfig(name=name, root=str(root), download=download), CPU)
    return str(info.value)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails, as on a machine without one."""

    def refuse(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", refuse)
    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve", refuse)


def test_missing_files_name_the_folder_and_the_files(tmp_path: Path, offline):
    message = _missing("fashion_mnist", tmp_path, download=False)
    assert (
        f"put the unpacked train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte in {tmp_path}/FashionMNIST/raw." in message
    )
    assert "only with data.download=true" in message and "DNNRUN_DATA" in message
    message = _missing("fashion_mnist", tmp_path, download=True)
    assert (
        f"put the official train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz (from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/) in "
        f"{tmp_path}/FashionMNIST/raw: data.download=true then" in message
    )
    message = _missing("cifar10", tmp_path, download=False)
    assert f"put the unpacked cifar-10-batches-py/ in {tmp_path}." in message and "cifar-10-python.tar.gz" in message


def test_the_advice_for_download_false_loads(tmp_path: Path, offline):
    """Files written under exactly the names and folder the message gives load with data.download=false."""
    names, where = re.search(r"put the unpacked (.+) in (\S+)\. ", _missing("fashion_mnist", tmp_path, False)).groups()
    made = write_mnist_like(tmp_path / "made")
    Path(where).mkdir(parents=True)
    for name in names.split(", "):
        shutil.copy(tmp_path / "made" / name, where)
    assert sorted(names.split(", ")) == sorted(made)
    d = load(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False, val_size=10, scaling="none"), CPU)
    assert torch.equal(d.test.x, torch.from_numpy(made["t10k-images-idx3-ubyte"].reshape(12, 1, 28, 28)).float())


def test_the_advice_for_download_true_loads_offline(tmp_path: Path, offline, monkeypatch):
    """Archives placed under the names the message gives are checked and unpacked without the network."""
    names, where = re.search(
        r"put the official (.+) \(from \S+\) in (\S+): ", _missing("fashion_mnist", tmp_path, True)
    ).groups()
    made = write_mnist_like(tmp_path / "made")
    md5 = {}
    for name in names.split(", "):
        archive = Path(where) / name
        archive.write_bytes(gzip.compress((tmp_path / "made" / name.removesuffix(".gz")).read_bytes()))
        md5[name] = hashlib.md5(archive.read_bytes()).hexdigest()
    # Tiny archives cannot have the real Fashion-MNIST MD5s: torchvision is given theirs, under its own names.
    resources = [(name, md5[name]) for name, _ in torchvision.datasets.FashionMNIST.resources]
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", resources)
    d = load(DataConfig(name="fashion_mnist", root=str(tmp_path), download=True, val_size=10, scaling="none"), CPU)
    assert torch.equal(d.test.x, torch.from_numpy(made["t10k-images-idx3-ubyte"].reshape(12, 1, 28, 28)).float())


def test_a_failed_download_names_the_reason(tmp_path: Path, monkeypatch):
    def offline(self):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError, match="Name or service not known.*could not download them"):
        load(DataConfig(name="mnist", root=str(tmp_path), download=True), CPU)


@pytest.mark.parametrize(
    "given, problem",
    [
        ("1.0", True),
        ("2.0", True),
        ("0.0", True),
        ("-3", True),
        ("0", True),
        ("1", False),
        ("100", False),
        ("0.25", False),
    ],
)
def test_a_size_is_a_fraction_as_a_float_and_a_count_as_an_integer(given, problem):
    """No guessing: 1.0 and 2.0 are refused, not read as one or two examples."""
    if problem:
        found = _config_problems(f"data.val_size={given}", f"data.test_size={given}")
        assert [p.split(":")[0] for p in found] == ["data.val_size", "data.test_size"], found
        assert all("an integer, without a decimal point" in p for p in found)
    else:
        cfg = parse_run_config(compose_raw("data=synthetic", f"data.val_size={given}", f"data.test_size={given}")).data
        assert type(cfg.val_size) is type(cfg.test_size) is (float if "." in given else int)


def _bad_header(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[2:4] = b"\x09\x99"  # the IDX magic number: type and number of dimensions
    path.write_bytes(bytes(data))


INCONSISTENT = {
    "labels outside the classes": (
        lambda raw: write_idx(raw / "train-labels-idx1-ubyte", np.arange(40) % 10 + 5),
        "the training labels run from 5 to 14; expected classes 0..9",
    ),
    "fewer labels than images": (
        lambda raw: write_idx(raw / "train-labels-idx1-ubyte", np.arange(30) % 10),
        "the training split has 40 images but 30 labels; expected one label per image",
    ),
    "more labels than images": (
        lambda raw: write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(50) % 10),
        "the test split has 12 images but 50 labels",
    ),
    "test images of another size": (
        lambda raw: write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((12, 20, 20), dtype=np.uint8)),
        "the test examples have shape (1, 20, 20), the training examples (1, 28, 28); "
        "expected one shape for every split",
    ),
    "a bad header": (
        _bad_header,
        "(AssertionError: a file does not have the format torchvision reads (a bad header?))",
    ),
}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_files_that_disagree_with_themselves_are_refused_with_what_was_expected(tmp_path: Path, case):
    """Each was accepted (and trained on part of the data) or failed deep inside torch before."""
    spoil, expected = INCONSISTENT[case]
    raw = tmp_path / "FashionMNIST" / "raw"
    write_mnist_like(raw)
    spoil(raw)
    with pytest.raises(DataError) as info:
        load(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False, val_size=5), CPU)
    assert expected in str(info.value) and str(raw) in str(info.value)


def test_inconsistent_files_stop_dnnrun_with_exit_2_and_no_run_directory(tmp_path: Path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    write_mnist_like(raw)
    INCONSISTENT["labels outside the classes"][0](raw)
    result = run_cli(
        "data=fashion_mnist",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'runs' / 'one'}",
        f"outputs={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "expected classes 0..9" in result.stderr, result.stderr
    assert not (tmp_path / "runs" / "one").exists()


def test_k_folds_are_stratified_disjoint_cover_the_training_set_and_leave_the_test_split_alone():
    from dnnrun.data.datasets import fold_of

    base = load(DataConfig(name="digits", scaling="none"), CPU)
    splits = [load(DataConfig(name="digits", scaling="none", folds=5, fold=i), CPU) for i in range(5)]
    assert all(torch.equal(s.test.x, base.test.x) for s in splits)  # the test split is untouched
    val = torch.cat([s.val.x for s in splits]).reshape(-1, 64)
    everything = torch.cat([splits[0].train.x, splits[0].val.x]).reshape(-1, 64)
    assert len(val) == len(everything) == len(base.train) + len(base.val)
    assert sorted(map(tuple, val.tolist())) == sorted(map(tuple, everything.tolist()))  # each example validates once
    y = torch.arange(103) % 3  # classes of 35, 34, 34 examples
    which = fold_of(y, 4, seed=7)
    for c in range(3):
        counts = torch.bincount(which[y == c], minlength=4)
        assert counts.max() - counts.min() <= 1  # each class spread evenly over the folds
    assert torch.bincount(which).tolist() in ([26, 26, 26, 25], [26, 26, 25, 26], [26, 25, 26, 26], [25, 26, 26, 26])
    assert torch.equal(which, fold_of(y, 4, seed=7)) and not torch.equal(which, fold_of(y, 4, seed=8))


def test_fold_settings_are_checked():
    assert _config_problems("data.folds=1", "data.fold=0") == [
        "data.folds: must be >= 2 (or null: no cross-validation), got 1"
    ]
    assert _config_problems("data.folds=5", "data.fold=5") == [
        "data.fold: must be one of 0..4 with data.folds=5 (sweep them: -m data.fold='range(5)'), got 5"
    ]
    assert _config_problems("data.fold=2") == ["data.fold: needs data.folds (how many folds), e.g. data.folds=5"]
