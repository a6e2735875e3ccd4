"""Process groups from torchrun's environment; checks that all ranks agree; exact metric sums.

``torchrun --nproc_per_node=N [--nnodes=M ...] tools/train_cls.py`` sets RANK, WORLD_SIZE and
LOCAL_RANK; a plain ``python tools/train_cls.py`` is a world of one with no process group.
NCCL is used on CUDA, gloo on CPU.

Whatever one rank decides alone (the output-folder lock, a stop signal, its data) is shared
with all ranks before it matters, so that they fail or stop together: a rank that leaves on
its own leaves the others waiting in a collective until a timeout.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rwdet.run.errors import UserError, one_line
from rwdet.run.lock import OutputDirLock


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    # A gloo group beside NCCL for the per-step stop vote: a CPU all-reduce does not wait
    # for the GPU stream. None: the default group (gloo already) or no group at all.
    cpu_group: object = None

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
    cpu_group = None
    if world > 1 and dist.get_backend() != "gloo":
        cpu_group = dist.new_group(backend="gloo")
    return DistInfo(rank, world, local_rank, dev, cpu_group)


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
        raise UserError(f"{what} differs across ranks ({per_rank}); {fix}")


def check_same_data_on_all_ranks(classes: list, sizes: dict[str, int]) -> None:
    """Fail on every rank unless all ranks found the same class folders and split sizes.

    Each node lists its own ``--data`` folder; node-local copies that differ would otherwise
    surface as DDP's parameter-shape error (a head of another width) or as a hang (another
    number of batches per epoch).
    """
    values = all_gather_object((list(classes), dict(sizes)))
    ref_classes, ref_sizes = values[0]
    problems = []
    for rank, (cls, size) in enumerate(values[1:], start=1):
        if cls != ref_classes:
            i = next((i for i, (a, b) in enumerate(zip(ref_classes, cls)) if a != b), None)
            if i is None:  # one list is the start of the other
                i = min(len(cls), len(ref_classes))
            first = [repr(c[i]) if i < len(c) else "none" for c in (ref_classes, cls)]
            problems.append(
                f"rank 0 has {len(ref_classes)} classes, rank {rank} has {len(cls)}; the first "
                f"difference is class #{i}: {first[0]} on rank 0, {first[1]} on rank {rank}"
            )
        elif size != ref_sizes:
            problems.append(f"rank 0 has images {ref_sizes}, rank {rank} has {size}")
    if problems:
        if len(problems) > 3:  # one line, even for a job of many nodes
            problems = [*problems[:3], f"and {len(problems) - 3} more ranks"]
        raise UserError(
            f"the data differs across ranks ({'; '.join(problems)}); every process must see the "
            f"same class folders and images: put --data on storage shared by all nodes, or copy "
            f"the same train/ and val/ folders to every node"
        )


@contextmanager
def output_dir_lock(output_dir: str, d: DistInfo, what: str = "run"):
    """Rank 0 holds ``output_dir`` for the block (one run per folder: only rank 0 writes there).

    The outcome is shared before the block starts, so if rank 0 is refused every rank raises
    at once instead of waiting for it in the first collective.
    """
    lock = OutputDirLock(output_dir, what)
    error = None
    if d.is_main:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others were told
            error = e
    refused = all_gather_object(None if error is None else one_line(error))[0]
    if error is not None:
        raise error
    if refused is not None:
        raise UserError(f"rank 0 could not take the output folder: {refused}")
    try:
        yield lock
    finally:
        lock.release()


def agree_on_stop(signame: str | None, d: DistInfo) -> str | None:
    """The stop signal if any rank received one, else None; the same answer on every rank.

    Called after every step by every rank, so that all ranks stop after the same step even
    when only one was signalled. SIGTERM wins over SIGINT (a scheduler outranks a terminal).
    """
    if not d.distributed or not dist.is_initialized():
        return signame
    code = 0
    if signame is not None:  # a name that is no signal (a request from code) counts as SIGTERM
        code = signal.Signals.__members__.get(signame, signal.SIGTERM).value
    t = torch.tensor([code], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.cpu_group)
    code = int(t.item())
    return signal.Signals(code).name if code else None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
