"""Many distinct routable tasks from one trained patch, without training them.

A synthetic task is a copy of a real patch (its deltas, norms and head jittered by a relative
1e-3, so that the store's content addressing does not share them: realistic bytes and load
cost) whose routing statistics describe other classes: the feature coordinates of its class
means, scatter basis and diagonal are permuted by a random permutation, and the means jittered.
The within-class structure is the real task's, the class locations are elsewhere, so the router
sees ``C`` new classes per copy. Used by ``benchmarks/scale.py`` and the scale tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from taps_cl.routing import RouteStats
from taps_cl.taps.patch import TaskPatch


def perturbed(patch: TaskPatch, name: str, seed: int, jitter: float = 0.05) -> TaskPatch:
    """A copy of ``patch`` named ``name`` with permuted, jittered compact route statistics."""
    stats = RouteStats.from_tensors(patch.tensors).compress()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(stats.dim, generator=g)
    mean = stats.mean.float()[:, perm]
    mean = mean * (1 + jitter * torch.randn(mean.shape, generator=g))
    moved = RouteStats(
        stats.count.clone(),
        mean.to(stats.mean.dtype),
        None,
        stats.calibration,
        stats.basis[:, perm].clone(),
        stats.diag[perm].clone(),
    )
    tensors = {
        k: v if k.startswith("score.") else _jitter(v, g)
        for k, v in patch.tensors.items()
        if not k.startswith("route.")
    }
    tensors.update(moved.to_tensors())
    return TaskPatch(**{**patch.__dict__, "name": name, "tensors": tensors, "version": None})


def _jitter(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``t`` with a small random change (float: relative 1e-3; int8: +-1), other dtypes as is."""
    if t.is_floating_point():
        noise = 1 + 1e-3 * torch.randn(t.shape, generator=g)
        return (t.float() * noise + 1e-6 * torch.randn(t.shape, generator=g)).to(t.dtype)
    if t.dtype == torch.int8:
        step = torch.randint(-1, 2, t.shape, generator=g, dtype=torch.int16)
        return (t.to(torch.int16) + step).clamp(-127, 127).to(torch.int8)
    return t.clone()


def write_files(patch: TaskPatch, names: list[str], folder: Path, seed: int = 0) -> list[Path]:
    """Perturbed copies of ``patch`` as patch files (the export format) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        perturbed(patch, name, seed + i).save(folder / f"{name}.safetensors")
        for i, name in enumerate(names)
    ]
