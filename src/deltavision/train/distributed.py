"""Data-parallel training over several processes, launched by ``torchrun``.

deltavision starts no processes of its own: ``torchrun --nproc_per_node=N -m
deltavision train ...`` (and its rendezvous flags for several machines) sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, and :func:`setup` joins the process
group (gloo on the CPU, NCCL on CUDA). Gradients are averaged by
:class:`~torch.nn.parallel.DistributedDataParallel`. Each process reads a
distinct shard of every epoch (one shuffling per seed and epoch, the same in
every process), validation images are split so that each counts exactly once,
and the sums of the metrics are reduced across processes. Only rank 0 writes
files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def setup(device: torch.device) -> World:
    """Join the process group when launched by torchrun; a single process otherwise."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over every process (float64, so counts stay exact)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_flag(flag: bool, world: World) -> bool:
    """Rank 0's ``flag`` in every process (so all stop together on rank 0's error)."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([int(flag)])
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
