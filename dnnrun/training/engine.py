"""What the training loop asks of an engine, and what each engine supports.

The loop (loop.py) is the same for one model and for K members trained together (trainer.seeds);
what differs sits behind one small interface, implemented twice:

    ModuleEngine   (module_engine.py) one nn.Module: DistributedDataParallel, mixed precision,
                   channels-last, torch.compile, the hooks of the per-layer diagnostics
    StackedEngine  (members.py) K members' weights stacked, one vmapped forward pass

    k                      members trained (1 for a module)
    step(xb, yb, active, after_backward, stopping) -> Step
                           one update of the active members on their batches
    evaluate(split, batch_size) -> (loss[K], acc[K])   in evaluation mode
    end_epoch(records)     the schedule's epoch (records: member -> its metrics.jsonl record)
    lr(k)                  the rate member k's last step used
    state_dict(), load_state_dict(state, path)         model, optimizer, schedule, scaler
    weights(k), load_weights(k, weights)               member k's state_dict, as a single run's
    retire(k, saved)       member k diverged: it trains no more (StackedEngine)

A feature the loop offers either works for both engines or is refused, with its reason, for the
engine that does not declare it in `Capabilities`. The declarations import no torch: the config
check (config/run_config.py) reads them before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What an engine supports besides what every engine does (the schedules, clipping, the
    regularizers, early stopping, eval_train, loggers, checkpoints and resume, signals). Each
    unsupported feature names what stands in its way."""

    amp: str | None = None  # None: supported; else why not
    channels_last: str | None = None
    compile: str | None = None
    distributed: str | None = None
    diagnostics: str | None = None
    pretrain: str | None = None
    transfer: str | None = None


MODULE = Capabilities()
STACKED = Capabilities(
    channels_last="the members' batches are 5-D (member, example, C, H, W): no 4-D memory format applies",
    compile="torch.compile does not trace the vmapped forward pass of the members yet",
    distributed="members share one process; torchrun's processes would each train all of them",
    diagnostics="the per-layer statistics hook a module's layers, and the members run as one vmapped function",
    pretrain="pretraining fits one model's layers one by one",
    transfer="transfer copies a source's weights into one model",
)


# Devices on which reading a value on the host costs nothing, as nothing runs ahead of the host:
# engines read each step's loss there and leave a non-finite one's update out (their `guard`).
# Elsewhere (CUDA) the loop reads the losses every loop.CHECK_EVERY steps and before any checkpoint.
READ_EACH_STEP = ("cpu",)


class Step(NamedTuple):
    """One update's figures, left on the device (reading them would wait for it): (K,) tensors
    for K members. `norm`: the gradient norm before clipping (trainer.clip_norm, without fp16's
    loss scaling), else None. `skipped`: the members whose update the engine left out because
    their loss or gradient norm was not finite, when it checked (`guard`: on the CPU, where reading
    costs nothing), else None."""

    loss: torch.Tensor
    predicted: torch.Tensor  # (B,) or (K, B): the classes predicted for the batch ...
    labels: torch.Tensor  # ... and the labels, compared at the epoch's end (fewer small ops a step)
    norm: torch.Tensor | None
    skipped: list[int] | None
    stopping: bool  # a signal asked to stop after this step (agreed between torchrun's processes)
