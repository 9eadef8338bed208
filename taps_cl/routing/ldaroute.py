"""Pooled-covariance LDA task router over per-task statistics, full or compact.

The discriminant of today's router (:mod:`taps_cl.routing.task_router`), rebuilt on
:class:`~taps_cl.routing.compactstats.PooledStats`: the pooled within-class scatter is the shared
cache of the tasks' (compact) scatter terms, so adding or deleting a task costs one ``d x d`` add or
subtract and the deleted task leaves nothing behind. Class scores are ``mu_c^T Sigma^-1 z - mu_c^T
Sigma^-1 mu_c / 2`` (equal priors, as today); a task's score reduces its classes' scores
(:func:`~taps_cl.routing.taskscore.reduce_scores`, ``logsumexp`` by default).
"""

from __future__ import annotations

import torch

from taps_cl.routing.closedform import lda_head
from taps_cl.routing.compactstats import ClassStats, PooledStats
from taps_cl.routing.taskscore import reduce_scores, task_index


class LDARouter:
    """Tasks in name order; ``shrinkage=None`` is OAS on the pooled covariance."""

    def __init__(self, *, shrinkage: float | None = None, reduce: str = "logsumexp") -> None:
        self.shrinkage, self.reduce = shrinkage, reduce
        self.pool = PooledStats("scatter")
        self._head = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.pool.tasks

    def add(self, name: str, stats: ClassStats) -> None:
        if int(stats.count.sum()) == 0:
            raise ValueError(f"task {name!r} has no samples in its statistics")
        self.pool.add(name, stats)
        self._head = None

    def remove(self, name: str) -> None:
        self.pool.remove(name)
        self._head = None

    def _solve(self):
        if self._head is None:
            if not self.tasks:
                raise ValueError("the router has no tasks; add some first")
            stats = [self.pool.stats(n) for n in self.tasks]
            count = torch.cat([s.count for s in stats])
            mean = torch.cat([s.class_means() for s in stats])
            head = lda_head(count, mean, self.pool.total, shrinkage=self.shrinkage, priors=False)
            self._head = (head, task_index([int(s.count.shape[0]) for s in stats]))
        return self._head

    def class_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Discriminant scores ``[n, K]`` of every class of every task (unseen: ``-1e4``)."""
        return self._solve()[0].logits(features)

    def task_scores(self, features: torch.Tensor) -> torch.Tensor:
        head, task_of = self._solve()
        return reduce_scores(head.logits(features), task_of, self.reduce)
