"""Epoch time of conv nets: dnnrun's loop against a plain PyTorch loop over the same device tensors,
and against a DataLoader-based loop (the usual recipe: a TensorDataset in host memory, shuffled
and batched by a DataLoader, each batch copied to the device).

Two models, on random pixels of the real shapes: experiment=fashion_cnn's CNN on Fashion-MNIST-
shaped data (N x 1 x 28 x 28) and experiment=cifar10_resnet's ResNet-20 on CIFAR-shaped data
(N x 3 x 32 x 32), both without augmentation (the other loops have none). dnnrun's loop is
`loop.Loop.fit` for one epoch, as `dnnrun` runs it (a validation pass over 2% as many examples,
metrics, checkpoint); the
other two take the same model, optimizer settings, mixed precision and memory format (dnnrun's
defaults: on CUDA, bf16 autocast and channels-last for conv nets). Runs alternate; the best of
`--repeats` is kept. Target: dnnrun / plain <= 1.10.

    python bench/images.py [--device auto] [--repeats 3] [--samples 50000] [--models cnn resnet]
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from throughput import dnnrun_epoch, timed

from dnnrun.cli import CONFIG_DIR
from dnnrun.config.run_config import parse_run_config
from dnnrun.data.datasets import Data, Split
from dnnrun.training import runtime

MODELS = {  # name: (preset, one image's shape)
    "cnn": ("fashion_cnn", (1, 28, 28)),
    "resnet": ("cifar10_resnet", (3, 32, 32)),
}


@functools.lru_cache  # composing takes ~0.1 s, and the configs are frozen
def config(model: str, device: torch.device, extra: tuple[str, ...] = ()):
    overrides = [
        f"experiment={MODELS[model][0]}",
        "data.augment=[]",
        "trainer.epochs=1",
        "trainer.progress=false",
        "trainer.diagnostics.every=0",
        "trainer.diagnostics.plots=false",
        f"trainer.device={device}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return parse_run_config(OmegaConf.to_container(compose("config", overrides=overrides), resolve=True))


def prepared(cfg, data: Data, device: torch.device):
    """The model as dnnrun trains it (memory format, device), its optimizer and autocast."""
    torch.manual_seed(0)
    net = runtime.build_model(cfg, data)[0]
    last = runtime.channels_last(cfg.trainer.channels_last, device, net)
    net.to(device, memory_format=torch.channels_last if last else torch.preserve_format).train()
    p = cfg.optimizer.params
    opt = (
        torch.optim.SGD(
            net.parameters(), lr=p.get("lr", 0.01), momentum=p.get("momentum", 0.0), nesterov=p.get("nesterov", False)
        )
        if cfg.optimizer.name == "sgd"
        else torch.optim.Adam(net.parameters(), lr=p.get("lr", 1e-3))
    )
    autocast, _ = runtime.mixed_precision(cfg.trainer.amp, device, conv=True)
    return net, opt, autocast, last


def step(net, opt, autocast, last: bool, xb: torch.Tensor, yb: torch.Tensor) -> None:
    if last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with autocast():
        loss = F.cross_entropy(net(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def one_epoch(
    kind: str, model: str, data: Data, host: tuple[torch.Tensor, torch.Tensor], device: torch.device, cfg=None
) -> float:
    cfg = cfg or config(model, device)
    batch = cfg.trainer.batch_size
    if kind == "dnnrun":
        return dnnrun_epoch(cfg, data, device)
    net, opt, autocast, last = prepared(cfg, data, device)
    if kind == "plain":  # index slices of the device tensors, as dnnrun takes them

        def epoch():
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1)).to(device)
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                step(net, opt, autocast, last, data.train.x[idx], data.train.y[idx])

        return timed(epoch)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*host), batch_size=batch, shuffle=True, pin_memory=device.type == "cuda"
    )

    def epoch():
        for xb, yb in loader:
            step(net, opt, autocast, last, xb.to(device, non_blocking=True), yb.to(device, non_blocking=True))

    return timed(epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    device = runtime.resolve_device(args.device)
    runtime.warm_up()
    print(
        f"device {runtime.device_name(device)}, {args.samples} examples, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'model':>7} {'plain s/epoch':>14} {'DataLoader s':>13} {'dnnrun s/epoch':>15} {'dnnrun/plain':>13} "
        f"{'dnnrun/DataLoader':>18}"
    )
    kinds = ("plain", "dataloader", "dnnrun")
    for model in args.models:
        shape = MODELS[model][1]
        g = torch.Generator().manual_seed(0)
        x_host = torch.randint(0, 256, (args.samples, *shape), generator=g, dtype=torch.uint8).float() / 255
        y_host = torch.randint(0, 10, (args.samples,), generator=g)
        x, y = x_host.to(device), y_host.to(device)
        held = Split(x[: args.samples // 50], y[: args.samples // 50])  # a validation pass of 2% of an epoch
        data = Data(Split(x, y), held, held, n_features=x[0].numel(), n_classes=10, shape=shape, unlabeled=x)
        for kind in kinds:  # one untimed epoch each: allocators, cuDNN's algorithm choice
            one_epoch(kind, model, data, (x_host, y_host), device)
        times = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                times[kind].append(one_epoch(kind, model, data, (x_host, y_host), device))
        plain, loader, ours = (min(times[kind]) for kind in kinds)
        print(f"{model:>7} {plain:>14.3f} {loader:>13.3f} {ours:>15.3f} {ours / plain:>13.3f} {ours / loader:>18.3f}")


if __name__ == "__main__":
    main()
