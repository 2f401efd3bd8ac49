"""Throughput of dnnrun's training loop against a plain PyTorch loop, measured in one process.

One epoch of a 784-300-100-10 ReLU MLP on Fashion-MNIST-shaped data (60,000 x 784, 10 classes),
already on the device, at batch sizes 32 and 256. Both loops shuffle with randperm and take index
slices of the same tensors. dnnrun's is `loop.Loop.fit` for one epoch, exactly as `dnnrun`
runs it (running loss and accuracy, schedule, progress bar, the epoch's end: a validation pass
on 1,000 examples, metrics.jsonl and the checkpoint); its setup is not timed. Runs alternate and
the best of `--repeats` is kept for each, so background noise hits all alike. Prints seconds per
epoch, the ratio dnnrun / plain (target: <= 1.15) and the cost of the per-layer diagnostics at
their default cadence, as the ratio to dnnrun without them (target: <= 1.10).

    python bench/throughput.py [--device auto] [--repeats 3] [--samples 60000]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dnnrun.cli import CONFIG_DIR
from dnnrun.config.run_config import parse_run_config
from dnnrun.data.datasets import Data, Split
from dnnrun.store.rundir import RunDir
from dnnrun.training import loop, runtime, setup
from dnnrun.training.faults import Hook
from dnnrun.training.signals import StopFlag

MODEL = ["model.hidden=[300,100]", "act=relu", "init=he_normal", "optimizer=sgd", "optimizer.lr=0.01"]


@functools.lru_cache  # composing takes ~0.1 s, and the configs are frozen
def config(batch_size: int, every: int, device: torch.device, extra: tuple[str, ...] = ()):
    overrides = [
        *MODEL,
        f"trainer.batch_size={batch_size}",
        "trainer.epochs=1",
        "trainer.progress=false",
        f"trainer.diagnostics.every={every}",
        "trainer.diagnostics.plots=false",
        f"trainer.device={device}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return parse_run_config(OmegaConf.to_container(compose("config", overrides=overrides), resolve=True))


def plain_epoch(net, data: Data, batch_size: int, shuffle: torch.Generator) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    split = data.train
    order = torch.randperm(len(split), generator=shuffle).to(split.x.device)
    for i in range(0, len(split), batch_size):
        idx = order[i : i + batch_size]
        loss = F.cross_entropy(net(split.x[idx]), split.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def timed(fn) -> float:
    device = torch.device("cuda") if torch.cuda.is_available() else None
    if device is not None:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device is not None:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def dnnrun_epoch(cfg, data: Data, device: torch.device, keep: str | None = None) -> float:
    """Seconds of dnnrun's loop (loop.Loop.fit) for the config's epochs, exactly as `dnnrun` runs
    it (each epoch's validation pass, metrics line and checkpoint); its set-up is not timed. The
    run's files go to a temporary directory, or to `keep`."""
    with tempfile.TemporaryDirectory() as tmp:
        run = loop.Loop(cfg, RunDir(keep or tmp), device, setup.Start(data, cfg.model), {}, StopFlag(), Hook())
        return timed(run.fit)


def one_epoch(kind: str, data: Data, batch_size: int, device: torch.device) -> float:
    """Seconds of one epoch: the plain loop, or dnnrun's loop with or without diagnostics."""
    if kind == "plain":
        torch.manual_seed(0)
        cfg = config(batch_size, 0, device)
        net = runtime.build_model(cfg, data)[0].to(device)
        return timed(lambda: plain_epoch(net, data, batch_size, torch.Generator().manual_seed(1)))
    every = 100 if kind == "diagnosed" else 0  # trainer.diagnostics.every's default
    return dnnrun_epoch(config(batch_size, every, device), data, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    args = parser.parse_args()
    device = runtime.resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.samples, 1, 28, 28), generator=g, dtype=torch.uint8).to(device).float() / 255
    y = torch.randint(0, 10, (args.samples,), generator=g).to(device)
    held = Split(x[:1000], y[:1000])
    data = Data(Split(x, y), held, held, n_features=784, n_classes=10, shape=(1, 28, 28), unlabeled=x)
    print(f"device {device}, {args.samples} x 784, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("dnnrun: loop.Loop.fit, one epoch; +diagnostics: with per-layer statistics at the default cadence")
    print(
        f"{'batch':>6} {'plain s/epoch':>14} {'dnnrun s/epoch':>15} {'ratio':>7} "
        f"{'+diagnostics s':>15} {'ratio to dnnrun':>16}"
    )
    kinds = ("plain", "dnnrun", "diagnosed")
    for batch_size in args.batch_sizes:
        for kind in kinds:  # one untimed epoch each to warm up allocators and kernels
            one_epoch(kind, data, batch_size, device)
        times = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                times[kind].append(one_epoch(kind, data, batch_size, device))
        plain, ours, diagnosed = (min(times[kind]) for kind in kinds)
        print(
            f"{batch_size:>6} {plain:>14.3f} {ours:>15.3f} {ours / plain:>7.3f} "
            f"{diagnosed:>15.3f} {diagnosed / ours:>16.3f}"
        )


if __name__ == "__main__":
    main()
