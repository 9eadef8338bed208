"""Device, precision and reproducibility: decided once, here, for the trainer and joint mode.

CUDA paths (bf16 autocast, pinned memory, non-blocking copies, ``channels_last``) are chosen from
the resolved device, so CPU-only users run the very same code with those switches off. bf16
autocast can be forced on CPU (``TrainConfig.amp_cpu``) to exercise the AMP path without a GPU.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch


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
    amp: bool  # bf16 autocast on
    pin_memory: bool  # page-locked host batches (CUDA only)
    channels_last: bool  # NHWC convolutions (CUDA only)

    @classmethod
    def create(cls, device: str = "auto", amp: bool = True, amp_cpu: bool = False) -> Runtime:
        dev = resolve_device(device)
        cuda = dev.type == "cuda"
        return cls(dev, amp=(amp and cuda) or amp_cpu, pin_memory=cuda, channels_last=cuda)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

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
