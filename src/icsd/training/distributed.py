"""Ranks from the environment that ``torchrun`` and ``accelerate launch`` set (RANK, WORLD_SIZE, ...).

One process per device: NCCL between GPUs, gloo between CPU processes. Without those variables
the trainer runs as a single process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError
from ..executor import resolve_device


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    device: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_ranks(device: str = "auto") -> Ranks:
    """Join the process group when launched by torchrun/accelerate; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev == "cuda" or dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no GPU is visible")
        dev = f"cuda:{local}" if world > 1 or dev == "cuda" else dev
        torch.cuda.set_device(torch.device(dev))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    return Ranks(rank=rank, world=world, local_rank=local, device=dev)


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_lists(items: list[Any], ranks: Ranks) -> list[Any]:
    """Every rank's JSON-able list concatenated in rank order (the same on all ranks)."""
    if not ranks.distributed:
        return list(items)
    device = torch.device(ranks.device)
    payload = torch.tensor(list(json.dumps(items).encode("utf-8")), dtype=torch.uint8, device=device)
    size = torch.tensor([payload.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(ranks.world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    parts = [torch.zeros_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    out: list[Any] = []
    for part, n in zip(parts, sizes, strict=True):
        out.extend(json.loads(bytes(part[: int(n)].tolist()).decode("utf-8")))
    return out
