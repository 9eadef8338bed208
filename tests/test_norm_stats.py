"""How a task's own BatchNorm statistics start (``TAPSConfig.norm_stats``)."""

from __future__ import annotations

import pytest
import torch

from taps_cl.config import TAPSConfig
from taps_cl.taps.model import TAPSModel
from tests.tiny import tiny_cnn


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def _bn1(model: TAPSModel, task: str):
    return dict(model.norms())["bn1"].tasks[task]


def test_reset_keeps_the_cumulative_average_of_batch_statistics():
    base = tiny_cnn()
    base_stats = base.bn1.running_mean.clone()
    model = TAPSModel(base, TAPSConfig(norm_stats="reset"))
    model.add_task("a", 3)
    norm = _bn1(model, "a")
    assert norm.momentum is None
    assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    model.train()
    means = []
    for seed in (1, 2, 3):
        x = _x(5, seed)
        with torch.no_grad():
            means.append(base.conv1(x).mean(dim=(0, 2, 3)))
            model(x, task="a")
    # cumulative average: every batch weighs the same, none of the ImageNet stats survive
    torch.testing.assert_close(norm.running_mean, torch.stack(means).mean(0))
    assert torch.equal(base.bn1.running_mean, base_stats)


def test_base_copies_the_base_statistics_and_momentum():
    base = tiny_cnn()
    model = TAPSModel(base, TAPSConfig())
    model.add_task("a", 3)
    norm = _bn1(model, "a")
    assert norm.momentum == base.bn1.momentum
    assert torch.equal(norm.running_mean, base.bn1.running_mean)


def test_reset_task_round_trips_bit_for_bit():
    model = TAPSModel(tiny_cnn(), TAPSConfig(norm_stats="reset"))
    model.add_task("a", 3)
    model.train()
    for seed in (1, 2):
        with torch.no_grad():
            model(_x(6, seed), task="a")
    patch = model.finalize_task("a")
    x = _x(4, 9)
    with torch.no_grad():
        expected = model(x, task="a")
    other = TAPSModel(tiny_cnn(), TAPSConfig())  # loading never depends on norm_stats
    other.load_patch(patch)
    with torch.no_grad():
        assert torch.equal(other(x, task="a"), expected)


@pytest.mark.parametrize("bad", ["Reset", "", "cumulative"])
def test_unknown_norm_stats_is_refused(bad):
    with pytest.raises(ValueError, match="norm_stats must be one of"):
        TAPSConfig(norm_stats=bad)
