"""Shared helpers: configs composed from the real conf/ tree, and the CLI (in this process, or
the installed command in a process of its own)."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import signal
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dnnrun.cli import CONFIG_DIR
from dnnrun.config.run_config import RunConfig, parse_run_config

DNNRUN = Path(sys.executable).parent / "dnnrun"  # the console script of the environment under test

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: two workers share the cores, one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch in this worker, and the processes its tests start


def compose_raw(*overrides: str) -> dict:
    """The plain config Hydra composes from conf/ with these overrides (a copy: composing takes
    ~0.1 s, and the suite composes the same command lines many times)."""
    return copy.deepcopy(_composed(overrides, os.environ.get("DNNRUN_DATA")))


@functools.lru_cache(maxsize=512)
def _composed(overrides: tuple[str, ...], data_root: str | None) -> dict:  # data.root reads DNNRUN_DATA
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


# Options that only work together with others (checked and documented where they are defined).
COMPANIONS = {
    "pretrain=rbm": ["act=sigmoid"],  # RBMs are made of sigmoid units
    "pretrain=rotation": ["data=digits"],  # needs square images
    "model=cnn": ["data=digits", "model.channels=[4,8]"],  # images
    "model=resnet": ["data=digits", "model.depth=8", "model.width=4"],  # images; one block per stage
    "model=zoo": ["data=digits", "model.arch=shufflenet_v2_x0_5", "data.resize=32"],  # a small torchvision net
}


def make_config(*overrides: str, data: str | None = "synthetic") -> RunConfig:
    """A run on the small synthetic set (data=None: the data the overrides pick), quiet, for a few
    epochs and without plots unless overridden (drawing them takes longer than such a run;
    tests/test_diagnostics.py checks them)."""
    base = ["trainer.epochs=3", "trainer.progress=false", "trainer.diagnostics.plots=false"]
    return parse_run_config(compose_raw(*([f"data={data}"] if data else []), *base, *overrides))


def run_cli(
    *args: str,
    cwd: Path,
    env: dict | None = None,
    root_at_cwd: bool = True,
    process: bool = False,
    module: bool = False,
) -> subprocess.CompletedProcess:
    """dnnrun with these arguments in `cwd`, with the outputs root there too (tests write only
    under tmp_path), and without plots unless asked for: `dnnrun.cli.main()` in this process (as
    the console script calls it, its exit code from SystemExit, an uncaught exception printed with
    exit code 1 as Python does), or with process=True the installed command in a process of its
    own (module=True: `python -m dnnrun`), for what only a process shows: signals, kill -9, the
    entry points, launchers that start processes."""
    if root_at_cwd and not any(a.startswith("outputs=") for a in args) and "--help" not in args:
        args = (*args, f"outputs={cwd}")
    if not any(a.startswith("trainer.diagnostics.plots=") for a in args) and "--help" not in args:
        args = (*args, "trainer.diagnostics.plots=false")  # drawing takes longer than these runs
    env = {"HYDRA_FULL_ERROR": "0", **(env or {})}
    if not process:
        return _in_process([str(DNNRUN), *args], cwd, env)
    command = [sys.executable, "-m", "dnnrun"] if module else [str(DNNRUN)]
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def _in_process(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    from hydra.core.global_hydra import GlobalHydra

    from dnnrun.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _process_state(argv, cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:  # what Python does with an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _process_state(argv: list[str], cwd: Path, env: dict[str, str]):
    """What a dnnrun process changes for itself, put back afterwards: argv, the working directory,
    the environment, signal handlers, logging (Hydra configures the root logger; dnnrun's logger gets
    a terminal handler) and torch's thread count."""
    import torch

    loggers = [logging.getLogger(), logging.getLogger("dnnrun"), logging.getLogger("hydra")]
    saved_logging = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved = (list(sys.argv), os.getcwd(), dict(os.environ), torch.get_num_threads())
    sys.argv[:] = argv
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        sys.argv[:], cwd, environ, threads = saved
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        for lg, handlers, level, propagate in saved_logging:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


def last_weights(run: Path) -> dict:
    """The model's weights in a run's checkpoints/last.pt, loaded weights-only."""
    import torch

    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = {1: 2049, 3: 2051}[array.ndim]
    header = struct.pack(">" + "I" * (1 + array.ndim), magic, *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(raw: Path, n_train: int = 40, n_test: int = 12) -> dict[str, np.ndarray]:
    """Tiny MNIST-format IDX files (random pixels, labels cycling through 0..9) in torchvision's raw folder."""
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


def write_cifar_like(root: Path, per_batch: int = 6, n_test: int = 6) -> dict[str, np.ndarray]:
    """Tiny CIFAR-10 batch files (random pixels) under root/cifar-10-batches-py, as torchvision reads
    them: per image the 1024 red values row by row, then green, then blue. torchvision checks each
    file's MD5 against the real set's; `cifar_files_accepted` lets these through."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, name in enumerate(
        ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    ):
        n = n_test if name == "test_batch" else per_batch
        written[name] = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": written[name], "labels": [(i + j) % 10 for j in range(n)]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return written


@pytest.fixture
def cifar_files_accepted(monkeypatch):
    """torchvision's MD5 check of CIFAR-10's files passes for any file that exists (tiny test files
    cannot have the real set's MD5s)."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
