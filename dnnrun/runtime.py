"""What every command that runs a model shares: the device, the seeds, mixed precision, the
model the config describes, and the versions a run records. Used by train, evaluate, lr_find and
bench/."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING

import torch

from dnnrun import distributed, model as model_mod, regularizers
from dnnrun.errors import UserError

if TYPE_CHECKING:
    from dnnrun.config import RunConfig
    from dnnrun.data import Data

log = logging.getLogger("dnnrun")


@functools.cache
def warm_up() -> None:
    """The first optimizer a process builds makes torch import its compiler stack (torch._dynamo:
    1-3 s on 2 cores). Done once per process before a run's clock starts, so that the first job of
    a sweep is timed like the others."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def resolve_device(name: str) -> torch.device:
    """trainer.device as a torch device, refused (UserError) when this machine does not have it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.rank_world()[1] > 1:
        name = f"cuda:{distributed.local_rank()}"  # under torchrun, each rank on its own GPU
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name}, but no CUDA device is available; use trainer.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"trainer.device={name}, but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.device=mps, but MPS is not available; use trainer.device=auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call imports torch._inductor (1.5 s)
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS


def mixed_precision(enabled: bool, device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager],
                                                                    torch.amp.GradScaler | None]:
    """(autocast context factory, GradScaler or None). fp16 needs loss scaling; bf16 does not."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type != "cuda":
        log.warning("trainer.amp=true works on CUDA only; training in float32 on %s", device)
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def inputs_of(data: Data) -> model_mod.Inputs:
    return model_mod.Inputs(features=data.n_features, classes=data.n_classes, shape=data.shape)


def build_model(cfg: RunConfig, data: Data, model_cfg=None) -> tuple[model_mod.Network, regularizers.Regularization]:
    """The model the config describes, for this data (`model_cfg` replaces cfg.model: the widths of
    a checkpoint or a transfer source), and the regularization its training step applies."""
    reg = regularizers.combine(cfg.regularizer)
    layers = model_mod.Layers(act=cfg.act, norm=cfg.norm, init=cfg.init, reg=reg)
    return model_mod.build(model_cfg or cfg.model, inputs_of(data), layers), reg


SLOW_LAYERS = 1000  # layers beyond which a step runs so many kernels one after another that a warning is due


def memory_problem(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> str | None:
    """Whether the model, built on the meta device (no memory), can train on `device`: its
    weights, gradients and optimizer state (optim.OPTIMIZERS' `state`) and the activations of a
    batch, in float32, against the memory free there. None when it fits or the free memory is
    unknown (MPS); a warning is logged when its depth makes every step very slow."""
    from dnnrun import optim

    params = sum(p.numel() for p in model.parameters())
    affine = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    units = sum(m.weight.shape[0] for m in affine)  # outputs per example (per position, for conv layers)
    batch = max(cfg.trainer.batch_size, cfg.trainer.eval_batch_size)
    # linear, norm, activation and dropout outputs kept for the backward pass
    needed = 4 * (params * (2 + optim.OPTIMIZERS[cfg.optimizer.name].state) + 4 * batch * units)
    if len(affine) > SLOW_LAYERS:
        log.warning("the model has %s layers: every step runs them one after another (forward and backward), "
                    "which takes long whatever their width", f"{len(affine):,}")
    free = free_memory(device)
    if free is None or needed <= free:
        return None
    return (f"the model needs about {needed / 2**30:,.1f} GiB to train ({params:,} parameters: weights, gradients "
            f"and {cfg.optimizer.name}'s state, plus a batch's activations, in float32) and {device_name(device)} "
            f"has {free / 2**30:,.1f} GiB free; make it smaller (model.hidden, model.depth, model.width) or lower "
            f"trainer.batch_size and trainer.eval_batch_size")


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on the device: CUDA's own figure, the kernel's
    MemAvailable for the CPU (else the free pages); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("dnnrun", "hydra-core", "omegaconf", "numpy", "torchvision"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
