"""Data-parallel fine-tuning under ``torchrun``: the process group, a class-balanced sharded
sampler, and the few collective calls the training loop needs.

Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op and training runs
exactly as a single process always has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel workers."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """The process that evaluates, checkpoints and writes the model folder."""
        return self.rank == 0


def init_world(device: str) -> World:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU), if there is one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and device != "cpu"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    else:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    return World(dist.get_rank(), dist.get_world_size(), local, backend)


def close_world(world: World, wait: bool = True) -> None:
    """Leave the process group; normally after every process got there (not after an error)."""
    if world.size > 1:
        import torch.distributed as dist

        if wait:
            dist.barrier()
        dist.destroy_process_group()


def broadcast(value: Any, world: World) -> Any:
    """The main process's ``value``, on every process."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rng(world: World) -> list[torch.Tensor]:
    """Every process's torch RNG state, in rank order (for exact resume).

    Returns:
        ``world.size`` (n_bytes,) uint8 tensors, ``torch.get_rng_state()`` of each rank.
    """
    state = torch.get_rng_state()
    if world.size == 1:
        return [state]
    import torch.distributed as dist

    out: list = [None] * world.size
    dist.all_gather_object(out, state)
    return out


class ShardedEpochSampler(Sampler[int]):
    """Every rank draws the same seeded epoch sample, then takes its own stride of it.

    With ``weights`` the sample is class-balanced (with replacement), as in the single-process
    ``WeightedRandomSampler``; without, a permutation. Ranks get equal counts.
    """

    def __init__(self, weights: torch.Tensor | None, n: int, seed: int, world: World) -> None:
        self.weights = weights
        self.n = n
        self.seed = seed
        self.world = world

    def __len__(self) -> int:
        return self.n // self.world.size

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, True, generator=gen)
        else:
            order = torch.randperm(self.n, generator=gen)
        usable = len(self) * self.world.size
        return iter(order[self.world.rank:usable:self.world.size].tolist())
