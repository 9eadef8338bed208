"""How every loop here batches its data: one rule, used by TAPS, joint mode, the baselines and the
Avalanche strategy, so that a comparison differs only in what is trained.

Training draws each task's minibatches from a :class:`TaskStream`: a shuffled pass over the data
(a ``DistributedSampler``, so the same code splits the data over the ranks of a DDP run), restarted
whenever it ends. The last minibatch of a pass is kept unless it holds a single sample, which
breaks BatchNorm in train mode (:func:`drop_last`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from taps_cl.config import TrainConfig
from taps_cl.training.runtime import Runtime, world


def drop_last(num_samples: int, batch_size: int) -> bool:
    """Whether a training pass over ``num_samples`` drops its last, partial minibatch: only when
    that minibatch would hold one sample (train-mode BatchNorm cannot normalise one sample)."""
    return num_samples > batch_size and num_samples % batch_size == 1


def dataset_of(data: Any) -> Dataset:
    """The ``Dataset`` behind ``data`` (a :class:`~taps_cl.data.TaskData` or a Dataset)."""
    return getattr(data, "dataset", data)


def make_loader(data: Any, config: TrainConfig, runtime: Runtime) -> DataLoader:
    """An ordered, complete pass over ``data`` (evaluation, feature statistics)."""
    return DataLoader(
        dataset_of(data),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.num_workers,
        pin_memory=runtime.pin_memory,
    )


class TaskStream:
    """One task's training minibatches, forever: a new shuffled pass starts whenever one ends.

    The order depends only on ``seed`` and the pass number, so the same task draws the same
    minibatches whether it trains alone or beside other tasks.
    """

    def __init__(self, data: Any, batch: int, seed: int, config: TrainConfig, runtime: Runtime):
        rank, world_size = world()
        dataset = dataset_of(data)
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        local = max(1, batch // world_size)
        self.loader = DataLoader(
            dataset,
            batch_size=local,
            sampler=self.sampler,
            num_workers=config.num_workers,
            pin_memory=runtime.pin_memory,
            persistent_workers=config.num_workers > 0,
            drop_last=drop_last(len(self.sampler), local),
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


def epoch_steps(streams: Mapping[str, TaskStream], epoch_length: int | str = "max") -> int:
    """Steps per epoch: the longest task's pass (``"max"``: every sample of every task is seen
    each epoch), the shortest's (``"min"``) or a fixed number."""
    lengths = [len(s) for s in streams.values()]
    if epoch_length == "max":
        return max(lengths)
    if epoch_length == "min":
        return min(lengths)
    return int(epoch_length)
