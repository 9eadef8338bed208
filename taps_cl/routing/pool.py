"""The pooled within-class scatter of a router: the sum over tasks of each task's own term.

A task with full statistics (versions written before compact statistics) adds its exact
scatter, a task with compact statistics its rank-``k``-plus-diagonal approximation; both enter
one sum, so a store that mixes old and new versions routes with one pooled covariance.

Two regimes, so old stores route exactly as they did and new ones update cheaply:

- every task full: the sum is the previous release's, float64 in task-name order, bit for bit
  (recomputed lazily after any change that is not an append in name order);
- any task compact: adding or removing a task adds or subtracts its term (``O(k d^2)``), so a
  removed task leaves the sum as if it had never been added up to float64 rounding of the
  running sum (relative ``1e-13`` measured; tests hold it to ``1e-10``); :meth:`rebuild`
  recomputes the name-order sum.
"""

from __future__ import annotations

import torch

from taps_cl.routing.stats import RouteStats


class PooledScatter:
    """Tasks' statistics by name and the float64 sum of their scatter terms."""

    def __init__(self) -> None:
        self._stats: dict[str, RouteStats] = {}
        self._total: torch.Tensor | None = None  # None: recompute in name order when asked

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self._stats))

    def __contains__(self, name: object) -> bool:
        return name in self._stats

    def __len__(self) -> int:
        return len(self._stats)

    def stats(self, name: str) -> RouteStats:
        return self._stats[name]

    def values(self) -> list[RouteStats]:
        return list(self._stats.values())

    def _all_full(self) -> bool:
        return not any(s.compact for s in self._stats.values())

    def add(self, name: str, stats: RouteStats) -> None:
        """Add (or replace) a task's term; see the module docstring for the two regimes."""
        if name in self._stats:
            self.remove(name)
        self._stats[name] = stats
        if self._total is None:
            return
        if self._all_full() and name != max(self._stats):
            self._total = None  # an append out of name order would change the rounding
        else:
            self._total = self._total + stats.scatter_matrix()

    def remove(self, name: str) -> None:
        """Remove a task's term (``KeyError`` if it has none)."""
        if name not in self._stats:
            raise KeyError(f"router has no task {name!r}; tasks: {list(self.tasks)}")
        stats = self._stats.pop(name)
        if not self._stats or self._all_full():
            self._total = None
        elif self._total is not None:
            self._total = self._total - stats.scatter_matrix()

    def total(self) -> torch.Tensor:
        """The float64 ``d x d`` sum of every task's scatter term."""
        if self._total is None:
            self.rebuild()
        return self._total

    def rebuild(self) -> None:
        """Recompute the sum from the terms in task-name order (drops accumulated rounding)."""
        if not self._stats:
            raise ValueError("the router has no tasks with route statistics; add some first")
        dim = next(iter(self._stats.values())).dim
        total = torch.zeros(dim, dim, dtype=torch.float64)
        for name in self.tasks:
            total += self._stats[name].scatter_matrix()
        self._total = total
