"""Several processes through torchrun: process-group set-up, each process's device, who writes, and sums across them.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for
each process it starts. Without them a run is a single process and every
helper here is a no-op, so the training code has one path for both.

On GPUs the process group has two backends: NCCL for CUDA tensors (the
gradient all-reduce) and gloo for CPU tensors (the small sums of losses,
counts and flags, and ``gather``'s pickled objects). NCCL alone has no CPU
collectives, so a sum of a CPU tensor would fail at the first step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deit.errors import DeitError


class DeviceError(DeitError, RuntimeError):
    """A device asked for that this machine does not have."""


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only this process writes files and logs progress."""
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``values`` over all processes (a new tensor; the input is untouched)."""
        total = values.detach().clone()
        if self.enabled:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def concat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (the same shape on each), concatenated along dim 0 in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every process (a new tensor)."""
        result = tensor.detach().clone()
        if self.enabled:
            dist.broadcast(result, src=0)
        return result

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order (small picklable objects only)."""
        if not self.enabled:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_environment() -> Distributed:
    """The process layout torchrun describes in the environment (one process when it is absent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, layout: Distributed | None = None) -> torch.device:
    """The device to run on; under torchrun, ``auto`` and ``cuda`` mean this process's GPU (LOCAL_RANK)."""
    local_rank = layout.local_rank if layout is not None and layout.enabled else None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name} asked for, but CUDA is not available on this machine")
    return device


def backend_for(device: torch.device) -> str:
    """gloo for CPU runs; on CUDA, NCCL for CUDA tensors and gloo for the CPU tensors some sums use."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_process_group(layout: Distributed, device: torch.device) -> None:
    """Join the process group (once per process) with ``backend_for(device)``."""
    if not layout.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend_for(device))


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
