"""What a router derives from its tasks' statistics before it can score: one row per seen class.

Built once per set of tasks (a router's tasks never change after it scores; a changed set is a
new :class:`ClassTable`), each part on first use:

- ``task_of`` / ``class_of``: the task column and the class within the task of every row;
- unit-norm class means, for ``"ncm"`` only;
- the discriminant's rows ``W mu_c`` and biases ``-0.5 mu_c' W mu_c``, for ``"lda"``, from the
  pooled ``d x d`` covariance (one Cholesky factorisation and one solve over every class).

Memory: the class means are not kept in float64 (they are re-read from the statistics when a
part needs them), so a table holds ``8 K d`` bytes per computed part (``K`` classes over all
tasks) and no ``d x d`` matrix. The LDA part is the whole cost of a new set of tasks at scale
(``O(K d^2)``: every class's row depends on the pooled covariance, which every task moves);
it is solved in chunks of classes, so a router of many tasks needs no ``K x d`` temporaries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from taps_cl.routing.closedform import oas_shrinkage
from taps_cl.routing.stats import RouteStats

_SOLVE_ROWS = 2048  # classes solved at once (bounds the temporaries of a large router)


class ClassTable:
    """Rows of every seen class of ``stats`` (tasks in the given order), computed lazily."""

    def __init__(self, stats: list[RouteStats]) -> None:
        self._stats = stats
        task_of, class_of = [], []
        for t, s in enumerate(stats):
            seen = (s.count > 0).nonzero().flatten()
            task_of.append(torch.full((len(seen),), t, dtype=torch.int64))
            class_of.append(seen)
        self.task_of = torch.cat(task_of)  # int64 [K]: task column of each row
        self.class_of = torch.cat(class_of).to(torch.int64)  # int64 [K]: class within the task
        self._unit: torch.Tensor | None = None
        self._lda: dict[str, torch.Tensor | float] | None = None

    def means(self) -> torch.Tensor:
        """The seen classes' means, float64 ``[K, d]`` (built on each call, not kept)."""
        return torch.cat([s.mean.to(torch.float64)[s.count > 0] for s in self._stats])

    def unit_means(self) -> torch.Tensor:
        """Class means scaled to unit norm (``"ncm"``)."""
        if self._unit is None:
            self._unit = torch.nn.functional.normalize(self.means(), dim=1)
        return self._unit

    def lda(
        self, covariance: Callable[[], tuple[torch.Tensor, int]], shrinkage: float | str
    ) -> dict[str, torch.Tensor | float]:
        """``{"proj", "bias", "alpha"}`` of the discriminant; ``covariance()`` gives the pooled
        (covariance, degrees of freedom), asked for only the first time."""
        if self._lda is None:
            sigma, dof = covariance()
            self._lda = lda_projection(self.means(), sigma, dof, shrinkage)
        return self._lda

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the table holds now."""
        parts = [self.task_of, self.class_of, self._unit]
        parts += [v for v in (self._lda or {}).values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def lda_projection(
    mu: torch.Tensor, sigma: torch.Tensor, dof: int, shrinkage: float | str
) -> dict[str, torch.Tensor | float]:
    """Rows ``W mu_c`` and biases ``-0.5 mu_c' W mu_c`` of the discriminant, ``W`` the inverse
    of ``sigma`` shrunk towards ``tr(sigma)/d I`` by OAS (``"oas"``) or a fixed amount."""
    a = oas_shrinkage(sigma, dof) if shrinkage == "oas" else float(shrinkage)
    d = sigma.shape[0]
    target = float(torch.diagonal(sigma).sum()) / d
    if target <= 0:
        raise ValueError("pooled covariance has zero trace (all features equal per class)")
    shrunk = (1 - a) * sigma + a * target * torch.eye(d, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(shrunk)
    if int(info) != 0:
        raise ValueError("shrunk covariance is singular; use shrinkage > 0")
    if mu.shape[0] <= _SOLVE_ROWS:
        proj = torch.cholesky_solve(mu.T.contiguous(), chol).T  # rows: W mu_c
        return {"proj": proj, "bias": -0.5 * (proj * mu).sum(1), "alpha": a}
    proj = torch.empty_like(mu)  # in chunks of classes: no K x d temporaries beside it
    bias = torch.empty(mu.shape[0], dtype=torch.float64)
    for rows in torch.arange(mu.shape[0]).split(_SOLVE_ROWS):
        part = mu[rows]
        proj[rows] = torch.cholesky_solve(part.T.contiguous(), chol).T
        bias[rows] = -0.5 * (proj[rows] * part).sum(1)
    return {"proj": proj, "bias": bias, "alpha": a}
