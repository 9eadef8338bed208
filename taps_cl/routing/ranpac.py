"""A RanPAC-style head and task router on frozen base features (McDonnell et al., NeurIPS 2023).

Nothing is trained: a fixed random projection ``h = ReLU(W z)`` (``W`` in ``R^{M x d}``, drawn
from a seed, so only the seed is stored) lifts the base feature, and a ridge regression of the
one-hot class targets on ``h`` over every class of every task gives class scores
``h^T (G + lambda I)^-1 C`` from the accumulated ``G = sum h h^T`` and ``C = sum h y^T``.
``lambda`` comes from the training statistics alone (GCV, :func:`ridge_from_moments`), so it is
recomputed after an add or a delete without any data.

Per task the router keeps class counts and means of ``h`` and its within-class scatter in ``h``
space, exact (:class:`~taps_cl.routing.compactstats.FullStats`) or compact
(:class:`~taps_cl.routing.compactstats.CompactStats`); ``G`` is the shared :class:`PooledStats`
cache of the tasks' Gram terms, so deleting a task leaves the router as if it had never been added.
A task's score reduces its classes' scores (:func:`~taps_cl.routing.taskscore.reduce_scores`).
"""

from __future__ import annotations

import torch

from taps_cl.routing.closedform import ridge_from_moments
from taps_cl.routing.compactstats import ClassStats, PooledStats, compress, full_stats
from taps_cl.routing.taskscore import reduce_scores


class RandomProjection:
    """``h = ReLU(z W^T)`` with ``W [M, d]`` standard normal from ``seed`` (float32 by default)."""

    def __init__(self, dim: int, size: int = 2000, seed: int = 0, dtype=torch.float32) -> None:
        for label, value in (("dim", dim), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        self.dim, self.size, self.seed = dim, size, int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.weight = torch.randn(size, dim, generator=gen, dtype=torch.float64).to(dtype)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            raise ValueError(f"features must be [n, d], got {getattr(features, 'shape', None)}")
        if features.shape[1] != self.dim:
            raise ValueError(f"features have d={features.shape[1]}, the projection d={self.dim}")
        z = features.detach().to("cpu", self.weight.dtype)
        return torch.relu(z @ self.weight.T)


class RanPACRouter:
    """Ridge over the random features of every class of every task; tasks in name order.

    ``rank=None`` keeps each task's exact ``M x M`` scatter (for measurement); an int keeps the
    compact rank-``k``-plus-diagonal form. ``lam=None`` chooses ``lambda`` by GCV.
    """

    def __init__(
        self,
        projection: RandomProjection,
        *,
        rank: int | None = 16,
        lam: float | None = None,
        reduce: str = "max",
        scale: float = 1.0,
    ) -> None:
        if not isinstance(projection, RandomProjection):
            raise TypeError(f"projection must be a RandomProjection, got {type(projection)}")
        self.projection, self.rank, self.lam = projection, rank, lam
        self.reduce, self.scale = reduce, float(scale)
        self.pool = PooledStats("gram")
        self._solved: tuple[torch.Tensor, torch.Tensor, float] | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.pool.tasks

    def statistics(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int):
        """A task's statistics in random-feature space, in the form this router keeps."""
        stats = full_stats(self.projection(features), labels, num_classes)
        return stats if self.rank is None else compress(stats, self.rank)

    def add(self, name: str, stats: ClassStats) -> None:
        if stats.dim != self.projection.size:
            raise ValueError(
                f"stats of {name!r} have D={stats.dim}, projection M={self.projection.size}"
            )
        if int(stats.count.sum()) == 0:
            raise ValueError(f"task {name!r} has no samples")
        self.pool.add(name, stats)
        self._solved = None

    def add_data(self, name: str, features: torch.Tensor, labels: torch.Tensor, k: int) -> None:
        """Add task ``name`` from its base features and local labels in ``[0, k)``."""
        self.add(name, self.statistics(features, labels, k))

    def remove(self, name: str) -> None:
        self.pool.remove(name)
        self._solved = None

    def _solve(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self._solved is None:
            if not self.tasks:
                raise ValueError("the router has no tasks; add some first")
            cross, task_of = [], []
            for t, name in enumerate(self.tasks):
                s = self.pool.stats(name)
                cross.append((s.class_means() * s.count.to(torch.float64)[:, None]).T)
                task_of += [t] * int(s.count.shape[0])
            n = self.pool.count
            weight, reg = ridge_from_moments(
                self.pool.total, torch.cat(cross, 1), n, float(n), lam=self.lam
            )
            self._solved = (weight, torch.tensor(task_of), reg)
        return self._solved

    @property
    def lam_value(self) -> float:
        return self._solve()[2]

    def class_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Ridge scores ``[n, K]`` of every class, tasks in :attr:`tasks` order."""
        weight = self._solve()[0]
        return self.projection(features).to(torch.float64) @ weight

    def task_scores(self, features: torch.Tensor) -> torch.Tensor:
        return reduce_scores(self.class_scores(features), self._solve()[1], self.reduce, self.scale)

    def predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(task index, class index within that task) of the best class over all tasks."""
        best = self.class_scores(features).argmax(1)
        task_of = self._solve()[1]
        starts = torch.cumsum(torch.bincount(task_of), 0) - torch.bincount(task_of)
        return task_of[best], best - starts[task_of[best]]
