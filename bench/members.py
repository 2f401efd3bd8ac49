"""Many seeds at once (trainer.seeds, dnnrun/training/members.py) against the same seeds trained one after
another, in one process, alternating, best of `--repeats`.

For K = 1, 4, 16: K members in one run, against K single runs (loop.run with trainer.seed=0..K-1),
both whole runs as `dnnrun` makes them (data, models, every epoch, validation, checkpoints, test,
summaries; no plots, no per-layer diagnostics), for two models: the digits default (64-300-100-10)
and the Fashion-MNIST-shaped 784-300-100-10 MLP on synthetic data of that shape, at batch 32 and 256.
Prints seconds and the speed-up (sequential / members). Targets on 2 CPU cores: 16 members of the
digits default >= 4x, the 784-300-100 MLP at batch 32 >= 2x. Then the ceiling of any batched
implementation, measured alike: the same members' training steps alone, in a hand-written batched
loop (plain_batched), and sequential / that.

    python bench/members.py [--repeats 2] [--epochs 3] [--members 1 4 16] [--setups digits b32 b256]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import tempfile
import time

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dnnrun.cli import CONFIG_DIR
from dnnrun.cli.process import keep_freed_memory
from dnnrun.config.run_config import parse_run_config
from dnnrun.training import loop, runtime, setup

SETUPS = {  # name: overrides
    "digits 64-300-100-10, batch 32": ["data=digits", "trainer.batch_size=32"],
    "784-300-100-10, batch 32": [
        "data=synthetic",
        "data.n_samples=12000",
        "data.n_features=784",
        "data.n_classes=10",
        "trainer.batch_size=32",
    ],
    "784-300-100-10, batch 256": [
        "data=synthetic",
        "data.n_samples=12000",
        "data.n_features=784",
        "data.n_classes=10",
        "trainer.batch_size=256",
    ],
}


DEVICE = "cpu"  # bench/gpu.py sets cuda


def config(overrides: list[str]):
    common = [
        "trainer.progress=false",
        "trainer.diagnostics.every=0",
        "trainer.diagnostics.plots=false",
        f"trainer.device={DEVICE}",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return parse_run_config(
            OmegaConf.to_container(compose("config", overrides=[*overrides, *common]), resolve=True)
        )


def sequential(overrides: list[str], k: int) -> float:
    start = time.perf_counter()
    for seed in range(k):
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # the results tables
            loop.run(config([*overrides, f"trainer.seed={seed}"]), tmp)
    return time.perf_counter() - start


def together(overrides: list[str], k: int) -> float:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        seeds = [] if k == 1 else [f"trainer.seeds=[{','.join(map(str, range(k)))}]"]
        loop.run(config([*overrides, *seeds]), tmp)
    return time.perf_counter() - start


def plain_batched(overrides: list[str], k: int) -> float:
    """The ceiling of any batched implementation: only the training steps of the same K members
    (the digits default's ReLU MLP with SGD, each member on its own shuffled batches), written by
    hand with the stacked weights as leaf tensors (baddbmm, relu, cross-entropy, backward, one SGD
    step): no validation, checkpoints, test or files."""
    import torch
    import torch.nn.functional as F

    cfg = config(overrides)
    data = runtime.load_data(cfg.data, cfg.model, torch.device("cpu"))
    sizes = [data.n_features, *cfg.model.hidden, data.n_classes]
    weights = [(torch.randn(k, a, b) * (2 / a) ** 0.5).requires_grad_() for a, b in itertools.pairwise(sizes)]
    biases = [torch.zeros(k, 1, b, requires_grad=True) for b in sizes[1:]]
    optimizer = torch.optim.SGD([*weights, *biases], lr=cfg.optimizer.params["lr"])
    x, y, batch = data.train.x.flatten(1), data.train.y, cfg.trainer.batch_size
    start = time.perf_counter()
    for _ in range(cfg.trainer.epochs):
        orders = torch.stack([torch.randperm(len(y)) for _ in range(k)])
        for b in range(setup.steps_per_epoch(cfg.trainer, len(y))):
            idx = orders[:, b * batch : (b + 1) * batch]
            h = x[idx]
            for i, (w, bias) in enumerate(zip(weights, biases)):
                h = torch.baddbmm(bias, h, w)
                h = F.relu(h) if i < len(weights) - 1 else h
            loss = F.cross_entropy(h.flatten(0, 1), y[idx].flatten(), reduction="none").view(k, -1).mean(1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--setups",
        nargs="+",
        choices=["digits", "b32", "b256"],
        default=["digits", "b32", "b256"],
        help="which setups: the digits default, the 784-300-100 MLP at batch 32, at batch 256",
    )
    args = parser.parse_args()
    import logging

    logging.getLogger("dnnrun").setLevel(logging.WARNING)
    keep_freed_memory()  # as the dnnrun command does for its process
    runtime.warm_up()
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs a run, "
        f"best of {args.repeats}"
    )
    print(
        f"{'setup':<32} {'K':>3} {'sequential s':>13} {'members s':>10} {'speed-up':>9} {'plain batched s':>16} "
        f"{'ceiling':>8}"
    )
    for (name, overrides), short in zip(SETUPS.items(), ("digits", "b32", "b256")):
        if short not in args.setups:
            continue
        overrides = [*overrides, f"trainer.epochs={args.epochs}"]
        for k in args.members:
            seq, tog, plain = [], [], []
            for _ in range(args.repeats):  # alternating: noise hits all alike
                seq.append(sequential(overrides, k))
                tog.append(together(overrides, k))
                plain.append(plain_batched(overrides, k))
            print(
                f"{name:<32} {k:>3} {min(seq):>13.2f} {min(tog):>10.2f} {min(seq) / min(tog):>9.2f} "
                f"{min(plain):>16.2f} {min(seq) / min(plain):>8.2f}"
            )


if __name__ == "__main__":
    main()
