"""Multi-process training with torch.distributed: process group, ranks and the few collectives
the trainer needs.

Under ``torchrun`` every worker process finds its place in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); ``init_from_env`` turns that into a
process group (NCCL between GPUs, gloo on CPU). Without those variables nothing is
initialised and every helper here is a no-op for the single process, so the trainer's
single-process path pays nothing for the distributed one.

Rank 0 is the run's voice: it alone evaluates, writes the run folder and talks to the bus.
The other ranks train on their shard of the batches in lockstep with it and take every
decision (commands, pause, stop, the checkpoint to resume or roll back to) from its
broadcasts, so no rank ever decides anything on its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")

_REQUIRED_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a collective may wait for a rank. The longest honest wait is the other ranks'
# at start-up while rank 0 alone extracts the features of a large corpus (in_turns);
# torchrun ends every worker as soon as one fails, so a long limit hides no crash.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run: one of ``world_size`` ranks, or alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank on this machine: which GPU it drives
    backend: str | None = None  # "nccl" or "gloo"; None when not distributed

    @property
    def distributed(self) -> bool:
        """More than one process trains this run."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: evaluates, writes the run folder, talks to the bus."""
        return self.rank == 0


SINGLE = DistInfo()


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"distributed run: ${name} is not set (start it with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"distributed run: ${name}={value!r} is not an integer") from None


def wants_cuda(device: str) -> bool:
    """Whether the device setting (auto, cpu, cuda, cuda:N) means training on a GPU."""
    if device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group torchrun described in the environment; SINGLE without one.

    NCCL when the device is a GPU (each process then drives ``cuda:LOCAL_RANK``), gloo
    otherwise. Calling it again in an initialised process returns the current placement.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return SINGLE
    if dist.is_initialized():
        return current()
    missing = [name for name in _REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: "
                           "start distributed training with torchrun")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    backend = "gloo"
    if wants_cuda(device):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available")
        # Before the group exists: NCCL binds each process to the current device.
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=PROCESS_GROUP_TIMEOUT)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)
    log.info("rank %d of %d (local rank %d, %s)", rank, world_size, local_rank, backend)
    return info


def current() -> DistInfo:
    """This process's placement in an initialised process group; SINGLE when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    world_size = dist.get_world_size()
    if world_size <= 1:
        return SINGLE
    rank = dist.get_rank()
    # torchrun sets LOCAL_RANK; a group started by hand (mp.spawn in the tests) may not.
    fallback = rank % torch.cuda.device_count() if torch.cuda.is_available() else rank
    local_rank = _env_int("LOCAL_RANK", fallback)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank,
                    backend=str(dist.get_backend()))


def is_main() -> bool:
    """Whether this process is rank 0 (always, when not distributed)."""
    return current().is_main


def barrier() -> None:
    """Wait for every rank; nothing to wait for in a single process."""
    if current().distributed:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (pickled); unchanged in a single process.

    Every rank must call it at the same point of the program: it is a collective.
    """
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(wait: bool = True) -> None:
    """Leave the process group; with ``wait``, after a last barrier, so that no rank tears
    it down while another still needs it."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def in_turns(info: DistInfo, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 first, then on each machine's first rank, then on the rest.

    For work that fills a cache on disk: rank 0 fills a shared cache alone, each other
    machine's first rank fills a machine-local one alone, and everyone after them only
    reads what is there, so no two processes write the same file.
    """
    if not info.distributed:
        return work()
    result: T | None = None
    turns = (info.rank == 0, info.rank != 0 and info.local_rank == 0,
             info.rank != 0 and info.local_rank != 0)
    for mine in turns:
        if mine:
            result = work()
        dist.barrier()
    return result  # type: ignore[return-value]  # every rank had exactly one turn


def shard_batches(batches: Sequence[Sequence[int]], rank: int, world_size: int
                  ) -> list[list[int]]:
    """Rank ``rank``'s share of one epoch's batches: disjoint, together the whole epoch.

    Every rank must take the same number of steps per epoch (a DDP step is a collective),
    so while the batch count is not a multiple of ``world_size`` the largest batch is cut
    in two halves (its items are length-sorted, so each half stays length-homogeneous);
    when only single items are left, the two smallest batches are joined instead. The
    batches are then dealt out in turn. Only an epoch with fewer items than ranks cannot
    be shared out: there the first batches are repeated.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    split = [list(b) for b in batches]
    if world_size == 1:
        return split
    while len(split) % world_size and any(len(b) > 1 for b in split):
        largest = max(range(len(split)), key=lambda i: len(split[i]))
        batch = split[largest]
        half = (len(batch) + 1) // 2
        split[largest:largest + 1] = [batch[:half], batch[half:]]
    while len(split) % world_size and len(split) > world_size:
        first, second = sorted(sorted(range(len(split)), key=lambda i: len(split[i]))[:2])
        split[first] = split[first] + split[second]
        del split[second]  # after ``first``: its place is unchanged
    if split and len(split) % world_size:
        log.warning("%d items cannot be shared by %d ranks; repeating some", len(split),
                    world_size)
        missing = world_size - len(split) % world_size
        split.extend(split[i % len(split)] for i in range(missing))
    return split[rank::world_size]


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank ``rank``'s random stream (dropout) from ``step`` on.

    Ranks must draw different dropout masks on their different batches, and the stream must
    follow from the run's seed alone, so that a resumed run draws the same masks again.
    """
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the same sum on every rank)."""
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (BatchNorm running statistics) rank ``src``'s.

    DDP keeps the parameters identical; the running statistics, which each rank's forward
    pass updates from its own batch, are not gradients, so they are copied from ``src``
    after each step: one broadcast per dtype.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=src)
        with torch.no_grad():
            for buffer, chunk in zip(buffers, flat.split([b.numel() for b in buffers]),
                                     strict=True):
                buffer.copy_(chunk.view_as(buffer))
