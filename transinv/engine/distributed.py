"""torchrun support: shard images by rank, add metric state across processes, rank 0 reports.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process measures ``items[rank::world]``: no image is
counted twice or lost, whatever the count. The additive state then crosses processes with one
``all_reduce`` (gloo on CPU, nccl on CUDA); every rank reaches it, even one with no images.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th one, starting at ``rank`` (no padding, no repeats)."""
        return list(items[self.rank :: self.world])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over all processes (in place; identity outside torchrun)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj`` (picklable), in rank order; ``[obj]`` outside torchrun."""
        if not self.active:
            return [obj]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered


def from_env() -> Context:
    """Read torchrun's environment; ``init`` must follow before any collective."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Context(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def session(context: Context, device: torch.device) -> Iterator[Context]:
    """The process group for one run: joined on entry (gloo for CPU, nccl for CUDA) and left on
    exit, for the CLI and a notebook alike. A group the caller joined already is left to them."""
    joined = context.active and not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield context
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
