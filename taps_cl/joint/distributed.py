"""Process groups for joint runs: torchrun env in, identical state on every rank out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from taps_cl.config import environment
from taps_cl.training.runtime import world


def init_distributed() -> bool:
    """Initialise the process group from torchrun's env (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ...) when it says ``WORLD_SIZE`` > 1; return whether this call created it.
    On CUDA each rank takes GPU ``LOCAL_RANK``, so ``"cuda"`` means that rank's own device."""
    if environment().world_size <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(environment().local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    return True


@contextlib.contextmanager
def distributed_session() -> Iterator[tuple[int, int]]:
    """``with distributed_session() as (rank, world):`` a process group for the block when run
    under torchrun (destroyed at the end if this block created it); (0, 1) otherwise."""
    created = init_distributed()
    try:
        yield world()
    finally:
        if created:
            # Every rank reaches the teardown before any tears down: gloo aborts a rank whose
            # peer closes the connections while it is still using them ("terminate called").
            with contextlib.suppress(RuntimeError):
                dist.barrier()
            dist.destroy_process_group()


def broadcast_state(model: nn.Module, world_size: int) -> None:
    """Average floating buffers (BN statistics differ per rank after the last step), then copy
    rank 0's parameters and buffers everywhere: every rank ends bit-identical."""
    if world_size == 1:
        return
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(world_size)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
