"""The discriminant's class rows ``W mu_c`` and biases ``-0.5 mu_c' W mu_c``, ``W`` the inverse
of the pooled covariance shrunk towards ``tr(Sigma)/d I``, in two precisions:

- exact (every task has full statistics, i.e. stores of the release before compact statistics):
  :func:`lda_projection`, float64 Cholesky solves, the previous release's numbers bit for bit;
- compact (any task compact): :func:`factorise` inverts the shrunk covariance once (float64)
  and :func:`class_rows` turns class means into rows by one matrix product per chunk of
  classes. A large router keeps the inverse and the rows in float32 (the statistics are float16
  and approximate the scatter; float32 halves the table and the scoring product, relative
  score error about ``1e-7`` of the largest score); a small one keeps float64, which costs
  little there.

A :class:`Factor` is shared by every router derived from the one that computed it while the
tasks' statistics have moved little since (see :mod:`taps_cl.routing.classtable`): the rows of
an added task are then its means times the kept inverse, without a new factorisation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from taps_cl.routing.closedform import oas_shrinkage

_SOLVE_ROWS = 2048  # classes solved at once (bounds the temporaries of a large router)


@dataclass(frozen=True)
class Factor:
    """A shrunk pooled covariance, factorised: what class rows are solved against."""

    inverse: torch.Tensor | None  # float32 [d, d] W (compact precision); None when exact
    alpha: float  # the shrinkage in use (OAS estimate or the fixed value)
    drift: int = 0  # degrees of freedom of tasks added or removed since the factorisation


def shrunk_cholesky(
    sigma: torch.Tensor, dof: int, shrinkage: float | str
) -> tuple[torch.Tensor, float]:
    """(Cholesky factor of ``(1 - a) sigma + a tr(sigma)/d I``, ``a``), float64."""
    a = oas_shrinkage(sigma, dof) if shrinkage == "oas" else float(shrinkage)
    d = sigma.shape[0]
    target = float(torch.diagonal(sigma).sum()) / d
    if target <= 0:
        raise ValueError("pooled covariance has zero trace (all features equal per class)")
    shrunk = (1 - a) * sigma + a * target * torch.eye(d, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(shrunk)
    if int(info) != 0:
        raise ValueError("shrunk covariance is singular; use shrinkage > 0")
    return chol, a


def lda_projection(
    mu: torch.Tensor, sigma: torch.Tensor, dof: int, shrinkage: float | str
) -> dict[str, torch.Tensor | float]:
    """Rows ``W mu_c`` and biases ``-0.5 mu_c' W mu_c`` by float64 Cholesky solves (exact
    precision: the previous release's computation, kept bit for bit for full statistics)."""
    chol, a = shrunk_cholesky(sigma, dof, shrinkage)
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


def factorise(
    sigma: torch.Tensor, dof: int, shrinkage: float | str, dtype: torch.dtype = torch.float32
) -> Factor:
    """The shrunk covariance's inverse in ``dtype``, the precision of the rows solved with it."""
    chol, a = shrunk_cholesky(sigma, dof, shrinkage)
    inverse = torch.cholesky_inverse(chol)
    return Factor((inverse + inverse.T).mul_(0.5).to(dtype), a)


def class_rows(
    factor: Factor, means: Iterable[torch.Tensor], count: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows ``[count, d]`` in the inverse's dtype, biases float64 ``[count]``) of the class
    means, given in consecutive chunks (``count`` rows in all): one product per chunk, so a
    router of many tasks needs no ``K x d`` temporary beside its rows."""
    inverse = factor.inverse
    if inverse is None:
        raise ValueError("an exact factor holds no inverse; solve with lda_projection")
    rows = torch.empty(count, dim, dtype=inverse.dtype)
    bias = torch.empty(count, dtype=torch.float64)
    start = 0
    for mu in means:
        stop = start + mu.shape[0]
        mu = mu.to(inverse.dtype)
        torch.matmul(mu, inverse, out=rows[start:stop])  # W symmetric: mu W = (W mu')'
        bias[start:stop] = -0.5 * (rows[start:stop].to(torch.float64) * mu).sum(1)
        start = stop
    if start != count:
        raise ValueError(f"class means hold {start} rows, expected {count}")
    return rows, bias
