"""Multi-process training under torchrun: which process this is, the process group, shared decisions.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK. Without them the world is one process and
everything here is a no-op, so single-process training runs the same code. Gradients go
through the default group (NCCL on CUDA, gloo on CPU); small decisions every rank must
share (stop now? validation mIoU of rank 0) go through a gloo group, so they never wait
on the GPU.

This module must not train or write anything; importing it touches nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def primary(self) -> bool:
        """The process that logs, tracks and writes files (rank 0)."""
        return self.rank == 0


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The World torchrun describes in the environment; a world of one without it."""
    env = os.environ if env is None else env
    values = {}
    for key, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        raw = env.get(key)
        try:
            values[key] = default if raw in (None, "") else int(raw)
        except ValueError:
            raise ValueError(f"environment variable {key}={raw!r}: not an integer") from None
    world = World(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise ValueError(f"environment: RANK={world.rank} must lie in [0, WORLD_SIZE={world.size})")
    return world


def device_for(world: World) -> torch.device:
    """This process's device: its own GPU (cuda:LOCAL_RANK) when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[object | None]:
    """Join the process group for the duration (NCCL on CUDA, gloo on CPU); yields the gloo
    group for shared decisions, or None in a world of one. Leaves a group it did not create."""
    if world.size == 1:
        yield None
        return
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    try:
        yield control
    finally:
        if created:
            dist.destroy_process_group()


def any_rank(flag: bool, group) -> bool:
    """True on every rank when `flag` is true on any (e.g. one rank ran out of its time budget)."""
    if group is None:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def from_primary(values: list[float], group) -> list[float]:
    """Rank 0's `values` on every rank (same length everywhere)."""
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(t, src=0, group=group)
    return t.tolist()


def mean_over_ranks(value: float, group) -> float:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)
