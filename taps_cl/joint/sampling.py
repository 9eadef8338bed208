"""The multi-task sampler: per-task batch sizes, endless per-task streams, epoch length."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from taps_cl.config import TrainConfig, _JSONConfig
from taps_cl.joint.distributed import world
from taps_cl.runtime import Runtime

EPOCH_LENGTHS = ("max", "min")


@dataclass
class JointConfig(_JSONConfig):
    """How a joint run samples its tasks (training itself is set by :class:`TrainConfig`)."""

    epoch_length: int | str = "max"  # steps per epoch: "max"/"min" over the tasks' batches, or N
    ratios: dict[str, float] | None = None  # task -> multiple of batch_size per step (default 1)
    base_lr: float | None = None  # lr of the shared base weights (train_base); None = lr

    def __post_init__(self) -> None:
        e = self.epoch_length
        if isinstance(e, bool) or not (e in EPOCH_LENGTHS or (isinstance(e, int) and e >= 1)):
            raise ValueError(f"epoch_length must be 'max', 'min' or an int >= 1, got {e!r}")
        if self.ratios is not None:
            if not isinstance(self.ratios, Mapping):
                raise TypeError(f"ratios must be a dict task -> float, got {type(self.ratios)}")
            bad = {k: v for k, v in self.ratios.items() if not float(v) > 0}
            if bad:
                raise ValueError(f"ratios must be > 0, got {bad}")
            self.ratios = {str(k): float(v) for k, v in self.ratios.items()}
        if self.base_lr is not None and not self.base_lr > 0:
            raise ValueError(f"base_lr must be None or > 0, got {self.base_lr}")


def task_batch_sizes(
    names: Sequence[str], train: TrainConfig, joint: JointConfig, world_size: int = 1
) -> dict[str, int]:
    """Global minibatch size of each task per step: ``batch_size * ratio`` (rounded, >= 1),
    which must split evenly over the ranks so the global batch is the same for any N."""
    ratios = joint.ratios or {}
    unknown = sorted(set(ratios) - set(names))
    if unknown:
        raise ValueError(f"ratios name tasks not in this run: {unknown}; tasks: {list(names)}")
    sizes = {n: max(1, round(train.batch_size * ratios.get(n, 1.0))) for n in names}
    bad = {n: b for n, b in sizes.items() if b % world_size}
    if bad:
        raise ValueError(
            f"per-task batch sizes {bad} do not divide over {world_size} processes; pick "
            f"batch_size/ratios giving multiples of {world_size}"
        )
    return sizes


class TaskStream:
    """One task's minibatches, forever: a new shuffled pass starts whenever one ends."""

    def __init__(self, data: Any, batch: int, seed: int, train: TrainConfig, runtime: Runtime):
        rank, world_size = world()
        dataset = getattr(data, "dataset", data)
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        local = batch // world_size
        self.loader = DataLoader(
            dataset,
            batch_size=local,
            sampler=self.sampler,
            num_workers=train.num_workers,
            pin_memory=runtime.pin_memory,
            persistent_workers=train.num_workers > 0,
            # Full batches only when there is enough data: a batch of one breaks train-mode BN.
            drop_last=len(self.sampler) >= local,
        )
        self.passes = 0
        self._it = iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:
            self.passes += 1
            self.sampler.set_epoch(self.passes)
            self._it = iter(self.loader)
            return next(self._it)


def epoch_steps(streams: Mapping[str, TaskStream], joint: JointConfig) -> int:
    lengths = [len(s) for s in streams.values()]
    if joint.epoch_length == "max":
        return max(lengths)
    if joint.epoch_length == "min":
        return min(lengths)
    return int(joint.epoch_length)
