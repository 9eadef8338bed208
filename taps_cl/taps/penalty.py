"""Sparsity penalties over gate scores: pure functions the trainer and the Avalanche strategy share.

- ``uniform``: ``mean_i |s_i|`` (the reference): every layer costs the same.
- ``weighted``: ``sum_i (n_i / sum_j n_j) |s_i|`` where ``n_i`` is layer i's parameter count:
  users pay for bytes, not layers, so big layers should be harder to keep on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def uniform_l1(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean absolute score over gated layers."""
    if not scores:
        raise ValueError("no gated layers: nothing to penalise")
    return torch.stack([s.reshape(()) for s in scores]).abs().mean()


def weighted_l1(scores: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """Absolute scores weighted by each layer's share of the gated parameters."""
    if not scores:
        raise ValueError("no gated layers: nothing to penalise")
    if len(scores) != len(sizes):
        raise ValueError(f"{len(scores)} scores but {len(sizes)} sizes")
    s = torch.stack([x.reshape(()) for x in scores]).abs()
    w = torch.tensor(sizes, dtype=s.dtype, device=s.device)
    return (s * (w / w.sum())).sum()


def sparsity_penalty(
    scores: Sequence[torch.Tensor], sizes: Sequence[int], kind: str = "uniform"
) -> torch.Tensor:
    """Dispatch on the penalty kind named in ``TAPSConfig.penalty``."""
    if kind == "uniform":
        return uniform_l1(scores)
    if kind == "weighted":
        return weighted_l1(scores, sizes)
    raise ValueError(f"unknown penalty {kind!r}; use 'uniform' or 'weighted'")
