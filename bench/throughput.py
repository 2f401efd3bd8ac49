"""Throughput of dnnrun's training epoch against a plain PyTorch loop, measured in one process.

One epoch of a 784-300-100-10 ReLU MLP on Fashion-MNIST-shaped data (60,000 x 784, 10 classes),
already on the device, at batch sizes 32 and 256. Both loops shuffle with randperm and take index
slices of the same tensors; dnnrun's is `train.train_epoch`, exactly as `dnnrun` runs it (running
loss and accuracy, schedule hook, progress-bar hook). Runs alternate and the best of `--repeats`
is kept for each, so background noise hits all alike. Prints seconds per epoch, the ratio
dnnrun / plain (target: <= 1.15) and the cost of the per-layer diagnostics at their default cadence,
as the ratio to dnnrun without them (target: <= 1.10).

    python bench/throughput.py [--device auto] [--repeats 3] [--samples 60000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dnnrun import model as model_mod, regularizers, train
from dnnrun.activations import ACTIVATIONS
from dnnrun.console import EpochBar
from dnnrun.diagnostics import DiagnosticsConfig, Monitor
from dnnrun.loggers import NoLogger
from dnnrun.data import Split
from dnnrun.norms import NormConfig
from dnnrun.schedules import Schedule
from dnnrun.schema import Choice

HE_NORMAL = Choice("variance_scaling", {"scale": 2.0, "mode": "fan_in", "distribution": "truncated_normal"})


def build(device: torch.device) -> torch.nn.Module:
    cfg = model_mod.ModelConfig(name="mlp", hidden=[300, 100])
    net = model_mod.mlp(cfg, 784, 10, Choice("relu"), NormConfig("none"), HE_NORMAL, regularizers.Regularization())
    return net.to(device)


def plain_epoch(net, split: Split, batch_size: int, shuffle: torch.Generator) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    order = torch.randperm(len(split), generator=shuffle).to(split.x.device)
    for i in range(0, len(split), batch_size):
        idx = order[i : i + batch_size]
        loss = F.cross_entropy(net(split.x[idx]), split.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def dnnrun_epoch(net, split: Split, batch_size: int, shuffle: torch.Generator, every: int = 0) -> None:
    """train.train_epoch as `dnnrun` runs it; `every` > 0 adds the per-layer statistics."""
    tc = train.TrainerConfig(batch_size=batch_size, progress=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    schedule = Schedule(Choice("constant"), opt, steps_per_epoch=len(split) // batch_size, epochs=1)
    autocast, scaler = train.mixed_precision(False, split.x.device)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(net, ACTIVATIONS["relu"], every, Path(tmp) / "diagnostics.jsonl", NoLogger(Path(tmp)))
        parts = train.Parts(net, opt, schedule, regularizers.Regularization(), autocast, scaler, monitor)
        with EpochBar(enabled=False, epochs=1) as bar:
            bar.start_epoch(1, len(split) // batch_size)
            progress = train.EpochProgress(shuffle_state=shuffle.get_state())
            train.train_epoch(parts, split, tc, shuffle, bar, step=0, epoch=1, progress=progress)


def diagnosed_epoch(net, split: Split, batch_size: int, shuffle: torch.Generator) -> None:
    dnnrun_epoch(net, split, batch_size, shuffle, every=DiagnosticsConfig().every)


def timed(fn, *args) -> float:
    device = args[1].x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    args = parser.parse_args()
    device = train.resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.samples, 784), generator=g, dtype=torch.uint8).to(device).float() / 255
    y = torch.randint(0, 10, (args.samples,), generator=g).to(device)
    split = Split(x, y)
    print(f"device {device}, {args.samples} x 784, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("dnnrun: train.train_epoch; +diagnostics: with per-layer statistics at the default cadence")
    print(f"{'batch':>6} {'plain s/epoch':>14} {'dnnrun s/epoch':>15} {'ratio':>7} {'+diagnostics s':>15} {'ratio to dnnrun':>16}")
    loops = (("plain", plain_epoch), ("dnnrun", dnnrun_epoch), ("diagnosed", diagnosed_epoch))
    for batch_size in args.batch_sizes:
        times = {name: [] for name, _ in loops}
        # one untimed epoch each to warm up allocators and kernels
        for _, fn in loops:
            fn(build(device), split, batch_size, torch.Generator().manual_seed(1))
        for _ in range(args.repeats):
            for name, fn in loops:
                torch.manual_seed(0)
                times[name].append(timed(fn, build(device), split, batch_size, torch.Generator().manual_seed(1)))
        plain, ours, diagnosed = (min(times[name]) for name, _ in loops)
        print(f"{batch_size:>6} {plain:>14.3f} {ours:>15.3f} {ours / plain:>7.3f} {diagnosed:>15.3f} {diagnosed / ours:>16.3f}")

if __name__ == "__main__":
    main()
