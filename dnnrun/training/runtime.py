"""What every command that runs a model shares: the device, the seeds, mixed precision, the
model the config describes, and the versions a run records. Used by train, evaluate, lr_find and
bench/."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING

import torch

from dnnrun.errors import UserError
from dnnrun.models import registry as model_mod
from dnnrun.techniques import regularizers
from dnnrun.training import distributed

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig
    from dnnrun.data.datasets import Data, DataConfig

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


def has_conv(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def mixed_precision(
    setting: bool | str, device: torch.device, conv: bool
) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler | None]:
    """(autocast context factory, GradScaler or None) for trainer.amp: true, false, or auto (on CUDA
    for conv nets, whose convolutions gain most). fp16 needs loss scaling; bf16 does not."""
    if setting is False or (setting == "auto" and not (conv and device.type == "cuda")):
        return contextlib.nullcontext, None
    if device.type != "cuda":
        log.warning("trainer.amp=true works on CUDA only; training in float32 on %s", device)
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def channels_last(setting: bool | str, device: torch.device, model: torch.nn.Module) -> bool:
    """Whether the model and its input batches use the channels-last memory format (NHWC), which
    cuDNN's convolutions prefer, above all under mixed precision: trainer.channels_last true, or
    auto (on CUDA). Conv nets only: a model without conv layers keeps its format, with a warning
    when true asked for it."""
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return False
    if not has_conv(model):
        if setting is True:
            log.warning("trainer.channels_last=true applies to conv layers; this model has none, so it is not used")
        return False
    return True


class Compiled:
    """trainer.compile=true: the forward pass through torch.compile, falling back to the module as
    it is, with a warning, where compiling fails (no C++ compiler for the CPU backend, a platform
    torch.compile does not support, an operation it cannot trace). Failures are looked for until
    the first compiled call succeeds; after that, errors are the model's and are raised."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        try:
            self.compiled: Callable | None = torch.compile(module)
        except Exception as exc:  # e.g. RuntimeError on a Python version torch.compile does not support
            self._fall_back(exc)
        self.proven = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.module(x)
        if self.proven:
            return self.compiled(x)
        try:
            out = self.compiled(x)
        except Exception as exc:  # torch's compile errors have no public base class
            self._fall_back(exc)
            return self.module(x)
        self.proven = True
        return out

    def _fall_back(self, exc: Exception) -> None:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        log.warning("trainer.compile=true: torch.compile failed here (%s); training without it", reason)
        self.compiled = None


def load_data(data_cfg: DataConfig, model_cfg, device: torch.device) -> Data:
    """The data as the model takes it: a zoo network normalizes pixels in [0, 1] itself, with its
    weights' mean and std, so data.scaling is unit for it."""
    from dnnrun.data import datasets as data

    if model_mod.MODELS[model_cfg.name].own_inputs and data_cfg.scaling != "unit":
        log.info(
            "model=%s: pixels scaled to [0, 1], then normalized with its weights' mean and std "
            "(data.scaling=%s does not apply)",
            model_cfg.name,
            data_cfg.scaling,
        )
        data_cfg = dataclasses.replace(data_cfg, scaling="unit")
    return data.load(data_cfg, device)


def inputs_of(data: Data, resize: int | None = None) -> model_mod.Inputs:
    return model_mod.Inputs(features=data.n_features, classes=data.n_classes, shape=data.shape, resize=resize)


def build_model(cfg: RunConfig, data: Data, model_cfg=None) -> tuple[model_mod.Network, regularizers.Regularization]:
    """The model the config describes, for this data (`model_cfg` replaces cfg.model: the widths of
    a checkpoint or a transfer source), and the regularization its training step applies."""
    return build_for(cfg, inputs_of(data, cfg.data.resize), model_cfg)


def build_for(
    cfg: RunConfig, inputs: model_mod.Inputs, model_cfg=None
) -> tuple[model_mod.Network, regularizers.Regularization]:
    """build_model for inputs described without their data (inference/predict.py: from a checkpoint)."""
    reg = regularizers.combine(cfg.regularizer)
    layers = model_mod.Layers(act=cfg.act, norm=cfg.norm, init=cfg.init, reg=reg)
    return model_mod.build(model_cfg or cfg.model, inputs, layers), reg


SLOW_LAYERS = 1000  # layers beyond which a step runs so many kernels one after another that a warning is due


def memory_problem(
    model: torch.nn.Module,
    cfg: RunConfig,
    device: torch.device,
    example: tuple[int, ...] | None = None,
    members: int = 1,
) -> str | None:
    """Whether the model, built on the meta device (no memory), can train on `device`: its
    weights, gradients and optimizer state (optim.OPTIMIZERS' `state`) and the activations of a
    batch, in float32, against the memory free there. None when it fits or the free memory is
    unknown (MPS); a warning is logged when its depth makes every step very slow. A conv net's
    activations (their size depends on the maps') are measured by a pass of one `example`
    shape (C, H, W) on the meta device. With `members` (trainer.seeds), that many models train at once."""
    params = sum(p.numel() for p in model.parameters())
    needed = memory_needed(model, cfg, example, members)
    affine = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    if len(affine) > SLOW_LAYERS:
        log.warning(
            "the model has %s layers: every step runs them one after another (forward and backward), "
            "which takes long whatever their width",
            f"{len(affine):,}",
        )
    free = free_memory(device)
    if free is None or needed <= free:
        return None
    which = f"{members} members of the model need" if members > 1 else "the model needs"
    remedies = [
        f"make it smaller ({_SIZES.get(cfg.model.name, 'model.*')})",
        "lower trainer.batch_size and trainer.eval_batch_size",
        *(["list fewer trainer.seeds"] * (members > 1)),
    ]
    return (
        f"{which} about {needed / 2**30:,.1f} GiB to train ({params:,} parameters: weights, gradients "
        f"and {cfg.optimizer.name}'s state, plus a batch's activations, in float32) and {device_name(device)} "
        f"has {free / 2**30:,.1f} GiB free; {', '.join(remedies[:-1])} or {remedies[-1]}"
    )


def memory_needed(
    model: torch.nn.Module, cfg: RunConfig, example: tuple[int, ...] | None = None, members: int = 1
) -> int:
    """Bytes that training the model (built on the meta device) takes, in float32: weights,
    gradients, the optimizer's state and a batch's activations (bench/gpu.py holds this to
    torch.cuda.max_memory_allocated)."""
    from dnnrun.optim import optimizers

    params = sum(p.numel() for p in model.parameters())
    affine = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    batch = max(cfg.trainer.batch_size, cfg.trainer.eval_batch_size)
    values = _output_values(model, example) if example is not None and has_conv(model) else None  # one example's
    if values is None:  # linear, norm, activation and dropout outputs kept for the backward pass
        values = 4 * sum(m.weight.shape[0] for m in affine)
    return 4 * members * (params * (2 + optimizers.OPTIMIZERS[cfg.optimizer.name].state) + batch * values)


_SIZES = {
    "mlp": "model.hidden, model.depth, model.width",
    "cnn": "model.channels, model.head, data.resize",
    "resnet": "model.depth, model.width, data.resize",
    "zoo": "model.arch, data.resize",
}  # what sets a model's size


def _output_values(model: torch.nn.Module, example: tuple[int, ...]) -> int | None:
    """The values every leaf layer outputs for one example: what a training step keeps for the
    backward pass, measured on the meta device (no memory, no arithmetic), in evaluation mode (batch
    norm cannot train on one example). None where the pass fails (an architecture that computes
    with its inputs' values)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.empty((1, *example), device="meta"))
    except Exception:  # an estimate: the other one will do
        return None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total


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
