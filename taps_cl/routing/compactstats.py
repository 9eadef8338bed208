"""Compact per-task class statistics whose sum over tasks is the shared pooled scatter.

Today a task stores its full within-class scatter ``S_t`` (``d x d``, packed float32: 3.3 MB at
``d = 1280``), three times a compact patch. A task here stores instead

==============  ===============================================  ======================
name            content                                          bytes (d=1280, C=10)
==============  ===============================================  ======================
``count``       samples per class, int64 ``[C]``                 80
``mean``        class means, float16 ``[C, d]``                  25,600
``basis``       ``U`` with ``S_t ~ U^T U + diag(r)``, fp16 [k, d] 40,960 (k=16), 81,920 (k=32)
``diag``        the residual diagonal ``r``, float32 ``[d]``     5,120
==============  ===============================================  ======================

``U`` holds the top-``k`` eigenvectors of ``S_t`` scaled by the square roots of their
eigenvalues, rounded to ``basis`` dtype; ``r = diag(S_t) - diag(U^T U)`` is computed from the
*rounded* ``U``, so the approximation keeps ``S_t``'s diagonal (and trace) exactly.

The one shared object per base is :class:`PooledStats`: the float64 sum of the tasks'
*approximated* terms (``d x d``, 13 MB at ``d = 1280``; ``M x M`` = 32 MB at ``M = 2000`` for
the random-feature Gram of :mod:`taps_cl.routing.ranpac`). Because it is a cache of a sum of compact
terms, deleting a task subtracts exactly the term its adding added: the router afterwards equals
one that never saw the task, up to float64 rounding of the running sum (relative ``~1e-13``;
:meth:`PooledStats.rebuild` recomputes the sum from the terms in name order, bit-stable).

The same form serves the uncentred second moment ``G_t = S_t + sum_c n_c m_c m_c^T`` that a
ridge head needs (:meth:`ClassStats.gram`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ClassStats(Protocol):
    """What a discriminant or ridge router reads from one task's statistics."""

    count: torch.Tensor  # int64 [C]

    @property
    def dim(self) -> int: ...

    def class_means(self) -> torch.Tensor: ...

    def scatter_matrix(self) -> torch.Tensor: ...

    def gram(self) -> torch.Tensor: ...


def _gram(stats: ClassStats) -> torch.Tensor:
    n = stats.count.to(torch.float64)
    m = stats.class_means()
    return stats.scatter_matrix() + (m * n[:, None]).T @ m


@dataclass(frozen=True)
class FullStats:
    """Exact statistics: class counts, float64 means and the full within-class scatter."""

    count: torch.Tensor  # int64 [C]
    mean: torch.Tensor  # float64 [C, d]
    scatter: torch.Tensor  # float64 [d, d]

    def __post_init__(self) -> None:
        _check_counts_means(self.count, self.mean)
        d = self.mean.shape[1]
        if self.scatter.shape != (d, d):
            raise ValueError(f"scatter must be [{d}, {d}], got {tuple(self.scatter.shape)}")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])

    def class_means(self) -> torch.Tensor:
        return self.mean.to(torch.float64)

    def scatter_matrix(self) -> torch.Tensor:
        return self.scatter.to(torch.float64)

    def gram(self) -> torch.Tensor:
        return _gram(self)

    @property
    def nbytes(self) -> int:
        d = self.dim
        return 8 * self.count.numel() + 8 * self.mean.numel() + 4 * d * (d + 1) // 2


def _check_counts_means(count: torch.Tensor, mean: torch.Tensor) -> None:
    if count.ndim != 1 or count.dtype != torch.int64 or bool((count < 0).any()):
        raise ValueError("count must be a 1-D int64 tensor of non-negative counts")
    if mean.ndim != 2 or mean.shape[0] != count.shape[0] or not mean.is_floating_point():
        raise ValueError(f"mean must be float [C={count.shape[0]}, d], got {tuple(mean.shape)}")
    if not torch.isfinite(mean).all():
        raise ValueError("class means contain NaN or inf")


def full_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> FullStats:
    """Exact float64 statistics of ``features [n, d]`` with integer ``labels [n]``."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(f"features must be [n, d], got {getattr(features, 'shape', None)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],):
        raise ValueError("labels must be a [n] tensor matching features")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    z = features.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    count = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, z.shape[1], dtype=torch.float64).index_add_(0, y, z)
    mean = sums / count.clamp(min=1)[:, None].to(torch.float64)
    centred = z - mean[y]
    return FullStats(count, mean, centred.T @ centred)


@dataclass(frozen=True)
class CompactStats:
    """Class counts and means plus a rank-``k``-plus-diagonal within-class scatter."""

    count: torch.Tensor  # int64 [C]
    mean: torch.Tensor  # [C, d], float16 by default
    basis: torch.Tensor  # [k, d]: S ~ basis^T basis + diag(diag)
    diag: torch.Tensor  # float32 [d]: residual diagonal (>= 0)

    def __post_init__(self) -> None:
        _check_counts_means(self.count, self.mean)
        d = self.mean.shape[1]
        if self.basis.ndim != 2 or self.basis.shape[1] != d or not self.basis.is_floating_point():
            raise ValueError(f"basis must be float [k, {d}], got {tuple(self.basis.shape)}")
        if self.diag.shape != (d,) or not self.diag.is_floating_point():
            raise ValueError(f"diag must be float [{d}], got {tuple(self.diag.shape)}")
        if not (torch.isfinite(self.basis).all() and torch.isfinite(self.diag).all()):
            raise ValueError("compact scatter contains NaN or inf")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def nbytes(self) -> int:
        parts = (self.count, self.mean, self.basis, self.diag)
        return sum(t.numel() * t.element_size() for t in parts)

    def class_means(self) -> torch.Tensor:
        return self.mean.to(torch.float64)

    def scatter_matrix(self) -> torch.Tensor:
        u = self.basis.to(torch.float64)
        return u.T @ u + torch.diag(self.diag.to(torch.float64))

    def gram(self) -> torch.Tensor:
        return _gram(self)

    def to_tensors(self, prefix: str = "route.") -> dict[str, torch.Tensor]:
        """Named tensors for a patch (``<prefix>count``, ``mean``, ``basis``, ``diag``)."""
        names = ("count", "mean", "basis", "diag")
        return {prefix + n: getattr(self, n).clone() for n in names}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str = "route."
    ) -> CompactStats:
        missing = [n for n in ("count", "mean", "basis", "diag") if prefix + n not in tensors]
        if missing:
            raise ValueError(f"compact statistics incomplete: missing {missing} under {prefix!r}")
        return cls(*(tensors[prefix + n] for n in ("count", "mean", "basis", "diag")))


def symmetric_eig(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric PSD matrix ``s``. LAPACK's
    ``syevd`` can fail to converge on scatters with many repeated (zero) eigenvalues, e.g. a
    one-class task or fewer samples than dimensions; the SVD of a PSD matrix has the same pairs
    and is tried then, and a tiny ridge on the diagonal last."""
    try:
        return torch.linalg.eigh(s)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, sv, _ = torch.linalg.svd(s)
        return sv.flip(0), u.flip(1)
    except torch.linalg.LinAlgError:
        eps = 1e-12 * float(torch.diagonal(s).abs().sum().clamp(min=1.0))
        return torch.linalg.eigh(s + eps * torch.eye(s.shape[0], dtype=s.dtype))


def compress(
    stats: FullStats,
    rank: int = 16,
    *,
    basis_dtype: torch.dtype = torch.float16,
    mean_dtype: torch.dtype = torch.float16,
) -> CompactStats:
    """The top-``rank`` eigenpairs of the scatter, rounded, plus the exact residual diagonal."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    if basis_dtype not in _DTYPES or mean_dtype not in _DTYPES:
        raise ValueError(f"dtypes must be among {_DTYPES}")
    s = stats.scatter_matrix()
    s = (s + s.T) / 2
    k = min(rank, stats.dim)
    evals, evecs = symmetric_eig(s)
    top = evals[-k:].clamp(min=0).sqrt() if k else evals[:0]
    basis = (evecs[:, stats.dim - k :] * top).T.to(basis_dtype)
    u = basis.to(torch.float64)
    diag = (torch.diagonal(s) - (u * u).sum(0)).clamp(min=0).to(torch.float32)
    return CompactStats(stats.count.clone(), stats.mean.to(mean_dtype), basis.contiguous(), diag)


class PooledStats:
    """The shared per-base cache: float64 sum over tasks of their scatter (``kind="scatter"``)
    or uncentred Gram (``kind="gram"``), plus counts; add and remove one task's term."""

    def __init__(self, kind: str = "scatter") -> None:
        if kind not in ("scatter", "gram"):
            raise ValueError(f"kind must be 'scatter' or 'gram', got {kind!r}")
        self.kind = kind
        self._terms: dict[str, ClassStats] = {}
        self.total: torch.Tensor | None = None  # float64 [d, d]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self._terms))

    def __contains__(self, name: object) -> bool:
        return name in self._terms

    def stats(self, name: str) -> ClassStats:
        return self._terms[name]

    def _term(self, stats: ClassStats) -> torch.Tensor:
        return stats.scatter_matrix() if self.kind == "scatter" else stats.gram()

    def add(self, name: str, stats: ClassStats) -> None:
        """Add a task's term (``ValueError`` if the name is taken or ``d`` differs)."""
        if name in self._terms:
            raise ValueError(f"task {name!r} is already pooled; remove it first")
        if self.total is not None and stats.dim != self.total.shape[0]:
            raise ValueError(f"task {name!r} has d={stats.dim}, the pool d={self.total.shape[0]}")
        term = self._term(stats)
        self.total = term.clone() if self.total is None else self.total + term
        self._terms[name] = stats

    def remove(self, name: str) -> None:
        """Subtract exactly the term :meth:`add` added; the empty pool holds nothing."""
        if name not in self._terms:
            raise KeyError(f"no pooled task {name!r}; tasks: {list(self.tasks)}")
        stats = self._terms.pop(name)
        self.total = None if not self._terms else self.total - self._term(stats)

    def rebuild(self) -> None:
        """Recompute the sum from the terms in name order (drops accumulated rounding)."""
        terms = [self._term(self._terms[n]) for n in self.tasks]
        self.total = None if not terms else torch.stack(terms).sum(0)

    @property
    def count(self) -> int:
        return sum(int(s.count.sum()) for s in self._terms.values())

    @property
    def seen_classes(self) -> int:
        return sum(int((s.count > 0).sum()) for s in self._terms.values())

    @property
    def nbytes(self) -> int:
        return 0 if self.total is None else self.total.numel() * self.total.element_size()
