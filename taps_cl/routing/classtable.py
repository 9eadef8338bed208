"""What a router derives from its tasks' statistics before it can score: one row per seen class.

Built once per set of tasks (a router's tasks never change after it scores; a changed set is a
new :class:`ClassTable`), each part on first use:

- ``task_of`` / ``class_of``: the task column and the class within the task of every row;
- unit-norm class means, for ``"ncm"`` only;
- the discriminant's rows ``W mu_c`` and biases ``-0.5 mu_c' W mu_c``, for ``"lda"``, against
  the shrunk pooled covariance (:mod:`taps_cl.routing.discriminant`): float64 Cholesky solves
  when every task has full statistics (bit for bit the previous release), otherwise rows from
  one factorised inverse, float32 from :data:`_FLOAT32_FROM` row elements (``K d``; at
  ``d = 1280`` about 80 tasks of 10 classes), float64 below.

Rows live in :class:`Block` s of whole tasks. A full solve gives one block in task-name order.
:meth:`ClassTable.derived` makes the table of a slightly different set of tasks *stale*: it
keeps the source's factor (the inverse of the covariance as it was when solved), drops the
blocks' rows of removed or replaced tasks and solves only the added tasks' classes against the
kept inverse, in a block of their own; the unchanged tasks' rows are shared, not copied. That is
``O(C d^2)`` per added task instead of ``O(K d^2)`` for all ``K`` classes. The pooled sum itself
stays exact; only the factor lags. The lag is bounded: once the degrees of freedom of the tasks
added or removed since the factorisation exceed ``stale_fraction`` of the router's degrees of
freedom (``N - C``), the derived table is a fresh one and solves everything again.

Memory: the class means are not kept (they are re-read from the statistics when a part needs
them), so a table holds its rows (``4 K d`` bytes in float32, ``8 K d`` in float64), the
``d x d`` inverse (shared by derived tables), and ``8 K d`` for unit means once ``"ncm"`` ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from taps_cl.routing.discriminant import Factor, class_rows, factorise, lda_projection
from taps_cl.routing.stats import RouteStats

_CHUNK_TASKS = 256  # tasks whose class means enter one product when a block is solved
_MAX_BLOCKS = 4
# class rows x d from which compact tables keep their rows float32 (float64 rows: 8 MB here)
_FLOAT32_FROM = 1 << 20  # blocks of a stale table; more are merged (the small ones after the first)

Covariance = Callable[[], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class Block:
    """The discriminant's rows of some whole tasks, in ``names`` order."""

    names: tuple[str, ...]  # tasks, in row order
    sizes: tuple[int, ...]  # seen classes of each
    class_of: torch.Tensor  # int64 [k]: class within its task of each row
    rows: torch.Tensor  # [k, d]: W mu_c (float64 exact, float32 otherwise)
    bias: torch.Tensor  # float64 [k]: -0.5 mu_c' W mu_c

    def without(self, gone: set[str]) -> Block | None:
        """This block less the rows of ``gone`` (itself if none is here; None if all are)."""
        keep = [n not in gone for n in self.names]
        if all(keep):
            return self
        if not any(keep):
            return None
        mask = torch.repeat_interleave(torch.tensor(keep), torch.tensor(self.sizes))
        names = tuple(n for n, k in zip(self.names, keep, strict=True) if k)
        sizes = tuple(s for s, k in zip(self.sizes, keep, strict=True) if k)
        return Block(names, sizes, self.class_of[mask], self.rows[mask], self.bias[mask])

    @staticmethod
    def merged(blocks: list[Block]) -> Block:
        return Block(
            sum((b.names for b in blocks), ()),
            sum((b.sizes for b in blocks), ()),
            torch.cat([b.class_of for b in blocks]),
            torch.cat([b.rows for b in blocks]),
            torch.cat([b.bias for b in blocks]),
        )


def _seen(stats: RouteStats) -> torch.Tensor:
    return (stats.count > 0).nonzero().flatten().to(torch.int64)


def _block(stats: Mapping[str, RouteStats], names: tuple[str, ...], factor: Factor) -> Block:
    """The rows of ``names``' classes against ``factor``, solved in chunks of tasks."""
    means = [stats[n].mean[stats[n].count > 0] for n in names]
    sizes = tuple(m.shape[0] for m in means)
    step = _CHUNK_TASKS
    chunks = [torch.cat(means[i : i + step]) for i in range(0, len(means), step)]
    rows, bias = class_rows(factor, chunks, sum(sizes), means[0].shape[1])
    class_of = torch.cat([_seen(stats[n]) for n in names])
    return Block(names, sizes, class_of, rows, bias)


class ClassTable:
    """Rows of every seen class of ``stats`` (name -> statistics), computed lazily; ``blocks``
    and ``factor`` make a stale table (see :meth:`derived`)."""

    def __init__(
        self,
        stats: Mapping[str, RouteStats],
        blocks: list[Block] | None = None,
        factor: Factor | None = None,
    ) -> None:
        self._stats = dict(stats)
        self.tasks = tuple(sorted(self._stats))
        self._blocks, self._factor = blocks, factor
        order = [n for b in blocks for n in b.names] if blocks else list(self.tasks)
        if sorted(order) != list(self.tasks):
            raise ValueError("a class table's blocks must hold each of its tasks once")
        self._order = order
        column = {n: t for t, n in enumerate(self.tasks)}
        if blocks:  # a derived table: the layout is its blocks' (no statistics re-read)
            sizes = torch.tensor([k for b in blocks for k in b.sizes])
            self.class_of = torch.cat([b.class_of for b in blocks])
        else:
            seen = [_seen(self._stats[n]) for n in order]
            sizes = torch.tensor([len(s) for s in seen])
            self.class_of = torch.cat(seen)  # int64 [K]: class within the task
        self.task_of = torch.repeat_interleave(torch.tensor([column[n] for n in order]), sizes)
        self._unit: torch.Tensor | None = None
        self._lda: dict[str, torch.Tensor | float] | None = None  # exact precision only

    @property
    def exact(self) -> bool:
        """Every task has full statistics: float64 solves, the previous release's numbers."""
        return not any(s.compact for s in self._stats.values())

    def means(self) -> torch.Tensor:
        """The seen classes' means, float64 ``[K, d]`` (built on each call, not kept)."""
        return torch.cat([self._mean(n).to(torch.float64) for n in self._order])

    def _mean(self, name: str) -> torch.Tensor:
        s = self._stats[name]
        return s.mean[s.count > 0]

    def unit_means(self) -> torch.Tensor:
        """Class means scaled to unit norm (``"ncm"``)."""
        if self._unit is None:
            self._unit = torch.nn.functional.normalize(self.means(), dim=1)
        return self._unit

    # -- the discriminant ----------------------------------------------------------------------

    def factor(self, covariance: Covariance, shrinkage: float | str) -> Factor:
        """The factor the rows are solved against (solving them on first use)."""
        self._solve(covariance, shrinkage)
        return self._factor

    def lda_scores(
        self, z: torch.Tensor, covariance: Covariance, shrinkage: float | str
    ) -> torch.Tensor:
        """Discriminant scores ``[n, K]`` (float64) of the float64 features ``z``;
        ``covariance()`` gives the pooled (covariance, degrees of freedom), asked for only
        when the rows are solved."""
        self._solve(covariance, shrinkage)
        if self._lda is not None:
            return z @ self._lda["proj"].T + self._lda["bias"]
        zs = z.to(self._factor.inverse.dtype)
        parts = [(zs @ b.rows.T).to(torch.float64) + b.bias for b in self._blocks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _solve(self, covariance: Covariance, shrinkage: float | str) -> None:
        if self._factor is not None:
            return
        sigma, dof = covariance()
        if self.exact:
            self._lda = lda_projection(self.means(), sigma, dof, shrinkage)
            self._factor = Factor(None, float(self._lda["alpha"]))
            return
        large = self.task_of.numel() * sigma.shape[0] >= _FLOAT32_FROM
        factor = factorise(sigma, dof, shrinkage, torch.float32 if large else torch.float64)
        self._blocks = [_block(self._stats, self.tasks, factor)]
        self._factor = factor

    def derived(
        self, stats: Mapping[str, RouteStats], changed: set[str], drift: int, limit: float
    ) -> ClassTable | None:
        """The stale table of ``stats`` (this table's tasks, ``changed`` ones added, replaced or
        removed; ``drift`` their degrees of freedom): this one's factor and unchanged rows, the
        changed tasks' classes solved against that factor. None (solve afresh) when this table
        has no factorised inverse yet, ``stats`` are all full, or the drift since the factorisation
        would exceed ``limit`` degrees of freedom."""
        factor = self._factor
        if factor is None or factor.inverse is None or self._blocks is None:
            return None
        if factor.drift + drift > limit or not any(s.compact for s in stats.values()):
            return None
        blocks = [b.without(changed) for b in self._blocks]
        blocks = [b for b in blocks if b is not None]
        factor = dataclasses.replace(factor, drift=factor.drift + drift)
        added = tuple(sorted(changed & set(stats)))
        if added:
            blocks.append(_block(stats, added, factor))
        if len(blocks) > _MAX_BLOCKS:
            blocks = [blocks[0], Block.merged(blocks[1:])]
        return ClassTable(stats, blocks, factor) if blocks else None

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the table holds now."""
        parts = [self.task_of, self.class_of, self._unit]
        parts += [v for v in (self._lda or {}).values() if isinstance(v, torch.Tensor)]
        for b in self._blocks or ():
            parts += [b.class_of, b.rows, b.bias]
        if self._factor is not None:
            parts.append(self._factor.inverse)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)
