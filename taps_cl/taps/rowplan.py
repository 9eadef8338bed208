"""Which rows of a mixed-task batch belong to which task, for the row modules of one forward.

A :class:`RowPlan` is made once per mixed forward (:class:`~taps_cl.taps.mixed.MixedTaskModel`)
and set in a context variable for its duration, so the row modules (:mod:`taps_cl.taps.rows`)
read it without any shared mutable state: threads (and asyncio tasks) each see their own plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence
from contextvars import ContextVar

import torch

_PLAN: ContextVar[RowPlan | None] = ContextVar("taps_row_plan", default=None)

Group = tuple[Hashable, "torch.Tensor | None"]  # (key, rows; None = every row of the batch)


class RowPlan:
    """Row ``i`` of the batch belongs to slot ``index[i]`` (a task's position in the mixed
    model). ``present``: the slots in the batch; ``groups``: those slots with their rows
    (ascending), made on first use (the gathered kernels need only ``index``).
    ``gather_from``: from how many distinct computations on a layer the row modules run their
    gathered kernels (:data:`~taps_cl.taps.rowkernels.GATHER_FROM`)."""

    def __init__(self, index: torch.Tensor, slots: int, gather_from: int = 2) -> None:
        if index.dim() != 1 or index.dtype != torch.int64:
            raise ValueError(
                f"row index must be a 1-d int64 tensor, got {index.dtype} {index.shape}"
            )
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < slots:
            raise ValueError(f"row index out of range for {slots} tasks")
        if isinstance(gather_from, bool) or not isinstance(gather_from, int) or gather_from < 2:
            raise ValueError(f"gather_from must be an int >= 2, got {gather_from!r}")
        self.index = index
        self.n = index.numel()
        self.gather_from = gather_from
        self.present: list[int] = torch.unique(index).tolist()
        self._groups: list[Group] | None = None
        self._segments: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._by: dict[tuple, list[Group]] = {}

    @property
    def groups(self) -> list[Group]:
        if self._groups is None:
            if len(self.present) == 1:
                self._groups = [(self.present[0], None)]
            else:
                self._groups = [(s, (self.index == s).nonzero().flatten()) for s in self.present]
        return self._groups

    def segments(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rows laid out by task for segmented kernels (made once per forward): the present
        slots, each row's place in a ``[len(present) * m]`` layout (task by task, rows in
        order) and ``m``, the most rows any task has."""
        if self._segments is None:
            present = torch.tensor(self.present, device=self.index.device)
            task = torch.searchsorted(present, self.index)  # each row's task, 0 .. K - 1
            counts = torch.bincount(task, minlength=len(self.present))
            order = torch.argsort(task, stable=True)
            start = torch.cumsum(counts, 0) - counts
            rank = torch.empty_like(task)
            rank[order] = torch.arange(self.n, device=task.device) - start[task[order]]
            m = int(counts.max())
            self._segments = (present, task * m + rank, m)
        return self._segments

    def keys(self, keys: Sequence[Hashable]) -> set[Hashable]:
        """The distinct ``keys[slot]`` of the slots in the batch (no tensor op)."""
        return {keys[s] for s in self.present}

    def by(self, keys: Sequence[Hashable]) -> list[Group]:
        """The groups merged by ``keys[slot]`` (slots sharing a key share one group), for a
        module where several tasks compute alike (e.g. tasks that do not adapt it)."""
        keys = tuple(keys)
        if keys not in self._by:
            rows: dict[Hashable, list[torch.Tensor | None]] = {}
            for slot, idx in self.groups:
                rows.setdefault(keys[slot], []).append(idx)
            merged = [(k, _union(r)) for k, r in rows.items()]
            self._by[keys] = [(merged[0][0], None)] if len(merged) == 1 else merged
        return self._by[keys]

    def check(self, t: torch.Tensor, what: str) -> None:
        """Refuse a tensor whose dim 0 is not the batch (rows must come first everywhere)."""
        if t.dim() == 0 or t.shape[0] != self.n:
            raise ValueError(
                f"{what}: a mixed-task forward needs the batch on dim 0 of every layer's input; "
                f"got shape {tuple(t.shape)} for a batch of {self.n}"
            )


def _union(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    if len(rows) == 1:
        return rows[0]
    return torch.sort(torch.cat(rows)).values  # several groups, never the whole batch alone


def current_plan() -> RowPlan:
    plan = _PLAN.get()
    if plan is None:
        raise RuntimeError("row modules run inside MixedTaskModel.forward only (no row plan set)")
    return plan


@contextlib.contextmanager
def planned(plan: RowPlan) -> Iterator[None]:
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def take(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """``t``'s rows ``rows`` (all of ``t`` for None)."""
    return t if t is None or rows is None else t.index_select(0, rows)


def put(out: torch.Tensor | None, rows: torch.Tensor | None, part: torch.Tensor, n: int):
    """Write ``part`` (the outputs of ``rows``) into ``out`` (allocated on first use)."""
    if rows is None:
        return part
    if out is None:
        out = part.new_empty((n, *part.shape[1:]))
    return out.index_copy_(0, rows, part)
