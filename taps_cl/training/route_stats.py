"""Route statistics at training time: each finalised task's statistics from its training data.

The training side of task-free routing: it builds the loaders and moves batches to the device
(:mod:`taps_cl.training.batching`, :mod:`taps_cl.training.runtime`); the statistics themselves are
routing math (:func:`taps_cl.routing.collect_route_stats`), compressed to the compact form
(:data:`taps_cl.routing.COMPACT_RANK`) before they are stored. The engine attaches them to every
patch it commits, so each version is routable from v1, and computes them for an older stored
version on demand (``Engine.add_route_stats``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from taps_cl.config import TrainConfig
from taps_cl.routing import COMPACT_RANK, RouteStats, collect_route_stats
from taps_cl.taps.model import TAPSModel
from taps_cl.training.batching import make_loader
from taps_cl.training.runtime import Runtime

__all__ = ["route_stats"]


@torch.no_grad()
def route_stats(
    model: TAPSModel,
    names: Sequence[str],
    data: Mapping[str, Any],
    train: TrainConfig,
    rank: int | None = COMPACT_RANK,
) -> dict[str, RouteStats]:
    """Route statistics of each finalised task of ``model`` from its (preprocessed) training
    data: one pass per task, two forwards per batch (no task: base features; the task: its
    calibration), eval mode, no grad. Compact (rank ``rank`` plus diagonal) unless ``rank`` is
    ``None``, which keeps the full float64 scatter."""
    config = TrainConfig.from_dict({**train.to_dict(), "batch_size": max(train.batch_size, 64)})
    runtime = Runtime.of(config)
    was_training = model.training
    model.eval()
    try:
        out = {}
        for name in names:
            batches = _on_device(make_loader(data[name], config, runtime), runtime)
            stats = collect_route_stats(model, batches, name)
            out[name] = stats if rank is None else stats.compress(rank)
        return out
    finally:
        model.train(was_training)


def _on_device(loader: Iterable, runtime: Runtime) -> Iterator:
    for x, y in loader:
        yield runtime.to_device(x), y
