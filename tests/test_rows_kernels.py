"""Gathered row kernels (taps_cl/taps/rowkernels.py): the same answers as one op per task, an
op count that does not grow with the number of tasks in a batch, exact kernel crops.

Tolerance as in tests/test_mixed.py (float32 rounding against each task's merged module).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from taps_cl.taps import rowkernels
from taps_cl.taps.merge import shared_merged
from taps_cl.taps.mixed import MixedTaskModel
from taps_cl.taps.rowkernels import conv2d
from taps_cl.taps.rowplan import RowPlan
from tests.test_mixed import KINDS, TOL, _trained
from tests.test_taps_core import CASES, _logits, _x

NEVER = 10**9  # gather_from: one op per task on every layer
# conv + batch norm, depthwise convs (Conv2dSame, 1x1 inputs at the end), linear + layer norm,
# attention (its row module stays one op per group).
ARCHS = ("tiny_cnn_bn", "tf_efficientnet_lite0", "tiny_transformer_ln", "transformer_encoder")


def _case(name: str):
    return next(c for c in CASES if c[0] == name)


def _worst(model, x: torch.Tensor, rows: list[str], gather_from: int) -> float:
    names = sorted(set(rows))
    out = MixedTaskModel(model, names, gather_from=gather_from)(x, rows)
    worst = 0.0
    with torch.no_grad():
        for name in names:
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name])
            ref = _logits(shared_merged(model, name)(x[idx]))
            diff = (out[idx, : ref.shape[1]] - ref).abs().max().item()
            assert diff <= TOL * (1 + ref.abs().max().item()), (name, diff)
            assert torch.isinf(out[idx, ref.shape[1] :]).all()
            worst = max(worst, diff)
    return worst


def _kernel_cases() -> list[tuple[str, str, int]]:
    """Every (arch, kind, tasks); the real-size model only at two task counts, float32 and int8
    (it is slow, and the tiny models cover the rest)."""
    kinds = ["dense", "lowrank_int8", "lowrank_bf16", "dense_bf16"]
    return [
        (arch, kind, tasks)
        for tasks in (1, 2, 5, 8)
        for arch in ARCHS
        for kind in kinds
        if arch != "tf_efficientnet_lite0" or (tasks in (1, 5) and "bf16" not in kind)
    ]


@pytest.mark.parametrize(("arch", "kind", "tasks"), _kernel_cases())
def test_gathered_and_per_task_kernels_match_merged(arch, kind, tasks):
    _, factory, size = _case(arch)
    model = _trained(factory, KINDS[kind], tasks=8)
    x = _x(size, n=16)
    rows = [f"t{(i * 3) % tasks}" for i in range(16)]
    for gather_from in (2, NEVER):
        _worst(model, x, rows, gather_from)


def test_uneven_rows_fall_back_and_still_match():
    """One task with most rows: padding rows by task would multiply the batch (PAD_MAX)."""
    _, factory, size = _case("tiny_transformer_ln")
    model = _trained(factory, {"delta_rank": 2}, tasks=6)
    x = _x(size, n=24)
    rows = ["t0"] * 19 + ["t1", "t2", "t3", "t4", "t5"]
    _worst(model, x, rows, 2)


class _Ops(TorchDispatchMode):
    """Counts the aten ops a forward runs (each one a kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops(mixed: MixedTaskModel, x: torch.Tensor, rows: list[str]) -> int:
    with _Ops() as ops:
        mixed(x, rows)
    return ops.count


@pytest.mark.parametrize("kind", ["dense", "lowrank_int8"])
@pytest.mark.parametrize("arch", ["tiny_cnn_bn", "tiny_transformer_ln", "tf_efficientnet_lite0"])
def test_op_count_is_flat_in_the_number_of_tasks(arch, kind, monkeypatch):
    """Gathered: as many ops for 2 tasks in a batch as for 8; one op per task grows. (Low-rank
    layers choose between two gathered forms by the number of tasks, each flat: pinned to
    the factors here so both batches take the same one.)"""
    monkeypatch.setattr(rowkernels, "WEIGHT_STACK_MAX_NUMEL", 0)
    _, factory, size = _case(arch)
    model = _trained(factory, KINDS[kind], tasks=8)
    x = _x(size, n=16)
    counts = {}
    for gather_from in (2, NEVER):
        for k in (2, 8):
            rows = [f"t{i % k}" for i in range(16)]
            mixed = MixedTaskModel(model, [f"t{i}" for i in range(k)], gather_from=gather_from)
            counts[gather_from, k] = _ops(mixed, x, rows)
    assert counts[2, 2] == counts[2, 8], counts
    assert counts[NEVER, 8] > counts[NEVER, 2], counts


@pytest.mark.parametrize(
    "size,kernel,stride,padding,groups",
    [(1, 5, 1, 2, 6), (2, 5, 1, 2, 6), (2, 5, 2, 2, 1), (3, 3, 1, 1, 6), (1, 3, 2, 1, 1),
     (5, 3, 1, 1, 1), (2, 5, 1, 4, 6)],
)  # fmt: skip
def test_cropped_conv_equals_the_full_conv(size, kernel, stride, padding, groups):
    conv = nn.Conv2d(6, 6, kernel, stride, padding, groups=groups)
    x = torch.randn(3, 6, size, size)
    want = conv(x)
    got = conv2d(conv, x, conv.weight, conv.bias, groups)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_row_plan_segments_lay_rows_out_by_task():
    plan = RowPlan(torch.tensor([3, 0, 3, 3, 1, 0]), 5)
    present, pos, m = plan.segments()
    assert present.tolist() == [0, 1, 3] and m == 3
    assert pos.tolist() == [6, 0, 7, 8, 3, 1]  # task-major, rows in order within a task
    with pytest.raises(ValueError, match="gather_from"):
        RowPlan(torch.tensor([0]), 1, gather_from=1)
