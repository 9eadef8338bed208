"""What only a run of several tasks needs to decide: each task's minibatch size per step."""

from __future__ import annotations

from collections.abc import Sequence

from taps_cl.config import JointConfig, TrainConfig


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
