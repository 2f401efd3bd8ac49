"""Datasets held as tensors on the training device.

A loader returns whole uint8 arrays on the CPU: images as images (N, C, H, W), other examples as
vectors (N, features). `load` filters classes, carves the validation split (and a test split for
sets without one) with a fixed seed, caps the training set, moves the compact uint8 tensors to the
device and converts them to float32 once, there. Models take the examples in that shape (an MLP
flattens images itself). Training
batches are index slices of a `randperm`; there is no per-sample Dataset/collate path.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dnnrun.config.schema import NON_NEGATIVE, POSITIVE, Problems, Rule, check_rules, parse, unknown
from dnnrun.data.augment import AUGMENTATIONS
from dnnrun.errors import DataError

if TYPE_CHECKING:
    import torch

# torch is imported in the functions that load, not here: checking a config must not wait for it.
DEFAULT_ROOT = "~/.cache/dnnrun-data"  # data.root when neither the command line nor DNNRUN_DATA gives one


def default_root() -> str:
    """DataConfig's root when none is given: $DNNRUN_DATA, else DEFAULT_ROOT, as conf/data/*.yaml's
    `${oc.env:DNNRUN_DATA,...}` says for every data set (read when a config is made, not at import)."""
    return os.environ.get("DNNRUN_DATA", DEFAULT_ROOT)


@dataclasses.dataclass
class Arrays:
    """What a loader returns: uint8 (or float) images (N, C, H, W) or vectors (N, D), and int64
    labels, on the CPU."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor | None  # None: the set has no official test split; one is carved out
    y_test: torch.Tensor | None
    max_value: float  # the raw value that scaling=unit maps to 1.0
    n_classes: int
    class_names: list[str] | None = None  # None: the labels' numbers

    @property
    def shape(self) -> tuple[int, ...] | None:
        """One image's shape (C, H, W); None when the examples are vectors."""
        return tuple(self.x_train.shape[1:]) if self.x_train.ndim == 4 else None

    def check(self, source: str) -> None:
        """Files that disagree with themselves are refused here, with what was expected, rather than
        failing deep inside torch or training on part of them: every image has its label, the
        labels are classes, and the splits' examples have one size."""
        import torch

        example = tuple(self.x_train.shape[1:])
        splits = [("training", self.x_train, self.y_train)]
        if self.x_test is not None:
            splits.append(("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if x.ndim not in (2, 4) or not (x.dtype == torch.uint8 or x.is_floating_point()):
                raise DataError(
                    f"{source}: the {split} examples are {x.dtype} of shape {tuple(x.shape)}; expected "
                    "uint8 (or float) images (N, C, H, W) or rows (N, features)"
                )
            if len(x) != len(y):
                raise DataError(
                    f"{source}: the {split} split has {len(x)} images but {len(y)} labels; "
                    "expected one label per image (a file cut short, or from another download?)"
                )
            if tuple(x.shape[1:]) != example:
                raise DataError(
                    f"{source}: the {split} examples have shape {tuple(x.shape[1:])}, the training "
                    f"examples {example}; expected one shape for every split"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                raise DataError(
                    f"{source}: the {split} labels run from {int(y.min())} to {int(y.max())}; expected "
                    f"classes 0..{self.n_classes - 1}"
                )


# ---------------------------------------------------------------------------------------------
# Loaders: (root, download, **params) -> Arrays

DIGITS = "digits.npz"  # in the package: images (1797, 64), 8 x 8 row by row, and labels (1797,), both uint8


def digits(root: Path, download: bool) -> Arrays:
    """The 8x8 handwritten digits shipped in the package (dnnrun/data/digits.npz): 1,797 images, pixel
    values 0..16, from the UCI "Optical Recognition of Handwritten Digits" set (docs/data.md)."""
    import numpy as np
    import torch

    with np.load(files("dnnrun.data") / DIGITS) as arrays:
        x = torch.as_tensor(arrays["images"]).reshape(-1, 1, 8, 8)  # uint8
        y = torch.as_tensor(arrays["labels"], dtype=torch.int64)
    return Arrays(x, y, None, None, max_value=16.0, n_classes=10)


def synthetic(
    root: Path,
    download: bool,
    n_samples: int = 1200,
    n_features: int = 32,
    n_classes: int = 4,
    noise: float = 120.0,
    seed: int = 0,
) -> Arrays:
    """Deterministic Gaussian blobs around random uint8 prototypes: a quick, learnable set for tests."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centers = torch.randint(0, 256, (n_classes, n_features), generator=g).float()
    y = torch.arange(n_samples) % n_classes
    y = y[torch.randperm(n_samples, generator=g)]
    x = centers[y] + noise * torch.randn(n_samples, n_features, generator=g)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return Arrays(x, y, None, None, max_value=255.0, n_classes=n_classes)


@dataclasses.dataclass(frozen=True)
class TorchvisionSet:
    """A torchvision dataset class and where it expects its files, for the message when they are missing."""

    class_name: str
    folder: str  # under root: holds both `files` and `archives`
    files: tuple[str, ...]  # unpacked: all that download=False reads (torchvision never unpacks then)
    archives: tuple[str, ...]  # the official ones: download=True checks their MD5 and unpacks them, offline too
    url: str  # where the archives are

    def __call__(self, root: Path, download: bool) -> Arrays:  # the same (root, download) as every loader
        import torch
        import torchvision.datasets

        cls = getattr(torchvision.datasets, self.class_name)
        try:
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=download)
        except Exception as exc:  # torchvision raises RuntimeError or URLError; the cause goes in the message
            where = root / self.folder
            # torchvision's messages span lines; a bad header fails an assert without any
            reason = " ".join(str(exc).split())[:300] or (
                f"{type(exc).__name__}: a file does not have the format torchvision reads (a bad header?)"
            )
            files, archives = ", ".join(self.files), f"{', '.join(self.archives)} (from {self.url})"
            if download:
                advice = (
                    f"and could not download them.\nOffline, put the official {archives} in {where}: "
                    "data.download=true then checks the MD5 and unpacks without the network."
                )
            else:
                advice = (
                    f"and data.download=false.\nWith data.download=false, put the unpacked {files} in {where}. "
                    "Archives placed there are read only with data.download=true, which checks the MD5 of "
                    f"the official {archives} and unpacks without the network."
                )
            raise DataError(
                f"{self.class_name}: cannot load the files under {where} ({reason}), {advice} Or point data.root "
                "(or the DNNRUN_DATA environment variable) at a folder that has them."
            ) from None
        return Arrays(
            x_train=_images(train.data),
            y_train=torch.as_tensor(train.targets, dtype=torch.int64),
            x_test=_images(test.data),
            y_test=torch.as_tensor(test.targets, dtype=torch.int64),
            max_value=255.0,
            n_classes=len(train.classes),
            class_names=[str(c) for c in train.classes],
        )


def _images(data: Any) -> torch.Tensor:
    """torchvision's images as (N, C, H, W) uint8: MNIST's are (N, H, W), CIFAR's (N, H, W, C)."""
    import torch

    x = torch.as_tensor(data).to(torch.uint8)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_ARCHIVES = tuple(f"{name}.gz" for name in _MNIST_FILES)

NOT_IMAGES = ("synthetic",)  # sets whose examples have no image shape (Arrays.shape is None): no augmentation
CARVED_TEST = ("digits", "synthetic")  # sets without an official test split: data.test_size carves one out
DATASETS: dict[str, Callable[..., Arrays]] = {
    "digits": digits,
    "synthetic": synthetic,
    "mnist": TorchvisionSet(
        "MNIST", "MNIST/raw", _MNIST_FILES, _MNIST_ARCHIVES, "https://ossci-datasets.s3.amazonaws.com/mnist/"
    ),
    "fashion_mnist": TorchvisionSet(  # torchvision's own mirror of github.com/zalandoresearch/fashion-mnist
        "FashionMNIST",
        "FashionMNIST/raw",
        _MNIST_FILES,
        _MNIST_ARCHIVES,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    "cifar10": TorchvisionSet(  # download=False also checks each unpacked batch file's MD5
        "CIFAR10", "", ("cifar-10-batches-py/",), ("cifar-10-python.tar.gz",), "https://www.cs.toronto.edu/~kriz/"
    ),
}

# Ranges of the loaders' own parameters (the synthetic set's), by name. Seeds are kept to the range
# every RNG accepts (numpy's is 0 <= seed < 2**32).
SEED: Rule = (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")
RULES: dict[str, Rule] = {
    "n_samples": POSITIVE,
    "n_features": POSITIVE,
    "n_classes": (lambda v: v >= 2, "must be >= 2"),
    "noise": NON_NEGATIVE,
    "seed": SEED,
}


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str
    root: str = dataclasses.field(default_factory=default_root)  # torchvision sets are downloaded to and cached here
    download: bool = True  # try to download torchvision sets whose files are missing
    # a number in (0, 1): a fraction of the training set; an integer: a number of examples (1.0 is neither)
    val_size: float | int = 0.1
    # random: drawn with split_seed; end: the last val_size examples of the training file, taken before
    # `classes` filters (as Keras' validation_split and the book's X_train_full[-5000:])
    val_from: Literal["random", "end"] = "random"
    test_size: float | int = 0.2  # as val_size; only for sets without an official test split (digits, synthetic)
    scaling: Literal["none", "unit", "standardize"] = "standardize"  # unit: to [0, 1]
    classes: list[int] | None = None  # keep only these labels, relabelled 0..k-1 in this order
    max_train: int | None = None  # keep at most this many training examples (after the validation split)
    split_seed: int = 0  # fixes which examples go to validation (and test), whatever the training seed
    folds: int | None = None  # k-fold cross-validation: the training set in this many stratified folds ...
    fold: int | None = None  # ... and this one (0-based) validates, in place of val_size
    augment: list[str] = dataclasses.field(default_factory=list)  # training batches only: augment.AUGMENTATIONS
    resize: int | None = (
        None  # images resized to resize x resize on the device; null: as they are (model=zoo: its size)
    )
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the loader's own options
    option: str | None = None  # the YAML it came from (conf/data/OPTION.yaml)

    def check(self, problems: Problems, key: str) -> None:
        sizes_ok = True
        for name in ("val_size", "test_size"):
            value = getattr(self, name)
            if not (0 < value < 1 if isinstance(value, float) else value >= 1):
                problems.add(
                    f"{key}.{name}",
                    f"must be a fraction in (0, 1) or a whole number of examples (an "
                    f"integer, without a decimal point), got {value!r}",
                )
                sizes_ok = False
        fractions = isinstance(self.val_size, float) and isinstance(self.test_size, float)
        if sizes_ok and fractions and self.name in CARVED_TEST and self.val_size + self.test_size >= 1:
            problems.add(
                f"{key}.val_size",
                f"{self.val_size:g} with {key}.test_size={self.test_size:g} adds up to 1 or more: as fractions of "
                f"one set they would overlap or leave nothing to train on (test_size is the share of all "
                f"examples, val_size the share of what is left); lower one of them",
            )
        if self.max_train is not None and self.max_train < 1:
            problems.add(f"{key}.max_train", f"must be >= 1 or null, got {self.max_train}")
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
            problems.add(f"{key}.classes", f"must list at least two distinct labels, got {self.classes}")
        check_rules({"split_seed": self.split_seed}, {"split_seed": SEED}, key, problems)
        if self.folds is not None and self.folds < 2:
            problems.add(f"{key}.folds", f"must be >= 2 (or null: no cross-validation), got {self.folds}")
        elif self.folds is not None and (self.fold is None or not 0 <= self.fold < self.folds):
            problems.add(
                f"{key}.fold",
                f"must be one of 0..{self.folds - 1} with {key}.folds={self.folds} "
                f"(sweep them: -m {key}.fold='range({self.folds})'), got {self.fold}",
            )
        elif self.folds is None and self.fold is not None:
            problems.add(f"{key}.fold", f"needs {key}.folds (how many folds), e.g. {key}.folds=5")
        if self.folds is not None and self.val_from == "end":
            problems.add(f"{key}.val_from", f"'end' takes no folds: k-fold validates on a fold; drop {key}.folds")
        check_rules(self.params, RULES, key, problems)
        for name in self.augment:
            if name not in AUGMENTATIONS:
                problems.add(f"{key}.augment", unknown("augmentation", name, AUGMENTATIONS))
        if self.augment and self.name in NOT_IMAGES:
            problems.add(f"{key}.augment", f"augments images; {self.name}'s examples are not images")
        if self.resize is not None and self.resize < 1:
            problems.add(f"{key}.resize", f"must be >= 1 or null, got {self.resize}")
        elif self.resize is not None and self.name in NOT_IMAGES:
            problems.add(f"{key}.resize", f"resizes images; {self.name}'s examples are not images")
        if self.name == "synthetic":  # its size is a setting, so whether the splits fit is known now
            defaults = inspect.signature(synthetic).parameters
            n, k = (self.params.get(p, defaults[p].default) for p in ("n_samples", "n_classes"))
            if n >= 1 and k >= 2 and n < k:
                problems.add(
                    f"{key}.n_samples", f"must be >= n_classes ({k}) so that every class has an example, got {n}"
                )
            elif n >= 1 and sizes_ok and self.classes is None:  # with classes, load() counts what the filter keeps
                test = _count(self.test_size, n)
                if n - test - _count(self.val_size, n - test) < 1:
                    problems.add(
                        f"{key}.n_samples",
                        f"{n} examples leave none for training after {key}.test_size "
                        f"({self.test_size:g}) and {key}.val_size ({self.val_size:g}); raise it",
                    )


def parse_data(raw, key: str, problems: Problems) -> DataConfig | None:
    return parse(DataConfig, raw, key, problems, registry=DATASETS, kind="dataset")


# ---------------------------------------------------------------------------------------------
# Splits on the device


@dataclasses.dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) or (N, features) float32, on the training device
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches in a random order drawn from `generator` (in order when it is None), from
        batch number `start` on (a checkpoint taken mid-epoch continues there)."""
        import torch

        n = len(self)
        if generator is None:
            for i in range(start * batch_size, n, batch_size):
                yield self.x[i : i + batch_size], self.y[i : i + batch_size]
            return
        order = torch.randperm(n, generator=generator).to(self.x.device)
        for i in range(start * batch_size, n, batch_size):
            idx = order[i : i + batch_size]
            yield self.x[idx], self.y[idx]


@dataclasses.dataclass
class Data:
    train: Split
    val: Split
    test: Split
    n_features: int  # values per example (C x H x W for images)
    n_classes: int
    shape: tuple[int, ...] | None  # one image's (C, H, W); None when the examples are vectors
    unlabeled: torch.Tensor  # every training input, also those that max_train leaves without their label
    preprocess: Preprocess | None = None  # raw examples to the model's inputs, and the classes' names


def _count(size: float | int, n: int) -> int:
    """Examples to carve out of n: a fraction of them (a float), or a number (an int)."""
    return size if isinstance(size, int) else max(1, round(size * n))


def _split_off(x: torch.Tensor, y: torch.Tensor, size: float, seed: int, what: str):
    import torch

    n = len(y)
    k = _count(size, n)
    if k >= n:
        raise DataError(f"{what} of {k} examples leaves none of the {n} for training; lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rest, held = order[k:], order[:k]
    return x[rest], y[rest], x[held], y[held]


def fold_of(y: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Each example's fold, stratified as scikit-learn's StratifiedKFold(shuffle=True): each
    class's examples, in an order drawn from `seed`, dealt to the folds in turn, so that every fold
    has each class's share (within one example)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.int64)
    dealt = 0  # where the next class starts dealing: the folds' sizes stay within one of each other
    for c in torch.unique(y).tolist():
        members = (y == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        fold[members] = (torch.arange(len(members)) + dealt) % folds
        dealt += len(members)
    return fold


def _fold(x: torch.Tensor, y: torch.Tensor, folds: int, fold: int, seed: int):
    which = fold_of(y, folds, seed)
    if int((which != fold).sum()) == 0 or int((which == fold).sum()) == 0:
        raise DataError(f"data.folds={folds}: {len(y)} training examples are too few for {folds} folds; lower it")
    return x[which != fold], y[which != fold], x[which == fold], y[which == fold]


def _keep_classes(
    x: torch.Tensor, y: torch.Tensor, classes: list[int], n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    mapping = torch.full((max(n_classes, int(y.max()) + 1),), -1, dtype=torch.int64)  # old label -> new, or -1
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    keep = mapping[y] >= 0
    return x[keep], mapping[y[keep]]


def load(cfg: DataConfig, device: torch.device) -> Data:
    root = Path(os.path.expanduser(cfg.root))
    loader = DATASETS[cfg.name]
    arrays = loader(root, cfg.download, **cfg.params)
    arrays.check(
        f"{loader.class_name} under {root / loader.folder} ({', '.join(loader.files)})"
        if isinstance(loader, TorchvisionSet)
        else cfg.name
    )
    x_train, y_train, x_test, y_test = arrays.x_train, arrays.y_train, arrays.x_test, arrays.y_test
    n_classes = arrays.n_classes
    ending = None  # val_from=end: the tail carved before the classes filter, as the book splits before filtering
    if cfg.val_from == "end":
        k = _count(cfg.val_size, len(y_train) - (0 if x_test is not None else _count(cfg.test_size, len(y_train))))
        if k >= len(y_train):
            raise DataError(f"data.val_size of {k} examples leaves none of the {len(y_train)} for training; lower it")
        x_train, y_train, ending = x_train[:-k], y_train[:-k], (x_train[-k:], y_train[-k:])
    if cfg.classes is not None:
        bad = [c for c in cfg.classes if not 0 <= c < n_classes]
        if bad:
            raise DataError(f"data.classes: {bad} are not labels of {cfg.name} (valid: 0..{n_classes - 1})")
        x_train, y_train = _keep_classes(x_train, y_train, cfg.classes, n_classes)
        if ending is not None:
            ending = _keep_classes(*ending, cfg.classes, n_classes)
        if x_test is not None:
            x_test, y_test = _keep_classes(x_test, y_test, cfg.classes, n_classes)
        n_classes = len(cfg.classes)
    if x_test is None:
        # test_size is a share of every example: with val_from=end, of those the tail holds too
        test_size = cfg.test_size if ending is None else _count(cfg.test_size, len(y_train) + len(ending[1]))
        x_train, y_train, x_test, y_test = _split_off(x_train, y_train, test_size, cfg.split_seed, "data.test_size")
    # A different seed stream from the test split's, so the two carve-outs are independent.
    if ending is not None:
        x_val, y_val = ending
        if len(y_val) == 0 or len(y_train) == 0:
            raise DataError(
                f"data.val_from=end: data.classes {cfg.classes} leave {len(y_train)} training and {len(y_val)} "
                f"validation examples; use data.val_from=random or another data.val_size"
            )
    elif cfg.folds is not None:
        x_train, y_train, x_val, y_val = _fold(x_train, y_train, cfg.folds, cfg.fold, cfg.split_seed + 1)
    else:
        x_train, y_train, x_val, y_val = _split_off(x_train, y_train, cfg.val_size, cfg.split_seed + 1, "data.val_size")
    x_unlabeled = x_train
    if cfg.max_train is not None:
        x_train, y_train = x_train[: cfg.max_train], y_train[: cfg.max_train]

    # uint8 crosses to the device (4x less to copy); the float conversion happens once, there.
    splits = {
        name: (x.to(device).float(), y.to(device))
        for name, x, y in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
    }
    names = arrays.class_names or [str(c) for c in range(arrays.n_classes)]
    names = [names[c] for c in cfg.classes] if cfg.classes is not None else names
    scale = Preprocess.fit(cfg.scaling, splits["train"][0], arrays.max_value, names)
    train = Split(scale(splits["train"][0]), splits["train"][1])
    return Data(
        train=train,
        val=Split(scale(splits["val"][0]), splits["val"][1]),
        test=Split(scale(splits["test"][0]), splits["test"][1]),
        n_features=math.prod(x_train.shape[1:]),
        n_classes=n_classes,
        shape=arrays.shape,
        # the same tensor as train.x unless max_train dropped some labels
        unlabeled=train.x if cfg.max_train is None else scale(x_unlabeled.to(device).float()),
        preprocess=scale,
    )


@dataclasses.dataclass
class Preprocess:
    """What turns raw examples, as a loader reads them (uint8 pixels, raw features), into what the
    model takes, and what its outputs mean: fitted on the training split, then stored in every
    checkpoint and export (`to_dict`) so that a trained model applies to new inputs without its
    data set (mode=predict, dnnrun.load)."""

    scaling: str  # none | unit | standardize
    max_value: float  # unit: the raw value that becomes 1.0
    mean: torch.Tensor | None  # standardize: per feature (per pixel, for images), of one example's shape
    std: torch.Tensor | None
    shape: tuple[int, ...]  # one example: (C, H, W) for images, (features,) for vectors
    class_names: list[str]  # the model's outputs, in order

    @classmethod
    def fit(cls, scaling: str, x_train: torch.Tensor, max_value: float, class_names: list[str]) -> Preprocess:
        import torch

        shape = tuple(x_train.shape[1:])
        if scaling != "standardize":
            return cls(scaling, max_value, None, None, shape, class_names)
        # As scikit-learn's StandardScaler: a feature whose variance is within rounding error of 0 (its
        # _is_constant_feature bound) gets scale 1, so it is only centred. The statistics are taken of the
        # data minus its first row, where a constant feature is exactly 0 whatever its value (no cancellation).
        n, eps, shift = len(x_train), torch.finfo(x_train.dtype).eps, x_train[:1]
        var, mean = torch.var_mean(x_train - shift, 0, correction=int(n > 1))  # a single example: variance 0
        constant = var <= n * eps * var + (n * eps * mean) ** 2
        std = torch.where(constant, torch.ones_like(var), var.sqrt())
        return cls(scaling, max_value, mean + shift[0], std, shape, class_names)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Raw examples (float) as the model takes them."""
        if self.scaling == "unit":
            return x / self.max_value
        if self.scaling == "standardize":
            return (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x

    def to_dict(self) -> dict[str, Any]:
        """Plain data and tensors: what torch.load(weights_only=True) reads back."""
        return {
            "scaling": self.scaling,
            "max_value": float(self.max_value),
            "mean": self.mean,
            "std": self.std,
            "shape": list(self.shape),
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(d["scaling"], d["max_value"], d.get("mean"), d.get("std"), tuple(d["shape"]), list(d["class_names"]))
