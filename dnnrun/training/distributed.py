"""Several processes training one model (`torchrun --nproc_per_node=N -m dnnrun ...`), with
PyTorch's DistributedDataParallel. Every rank holds the whole dataset on its device and takes its
own slice of each global batch; gradients are averaged by DDP, training figures summed across
ranks, and only rank 0 writes the run directory.

Without torchrun's environment (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that talk to the process group: the command line asks only
# launched_rank(), before it knows whether it will train.


def init_from_env(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns (rank, world size).
    NCCL for GPUs, gloo for CPUs (also on a machine with GPUs when trainer.device=cpu)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available() and device != "cpu":
            torch.cuda.set_device(local_rank())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return rank_world()


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_rank() -> int:
    """The rank torchrun gave this process, before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def broadcast(obj):
    """Rank 0's value of obj, on every rank."""
    if rank_world()[1] == 1:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (the values themselves in a single process)."""
    if rank_world()[1] == 1:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
