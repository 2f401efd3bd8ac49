"""Several processes training one model, with PyTorch's DistributedDataParallel: started by
torchrun (`torchrun --nproc_per_node=N -m dnnrun ...`, on each of several machines with
`--nnodes`), or as the tasks of one Slurm job step (`srun --ntasks=N dnnrun ...`). Every rank holds
the whole dataset on its device and takes its own slice of each global batch; gradients are
averaged by DDP, training figures summed across ranks, and only rank 0 writes the run directory.

Without torchrun's environment (WORLD_SIZE unset or 1) and outside a Slurm step of several tasks,
every function here is a no-op.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that talk to the process group: the command line asks only
# launched_rank(), before it knows whether it will train.


def init_from_env(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun or Slurm describes in the environment; returns (rank, world
    size). NCCL for GPUs, gloo for CPUs (also on a machine with GPUs when trainer.device=cpu)."""
    import torch
    import torch.distributed as dist

    slurm = _slurm_step()
    if int(os.environ.get("WORLD_SIZE") or slurm.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        gpus = torch.cuda.is_available() and device != "cpu"
        if gpus:
            torch.cuda.set_device(local_rank())
        if slurm:  # rank 0's task listens at MASTER_ADDR:MASTER_PORT, the others connect to it
            dist.init_process_group(
                "nccl" if gpus else "gloo",
                init_method=f"tcp://{slurm['MASTER_ADDR']}:{slurm['MASTER_PORT']}",
                rank=slurm["RANK"],
                world_size=slurm["WORLD_SIZE"],
            )
        else:
            dist.init_process_group("nccl" if gpus else "gloo")
    return rank_world()


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's rank on its machine: the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK") or _slurm_step().get("LOCAL_RANK", 0))


def launched_rank() -> int:
    """The rank torchrun or Slurm gave this process, before the process group exists."""
    return int(os.environ.get("RANK") or _slurm_step().get("RANK", 0))


def _slurm_step() -> dict:
    """What torchrun would have said to a task of a Slurm job step of several tasks (`srun
    --ntasks=2 dnnrun ...`; Hydra's Slurm launcher with hydra.launcher.tasks_per_node=2): {} under
    torchrun (`srun torchrun ...` leaves it to torchrun) and outside such a step. The step's task
    count, not the job's: a batch script or an `salloc` shell of a job of several tasks is one
    process. Rank 0 runs on the step's first node; MASTER_ADDR and MASTER_PORT, if set, are used."""
    env = os.environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or tasks < 2:
        return {}
    job, step = int(env["SLURM_JOB_ID"]), int(env.get("SLURM_STEP_ID", "0"))
    nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    return {
        "RANK": int(env["SLURM_PROCID"]),
        "WORLD_SIZE": tasks,
        "LOCAL_RANK": int(env.get("SLURM_LOCALID", "0")),
        "MASTER_ADDR": env.get("MASTER_ADDR") or _first_host(nodes),
        # one port per job step, the same on every task; consecutive jobs on a node get different ones
        "MASTER_PORT": int(env.get("MASTER_PORT") or 20000 + (job * 16 + step % 16) % 40000),
    }


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: "gpu[007-009,012],cpu1" -> "gpu007"."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist).group()  # up to the first comma outside brackets
    return re.sub(r"\[([^-,\]]*)[^\]]*\]", r"\1", first)  # each bracket: its first number, zeros kept


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
