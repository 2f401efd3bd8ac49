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
