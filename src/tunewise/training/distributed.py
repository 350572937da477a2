"""Distributed helpers: which process this is, how many there are, and the few numbers they must agree on.

torchrun sets RANK (the global rank, over every node), WORLD_SIZE (every process of every node) and
LOCAL_RANK (the process on its own machine: which device it uses). Only the global main process writes
the run directory and prints; every process trains. The doctor's stop decision must be the same on
every process, or the ones that go on wait forever in the next gradient all-reduce: the step's loss is
averaged over the processes before the doctor sees it (`mean_over_processes`) and the stop is agreed
(`agree_on_max`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def is_main_process() -> bool:
    """Global rank 0 (over every node, not LOCAL_RANK), or a run without torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """The number of data-parallel processes over every node (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def machines_of_run() -> int:
    """The machines the processes are on: WORLD_SIZE over torchrun's LOCAL_WORLD_SIZE (1 without torchrun)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return max(world_size() // local, 1) if local else 1


def _distributed() -> bool:
    """True inside a process group of more than one process (the Trainer initialises it)."""
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over every process (the value itself in a single process).

    Each process's loss is its own micro-batches'; DDP averages the gradients, not the losses, so the
    doctor (and the update guard) would judge a different number on each process.
    """
    if not _distributed():
        return value
    import torch.distributed as dist

    total = value.detach().double().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / world_size()).to(value.dtype)


def agree_on_max(code: int, device: torch.device | str | None = None) -> int:
    """The largest of every process's `code` (the code itself in a single process): a stop one process
    decides is every process's stop. Every process must call it at the same point of the step."""
    if not _distributed():
        return code
    import torch
    import torch.distributed as dist

    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([code], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def leave_process_group() -> None:
    """Tear the process group down before the process exits, as torch asks (NCCL warns at every exit
    of a process that left its group to the interpreter's shutdown)."""
    if _distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
