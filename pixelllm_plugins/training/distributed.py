"""Data-parallel plumbing: ``torchrun`` environment -> process group, rank helpers.

Run ``torchrun --nproc_per_node=N -m pixelllm_plugins.cli train ...`` (or call ``train`` in processes
that have ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set). The backend is ``nccl`` on GPUs
and ``gloo`` on CPU. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import TrainingError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # we created the process group (so we destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistContext:
    """Join the process group described by the environment (no-op for a single process)."""
    want_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device("cuda" if want_cuda else "cpu") if device == "auto" else torch.device(device)
        return DistContext(device=dev)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrainingError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun "
                            "(torchrun --nproc_per_node=N ...) or set the variables yourself")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", rank=rank, world_size=world)
        created = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=created)


def teardown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def mean_losses(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """Average loss terms over ranks; a term only some ranks have (their batches came from different
    sources) is averaged over those ranks."""
    if not ctx.enabled:
        return values
    per_rank = gather_objects(ctx, values)
    keys = sorted({k for r in per_rank for k in r})
    return {k: sum(r[k] for r in per_rank if k in r) / sum(k in r for r in per_rank) for k in keys}


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON-like values / CPU tensors), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
