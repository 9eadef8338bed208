"""Closed-form linear heads on frozen base features: ridge, shrinkage LDA and NCM.

A task's patch trains its head from scratch, and short runs (a few dozen steps) end below what a
closed-form probe on the same frozen features reaches before any training (the linear-probe-then-
fine-tune observation, Kumar et al. 2022). These functions give that probe, so a head can start
where it ends:

- :func:`ridge_head` from samples, its ``lambda`` chosen by exact leave-one-out error (PRESS)
  on the task's own training data, and a logit temperature fitted by cross-entropy on the
  leave-one-out scores (training scores of an ``n < d`` ridge fit are overconfident).
- :func:`ridge_from_moments` from sufficient statistics alone (``G = sum h h^T``,
  ``C = sum h y^T``), ``lambda`` by generalised cross-validation (GCV), which needs nothing but
  ``G``, ``C``, ``sum y^T y`` and ``n``: what a router can recompute after a task is deleted.
- :func:`lda_head` from class counts, means and the within-class scatter, covariance shrunk by
  OAS; its scores are log-posteriors (up to a shared constant), so their logit scale is 1.
- :func:`ncm_head`: cosine to class means, scaled.

Everything is float64 internally; heads come back as :class:`LinearHead` (``weight [C, d]``,
``bias [C]``), ready to copy into an ``nn.Linear`` (``weight * scale``, ``bias * scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from taps_cl.routing.compactstats import symmetric_eig

DEFAULT_GRID = tuple(10.0**e for e in torch.arange(-6.0, 3.01, 0.5).tolist())


@dataclass(frozen=True)
class LinearHead:
    """``logits = scale * (z @ weight.T + bias)``: a closed-form classifier over features."""

    weight: torch.Tensor  # float64 [C, d]
    bias: torch.Tensor  # float64 [C]
    scale: float = 1.0  # logit temperature inverse: what makes the scores calibrated for CE
    kind: str = ""  # "ridge", "lda" or "ncm"
    param: float = 0.0  # ridge lambda, LDA shrinkage or NCM scale: for reports

    def __post_init__(self) -> None:
        w, b = self.weight, self.bias
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"head weight must be [C, d] and bias [C], got {w.shape}, {b.shape}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        z = _features(features, self.weight.shape[1])
        return self.scale * (z @ self.weight.T + self.bias)

    def with_scale(self, scale: float) -> LinearHead:
        return LinearHead(self.weight, self.bias, float(scale), self.kind, self.param)

    def scaled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with the scale folded in, float32: what an ``nn.Linear`` takes."""
        return (self.scale * self.weight).float(), (self.scale * self.bias).float()


# -- input checks -------------------------------------------------------------------------------


def _features(features: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(
            f"features must be a [n, d] tensor, got {getattr(features, 'shape', None)}"
        )
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"features have d={features.shape[1]}, the head expects d={dim}")
    z = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(z).all():
        raise ValueError("features contain NaN or inf")
    return z


def _labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
        raise ValueError(f"labels must be a [n={n}] tensor, got {getattr(labels, 'shape', None)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    y = labels.detach().to("cpu", torch.int64)
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    return y


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float64 one-hot targets ``[n, C]``."""
    return torch.nn.functional.one_hot(labels.to(torch.int64), num_classes).to(torch.float64)


# -- ridge from samples -------------------------------------------------------------------------


def ridge_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    lam: float | None = None,
    grid: tuple[float, ...] = DEFAULT_GRID,
    temperature: bool = True,
) -> LinearHead:
    """Ridge regression of one-hot targets on centred features, with an intercept.

    ``lam=None`` picks ``lambda`` from ``grid`` (multiples of the mean eigenvalue of the centred
    Gram, so the grid does not depend on the feature scale) by exact leave-one-out squared error.
    ``temperature`` fits the logit scale by cross-entropy on the leave-one-out scores.
    """
    z = _features(features)
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"ridge needs at least 2 samples, got {n}")
    y = one_hot(_labels(labels, n, num_classes), num_classes)
    mz, my = z.mean(0), y.mean(0)
    u, s, vh = torch.linalg.svd(z - mz, full_matrices=False)
    s2 = s * s
    unit = float(s2.sum()) / max(1, int((s2 > 1e-12 * s2.max()).sum()))
    unit = unit if unit > 0 else 1.0  # identical features: zero weight, the bias predicts
    uty = u.T @ (y - my)
    candidates = [lam / unit] if lam is not None else list(grid)
    best = min(candidates, key=lambda c: _press(u, s2, uty, y - my, c * unit, n))
    reg = best * unit
    coef = vh.T @ ((s / (s2 + reg))[:, None] * uty)  # [d, C]
    weight = coef.T.contiguous()
    bias = my - weight @ mz
    head = LinearHead(weight, bias, 1.0, "ridge", reg)
    if temperature:
        loo = _loo_scores(u, s2, uty, y - my, reg, n) + my
        head = head.with_scale(fit_scale(loo, labels))
    return head


def _hat_diag(u: torch.Tensor, s2: torch.Tensor, reg: float, n: int) -> torch.Tensor:
    return (u * u) @ (s2 / (s2 + reg)) + 1.0 / n  # + 1/n: the intercept


def _loo_scores(
    u: torch.Tensor, s2: torch.Tensor, uty: torch.Tensor, yc: torch.Tensor, reg: float, n: int
) -> torch.Tensor:
    """Leave-one-out predictions (centred targets): ``y_i - e_i / (1 - H_ii)``."""
    fitted = u @ ((s2 / (s2 + reg))[:, None] * uty)
    resid = (yc - fitted) / (1.0 - _hat_diag(u, s2, reg, n)).clamp(min=1e-12)[:, None]
    return yc - resid


def _press(
    u: torch.Tensor, s2: torch.Tensor, uty: torch.Tensor, yc: torch.Tensor, reg: float, n: int
) -> float:
    return float(((yc - _loo_scores(u, s2, uty, yc, reg, n)) ** 2).sum())


def fit_scale(
    scores: torch.Tensor, labels: torch.Tensor, max_scale: float = 30.0, iters: int = 60
) -> float:
    """The ``s`` minimising mean cross-entropy of ``softmax(s * scores)``: a 1-D convex problem,
    solved by golden-section search on ``log s`` in ``[1e-2, max_scale]``. The cap matters when
    the scores separate the data perfectly (the loss then falls forever): a head started at an
    unbounded scale passes no gradient to the layers below it."""
    x = scores.detach().to(torch.float64)
    y = labels.detach().to(torch.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"scores must be [n, C] and labels [n], got {x.shape}, {y.shape}")

    def loss(log_s: float) -> float:
        return float(torch.nn.functional.cross_entropy(math.exp(log_s) * x, y))

    if not max_scale > 1e-2:
        raise ValueError(f"max_scale must be > 0.01, got {max_scale}")
    lo, hi = math.log(1e-2), math.log(max_scale)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


# -- ridge from moments -------------------------------------------------------------------------


def ridge_from_moments(
    gram: torch.Tensor,
    cross: torch.Tensor,
    count: int,
    target_sq: float,
    *,
    lam: float | None = None,
    grid: tuple[float, ...] = DEFAULT_GRID,
) -> tuple[torch.Tensor, float]:
    """Ridge ``W = (G + lambda I)^-1 C`` (no intercept, as RanPAC) from ``G = sum h h^T [D, D]``,
    ``C = sum h y^T [D, K]``, the sample ``count`` and ``target_sq = sum ||y||^2``.

    ``lam=None``: generalised cross-validation, ``n RSS / (n - df)^2`` over ``grid`` (multiples
    of the mean eigenvalue of ``G``), with ``RSS = sum||y||^2 - 2 tr(W^T C) + tr(W^T G W)`` and
    ``df = sum e / (e + lambda)`` from the eigenvalues ``e`` of ``G``. Returns ``(W [D, K],
    lambda)``.
    """
    g = gram.detach().to(torch.float64)
    c = cross.detach().to(torch.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or c.ndim != 2 or c.shape[0] != g.shape[0]:
        raise ValueError(f"gram must be [D, D] and cross [D, K], got {g.shape}, {c.shape}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    evals, evecs = symmetric_eig((g + g.T) / 2)
    evals = evals.clamp(min=0)
    unit = float(evals.sum()) / max(1, min(count, g.shape[0]))
    if unit <= 0:
        raise ValueError("the Gram matrix is zero: no features were accumulated")
    vtc = evecs.T @ c
    regs = [lam] if lam is not None else [x * unit for x in grid]

    def gcv(reg: float) -> float:
        f = 1.0 / (evals + reg)
        rss = target_sq - float((vtc * vtc * (f * (2 - evals * f))[:, None]).sum())
        df = float((evals * f).sum())
        return count * max(rss, 0.0) / max(count - df, 1e-9) ** 2

    reg = min(regs, key=gcv)
    weight = evecs @ (vtc / (evals + reg)[:, None])
    return weight, float(reg)


# -- LDA and NCM from class statistics ----------------------------------------------------------


def oas_shrinkage(cov: torch.Tensor, dof: int) -> float:
    """Oracle Approximating Shrinkage (Chen et al. 2010) towards ``tr(cov)/d I``."""
    d = cov.shape[0]
    mu = float(torch.diagonal(cov).sum()) / d
    alpha = float((cov**2).mean())
    den = (dof + 1) * (alpha - mu * mu / d)
    return 1.0 if den <= 0 else min((alpha + mu * mu) / den, 1.0)


def lda_head(
    count: torch.Tensor,
    mean: torch.Tensor,
    scatter: torch.Tensor,
    *,
    shrinkage: float | None = None,
    priors: bool = True,
) -> LinearHead:
    """Linear discriminant from class ``count [C]``, ``mean [C, d]`` and the within-class
    ``scatter [d, d]`` (pooled over the classes): ``w_c = Sigma^-1 mu_c``,
    ``b_c = -mu_c^T Sigma^-1 mu_c / 2 + log pi_c``. ``shrinkage=None`` is OAS.

    The scores are log-posteriors up to a per-input constant, so their logit scale is 1; a
    class never seen (count 0) gets bias ``-inf``-like ``-1e4`` so it is never chosen.
    """
    n_c = count.detach().to(torch.float64)
    mu = mean.detach().to(torch.float64)
    if n_c.ndim != 1 or mu.shape[0] != n_c.shape[0] or scatter.shape != (mu.shape[1],) * 2:
        raise ValueError(f"need count [C], mean [C, d], scatter [d, d]: {n_c.shape}, {mu.shape}")
    seen = n_c > 0
    dof = int(n_c.sum()) - int(seen.sum())
    if dof <= 0:
        raise ValueError(f"LDA needs more samples ({int(n_c.sum())}) than seen classes")
    sigma = scatter.detach().to(torch.float64) / dof
    a = oas_shrinkage(sigma, dof) if shrinkage is None else float(shrinkage)
    if not 0 <= a <= 1:
        raise ValueError(f"shrinkage must be in [0, 1], got {a}")
    d = sigma.shape[0]
    target = float(torch.diagonal(sigma).sum()) / d
    shrunk = (1 - a) * sigma + a * max(target, 1e-12) * torch.eye(d, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(shrunk)
    if int(info) != 0:
        raise ValueError("the shrunk covariance is singular; use a larger shrinkage")
    weight = torch.cholesky_solve(mu.T.contiguous(), chol).T
    bias = -0.5 * (weight * mu).sum(1)
    if priors:
        bias = bias + torch.log(n_c.clamp(min=1) / n_c.sum())
    bias = torch.where(seen, bias, torch.full_like(bias, -1e4))
    return LinearHead(weight.contiguous(), bias, 1.0, "lda", a)


def class_moments(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count ``[C]`` int64, mean ``[C, d]``, within-class scatter ``[d, d]``), float64."""
    z = _features(features)
    y = _labels(labels, z.shape[0], num_classes)
    count = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, z.shape[1], dtype=torch.float64).index_add_(0, y, z)
    mean = sums / count.clamp(min=1)[:, None].to(torch.float64)
    centred = z - mean[y]
    return count, mean, centred.T @ centred


def ncm_head(mean: torch.Tensor, scale: float = 16.0) -> LinearHead:
    """Cosine to the class means: weight = unit means, no bias. Features must be unit-normed
    by the caller (``logits(normalize(z))``); ``scale`` is the softmax scale."""
    unit = torch.nn.functional.normalize(mean.detach().to(torch.float64), dim=1)
    return LinearHead(unit, torch.zeros(unit.shape[0], dtype=torch.float64), scale, "ncm", scale)
