"""What a loaded base is (:class:`Base`) and how it is identified (its fingerprint)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from taps_cl.bases.preprocessing import Preprocessing


@dataclass
class Base:
    """A base model with its human name, where it came from, and its preprocessing."""

    module: nn.Module
    name: str
    source: str
    preprocessing: Preprocessing

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state_dict's names, dtypes, shapes and bytes, in its order."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(module: nn.Module) -> str:
    """The base's identity: :func:`state_fingerprint` of its state_dict.

    Two bases with the same fingerprint give the same outputs for the same code, so a patch
    may only be applied to the base whose fingerprint it records.
    """
    return state_fingerprint(module.state_dict())
