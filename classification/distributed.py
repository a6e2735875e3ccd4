"""Process groups from torchrun's environment; identical-graph check; exact metric sums.

``torchrun --nproc_per_node=N [--nnodes=M ...] tools/train_cls.py`` sets RANK, WORLD_SIZE and
LOCAL_RANK; a plain ``python tools/train_cls.py`` is a world of one with no process group.
NCCL is used on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda was requested but CUDA is not available; use cpu")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                f"visible; start at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(value) -> list:
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def check_same_on_all_ranks(value: str, what: str, fix: str | None = None) -> None:
    """Fail on every rank (none hangs) unless all ranks hold the same ``value``.

    Rank 0's value is the reference, as if broadcast; every rank receives all values so the
    error is raised everywhere at once.
    """
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        per_rank = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
        fix = fix or (
            "every rank must build the same network: give all processes the same flags, "
            "config and rwdet version"
        )
        raise RuntimeError(f"{what} differs across ranks ({per_rank}); {fix}")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
