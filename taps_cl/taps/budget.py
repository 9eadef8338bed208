"""A budget per task, in one of two units:

- bytes: ``TAPSConfig.size`` (the default, e.g. "compact" = 1 MiB) bounds everything a task
  stores, its patch *and* its routing statistics, because that is what a store of many tasks
  pays for. The statistics are computed after training, so their size is reserved up front
  (:func:`route_reserve`, the compact form's exact size).
- parameters: ``TAPSConfig.budget``, the largest share of the base's parameters a task's patch
  may hold, counted as :attr:`TaskPatch.num_parameters` counts. It wins over a size when given.

Either way the *fixed* part (the task's head, norms and one score per gated layer) is counted
first, then each kept layer's stored size (dense delta or low-rank factors, plus int8 scales;
:meth:`GatedWeight.stored_size`, :meth:`GatedWeight.stored_nbytes`).

How training meets it (:class:`BudgetController`, driven by :mod:`taps_cl.training.loop`): the
penalty is off; while the first ``budget_select`` share of the task's steps runs, every layer's
importance is accumulated as ``-dL/ds_i = -<dL/dw_i, dw_i>`` (the first-order loss change its delta
brought, step by step: the score's own gradient); then the gates are chosen once, an exact 0/1
knapsack (largest total importance within the budget, :func:`knapsack`), the others closed and their
deltas dropped; the chosen ones train on with fixed gates. The finalise-time check
(:func:`enforce_budget`) closes the least important gates if a task is still over.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
import torch

from taps_cl.config import SIZES, TAPSConfig
from taps_cl.taps.layer import GatedWeight
from taps_cl.taps.modules import TaskHeads, TaskNorm


class BudgetedModel(Protocol):
    """What the budget reads of a :class:`~taps_cl.taps.model.TAPSModel` (which calls it)."""

    config: TAPSConfig
    base_parameters: int
    num_layers: int
    layer_names: list[str]
    heads: TaskHeads

    def layers(self) -> Iterator[tuple[str, GatedWeight]]: ...

    def norms(self) -> Iterator[tuple[str, TaskNorm]]: ...

    def gates(self, name: str) -> dict[str, bool]: ...

    def scores(self, name: str) -> dict[str, float]: ...


def _count(tensors: Mapping[str, torch.Tensor], in_bytes: bool) -> int:
    if in_bytes:
        return sum(t.numel() * t.element_size() for t in tensors.values())
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


def in_bytes(model: BudgetedModel) -> bool:
    """Whether the budget is a size in bytes (no share ``budget`` given)."""
    return model.config.budget is None and model.config.size_bytes is not None


def route_reserve(num_classes: int, dim: int) -> int:
    """Bytes of a task's compact routing statistics (:mod:`taps_cl.routing.stats`): counts
    int64 [C], float16 means [C, d], a float16 rank-16 scatter basis [16, d], a float32
    residual diagonal [d], and a few calibration numbers. ``tests/test_sizes.py`` checks it
    against the statistics as stored."""
    return 8 * num_classes + 2 * num_classes * dim + 2 * 16 * dim + 4 * dim + 64


def fixed_size(model: BudgetedModel, name: str) -> int:
    """What every patch of task ``name`` holds whatever its gates (head, norms, scores; and
    routing statistics, with a byte budget), in the budget's unit."""
    b, head = in_bytes(model), model.heads.export_task(name)
    size = _count(head, b) + model.num_layers * (4 if b else 1)
    size += sum(_count(norm.export_task(name), b) for _, norm in model.norms())
    if b:
        size += route_reserve(*head["weight"].shape)  # [classes, features]
    return size


def layer_size(model: BudgetedModel, layer: GatedWeight) -> int:
    """What keeping ``layer`` costs a task, in the budget's unit."""
    return layer.stored_nbytes() if in_bytes(model) else layer.stored_size()


def task_size(model: BudgetedModel, name: str) -> int:
    """What the task stores with its current gates (fixed part first), in the budget's unit."""
    kept = sum(layer_size(model, la) for _, la in model.layers() if la.is_active(name))
    return fixed_size(model, name) + kept


def budget_limit(model: BudgetedModel, name: str) -> int | None:
    """Task ``name``'s budget in its unit (bytes or parameters); None without one (paper
    mode). A *named* size (e.g. "compact") whose task cannot fit it, because its head, norms
    and routing statistics alone are larger (a 1,000-class head is 5 MB), gives the task the
    named size for its deltas on top of them: names are targets, byte counts are limits."""
    budget = model.config.budget
    if budget is not None:
        return int(budget * model.base_parameters)
    limit = model.config.size_bytes
    if limit is not None and isinstance(model.config.size, str) and model.config.size in SIZES:
        fixed = fixed_size(model, name)
        if fixed > limit:
            return fixed + limit
    return limit


def check_budget(model: BudgetedModel, name: str) -> None:
    """Refuse a budget smaller than the task's fixed part, naming the smallest that works."""
    limit = budget_limit(model, name)
    fixed = fixed_size(model, name)
    if limit is None or fixed <= limit:
        return
    if in_bytes(model):
        raise ValueError(
            f"size {model.config.size!r} ({limit:,} bytes) is below what task {name!r} stores "
            f"whatever its gates (head, norms, scores, routing statistics: {fixed:,} bytes); "
            f"give a size of at least {fixed:,} bytes, a named size, or size=None for the "
            "paper's penalty"
        )
    least = fixed / model.base_parameters
    raise ValueError(
        f"budget {model.config.budget} is below what task {name!r} stores whatever its "
        f"gates (head, norms, scores: {fixed:,} of {model.base_parameters:,} base "
        f"parameters); the minimum budget is {least:.4f}"
    )


def knapsack(values: Mapping[str, float], sizes: Mapping[str, int], room: int) -> list[str]:
    """The items of largest total value whose sizes fit ``room`` (0/1 knapsack, exact dynamic
    programme over sizes rounded *up* to ``KNAPSACK_UNITS`` steps of ``room``, so the choice
    always fits). Items of no positive value are never chosen.

    Greedy by value per size, the usual shortcut, is poor here: a few large late layers carry
    most of the value and a budget holds only some of them."""
    items = [n for n in values if values[n] > 0 and 0 < sizes[n] <= room]
    if not items or room <= 0:
        return []
    unit = room / KNAPSACK_UNITS
    cost = [max(1, math.ceil(sizes[n] / unit - 1e-9)) for n in items]
    best = np.zeros(KNAPSACK_UNITS + 1)
    take = np.zeros((len(items), KNAPSACK_UNITS + 1), dtype=bool)
    for i, n in enumerate(items):
        c = cost[i]
        if c > KNAPSACK_UNITS:
            continue
        with_item = best[:-c] + values[n]
        better = with_item > best[c:]
        take[i, c:] = better
        best[c:] = np.where(better, with_item, best[c:])
    chosen, cap = [], KNAPSACK_UNITS
    for i in range(len(items) - 1, -1, -1):
        if take[i, cap]:
            chosen.append(items[i])
            cap -= cost[i]
    return chosen


def select_gates(model: BudgetedModel, name: str, importance: Mapping[str, float]) -> list[str]:
    """Keep the open gates of largest total importance that fit the budget (:func:`knapsack`);
    close the others (and those of no positive importance). Returns the kept layer names."""
    limit = budget_limit(model, name)
    if limit is None:
        return [n for n, on in model.gates(name).items() if on]
    room = limit - fixed_size(model, name)
    layers = dict(model.layers())
    open_ = [n for n, layer in layers.items() if layer.is_active(name)]
    sizes = {n: layer_size(model, layers[n]) for n in open_}
    kept = set(knapsack({n: importance.get(n, 0.0) for n in open_}, sizes, room))
    for n in open_:
        if n not in kept:
            layers[n].close(name)
    return [n for n in model.layer_names if n in kept]


def enforce_budget(
    model: BudgetedModel, name: str, importance: Mapping[str, float] | None = None
) -> list[str]:
    """Close the least important open gates (by ``importance``, else by score) until the task
    fits its budget. Returns the layers closed."""
    limit = budget_limit(model, name)
    if limit is None:
        return []
    layers = dict(model.layers())
    value = importance or model.scores(name)
    active = [n for n, layer in layers.items() if layer.is_active(name)]
    order = sorted(active, key=lambda n: value[n])
    closed = []
    size = task_size(model, name)
    for n in order:
        if size <= limit:
            break
        size -= layer_size(model, layers[n])
        layers[n].close(name)
        closed.append(n)
    return closed


KNAPSACK_UNITS = 4096  # resolution of the knapsack over the budget's room
MIN_SELECT_STEPS = 8  # fewest steps of importance before the gates are chosen (short runs)


class BudgetController:
    """Per task: accumulates layer importance until the selection step, then picks the gates."""

    def __init__(self, model: BudgetedModel, name: str, total_steps: int) -> None:
        self.model, self.name = model, name
        # After budget_select of the steps, but deltas start at zero, so a score's first
        # gradient is zero: no earlier than MIN_SELECT_STEPS (or the last step of a short run).
        share = int(model.config.budget_select * total_steps)
        self.select_at = min(total_steps, max(MIN_SELECT_STEPS, share))
        self.importance = dict.fromkeys(model.layer_names, 0.0)
        self.selected: list[str] | None = None

    @torch.no_grad()
    def observe(self, step: int) -> None:
        """Call after each optimizer step of the task (``step`` = steps taken so far)."""
        if self.selected is not None:
            return
        if step <= self.select_at:
            for n, layer in self.model.layers():
                grad = layer.score[self.name].grad
                if grad is not None:
                    self.importance[n] -= float(grad)
        if step >= self.select_at:
            self.selected = select_gates(self.model, self.name, self.importance)
            for _, layer in self.model.layers():
                layer.score[self.name].requires_grad_(False)  # gates stay as chosen
