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
  recomputes the sum from the terms: the full ones in name order, the compact ones as one
  product of their stacked bases (``sum_t U_t' U_t`` in chunks of :data:`_CHUNK_TASKS` tasks,
  one matrix product each, instead of one ``d x d`` matrix per task) plus their summed
  diagonals. Deterministic for a given set of tasks. A chunk of at least :data:`_WIDE_ROWS`
  float16 (or bfloat16) basis rows is multiplied in float32, where their products are exact and
  only the accumulation rounds, on and above the diagonal only (the sum is symmetric), and
  accumulated in float64: a large router's sum in about a third of the float64 product's time.
  Such a sum and one updated task by task (float64 terms: ``remove`` subtracts exactly what
  ``add`` added) agree to relative ``1e-7``; below that many rows everything is float64.

Memory: the pool holds each task's statistics as stored (compact: ``2 C d + 2 k d + 4 d`` bytes,
no ``d x d`` matrix per task) and one float64 ``d x d`` sum. :meth:`copy` shares both (neither
is ever modified in place), so a router derived from another costs only what changes.
"""

from __future__ import annotations

import torch

from taps_cl.routing.stats import RouteStats

_CHUNK_TASKS = 64  # compact tasks whose stacked bases enter one matrix product in rebuild()
_WIDE_ROWS = 256  # stacked rows from which a chunk's product is banded, float32 (module doc)
_BAND = 256  # columns of one product of the banded (upper triangle) sum
# bases whose products are exact in float32 (11 and 8 bit significands: 22 and 16 bit products)
_SHORT = (torch.float16, torch.bfloat16)
_MAX_UPDATES = 512  # in-place updates of the sum before the next use recomputes it (rounding)


class PooledScatter:
    """Tasks' statistics by name and the float64 sum of their scatter terms."""

    def __init__(self) -> None:
        self._stats: dict[str, RouteStats] = {}
        self._total: torch.Tensor | None = None  # None: recompute in name order when asked
        self._updates = 0  # in-place additions and subtractions since the sum was recomputed
        self._dof: dict[str, int] = {}  # each task's degrees of freedom, N - C (kept, not counted)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self._stats))

    def __contains__(self, name: object) -> bool:
        return name in self._stats

    def __len__(self) -> int:
        return len(self._stats)

    def copy(self) -> PooledScatter:
        """A pool with the same tasks and sum; changing either pool leaves the other as it is
        (the statistics and the sum tensor are shared: nothing modifies them in place)."""
        out = PooledScatter()
        out._stats, out._dof = dict(self._stats), dict(self._dof)
        out._total, out._updates = self._total, self._updates
        return out

    def stats(self, name: str) -> RouteStats:
        return self._stats[name]

    def values(self) -> list[RouteStats]:
        return list(self._stats.values())

    def dof(self, name: str | None = None) -> int:
        """Degrees of freedom (samples less seen classes) of one task, or of all of them."""
        return self._dof[name] if name is not None else sum(self._dof.values())

    def _all_full(self) -> bool:
        return not any(s.compact for s in self._stats.values())

    def add(self, name: str, stats: RouteStats) -> None:
        """Add (or replace) a task's term; see the module docstring for the two regimes."""
        if name in self._stats:
            self.remove(name)
        self._stats[name] = stats
        self._dof[name] = stats.total - stats.seen_classes
        if self._total is None:
            return
        if self._all_full() and name != max(self._stats):
            self._total = None  # an append out of name order would change the rounding
        else:
            self._update(stats, 1.0)

    def remove(self, name: str) -> None:
        """Remove a task's term (``KeyError`` if it has none)."""
        if name not in self._stats:
            raise KeyError(f"router has no task {name!r}; tasks: {list(self.tasks)}")
        stats = self._stats.pop(name)
        del self._dof[name]
        if not self._stats or self._all_full():
            self._total = None
        elif self._total is not None:
            self._update(stats, -1.0)

    def _update(self, stats: RouteStats, sign: float) -> None:
        """Add (``sign`` 1) or subtract (-1) one term: a new tensor, the old one is shared."""
        self._updates += 1
        if self._updates > _MAX_UPDATES:
            self._total = None  # recomputed on next use: rounding does not pile up for ever
            return
        term = stats.scatter_matrix() if not stats.compact else _compact_sum([stats], stats.dim)
        self._total = torch.add(self._total, term, alpha=sign)

    @property
    def nbytes(self) -> int:
        """Bytes of the pooled sum (0 until it is computed)."""
        total = self._total
        return 0 if total is None else total.numel() * total.element_size()

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
            if not self._stats[name].compact:
                total += self._stats[name].scatter_matrix()
        compact = [self._stats[n] for n in self.tasks if self._stats[n].compact]
        if compact:
            total += _compact_sum(compact, dim)
        self._total, self._updates = total, 0


def _compact_sum(stats: list[RouteStats], dim: int) -> torch.Tensor:
    """``sum_t (U_t' U_t + diag(r_t))`` in float64: one product of stacked bases per chunk of
    tasks (float32, see the module docstring) and one diagonal, so the cost is the product's,
    not ``len(stats)`` ``d x d`` matrices."""
    total = None  # the first small chunk's product becomes it (one task: no zeros to add to)
    upper = None  # large chunks: their products on and above the diagonal only
    diag = torch.zeros(dim, dtype=torch.float64)
    for start in range(0, len(stats), _CHUNK_TASKS):
        chunk = stats[start : start + _CHUNK_TASKS]
        rows = sum(s.basis.shape[0] for s in chunk)
        if rows < _WIDE_ROWS:  # a task or a few: float64, the full product costs little
            stacked = torch.cat([s.basis.to(torch.float64) for s in chunk])
            part = stacked.T @ stacked
            total = part if total is None else total.add_(part)
        else:
            short = all(s.basis.dtype in _SHORT for s in chunk)
            dtype = torch.float32 if short else torch.float64
            upper = torch.zeros(dim, dim, dtype=torch.float64) if upper is None else upper
            _add_upper(upper, torch.cat([s.basis.to(dtype) for s in chunk]))
        diag += torch.stack([s.diag.to(torch.float64) for s in chunk]).sum(0)
    if upper is not None:
        upper.triu_()
        upper += upper.triu(1).T
        total = upper if total is None else total.add_(upper)
    total.diagonal().add_(diag)
    return total


def _add_upper(total: torch.Tensor, stacked: torch.Tensor) -> None:
    """``total += stacked' stacked`` on and above the diagonal (the product is symmetric: one
    product per band of :data:`_BAND` columns, about 60% of the full product's work)."""
    dim = stacked.shape[1]
    for start in range(0, dim, _BAND):
        stop = min(start + _BAND, dim)
        total[start:stop, start:] += stacked[:, start:stop].T @ stacked[:, start:]
