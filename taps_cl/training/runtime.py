"""Device, precision and reproducibility: decided once, here, for the trainer and joint mode.

CUDA paths (bf16 autocast, pinned memory, non-blocking copies, ``channels_last``) are chosen from
the resolved device, so CPU-only users run the very same code with those switches off. bf16
autocast can be forced on CPU (``TrainConfig.amp_cpu``) to exercise the AMP path without a GPU.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from taps_cl.config import TrainConfig


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else MPS, else CPU; explicit devices are checked."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {spec!r} requested but CUDA is not available; use 'auto' or 'cpu'"
        )
    return device


@dataclass(frozen=True)
class Runtime:
    """What the resolved device implies for the training loop."""

    device: torch.device
    amp: bool  # autocast on
    pin_memory: bool  # page-locked host batches (CUDA only)
    channels_last: bool  # NHWC convolutions (CUDA only)
    amp_dtype: torch.dtype = torch.bfloat16  # autocast dtype; float16 also scales the loss

    @classmethod
    def create(
        cls,
        device: str = "auto",
        amp: bool = True,
        amp_cpu: bool = False,
        amp_dtype: str = "bfloat16",
    ) -> Runtime:
        dev = resolve_device(device)
        cuda = dev.type == "cuda"
        dtype = getattr(torch, amp_dtype)
        return cls(dev, (amp and cuda) or amp_cpu, cuda, cuda, dtype)

    @classmethod
    def of(cls, config: TrainConfig) -> Runtime:
        """The runtime a :class:`~taps_cl.config.TrainConfig` asks for."""
        return cls.create(config.device, config.amp, config.amp_cpu, config.amp_dtype)

    @property
    def scales_loss(self) -> bool:
        """float16 autocast needs loss scaling (its range underflows small gradients); bf16 not."""
        return self.amp and self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=self.pin_memory)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a generator for the data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (a no-op in a single process)."""
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def wrap_ddp(module: nn.Module, runtime: Runtime) -> nn.Module:
    """``module`` under DistributedDataParallel when a process group of 2+ ranks exists.

    Every per-task parameter must exist before this call: parameters created after the wrap are
    not synchronised. ``find_unused_parameters``: a model may hold gated layers (or, training the
    base, base weights) its forward never reaches; the graph walk it costs is small.
    """
    if world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.cuda.current_device()] if runtime.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=True)
