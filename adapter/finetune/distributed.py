"""Running under `torchrun`: one process per device, gradients averaged by DistributedDataParallel.

Outside torchrun (no WORLD_SIZE in the environment, or 1) everything here is a no-op, so the same trainer
code runs as a single process.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs and the progress bar."""
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over all processes (in place)."""
        if self.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def start(device: torch.device) -> Processes:
    """Join the process group torchrun set up: nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    processes = Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return processes


def stop(processes: Processes) -> None:
    if processes.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, processes: Processes) -> torch.device:
    """Each process on its own GPU (cuda -> cuda:LOCAL_RANK); CPU processes share the host."""
    if device.type == "cuda" and processes.world > 1 and device.index is None:
        device = torch.device("cuda", processes.local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def wrap(model: nn.Module, processes: Processes) -> nn.Module:
    """DistributedDataParallel over the learned tensors only: the frozen base is identical on every process
    already (same files), so it is neither broadcast at start nor watched for gradients."""
    if processes.world <= 1:
        return model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device = next(p for p in model.parameters() if p.requires_grad).device
    # a process whose micro-batch holds no picture leaves the visual prompt out of its graph: DDP must look for
    # such tensors (a step where none is used anywhere keeps no gradient, as one process does)
    sees = getattr(model, "visual_prompt", None) is not None
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=sees)


def no_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Accumulate gradients locally on all micro-batches but the last of a step."""
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
