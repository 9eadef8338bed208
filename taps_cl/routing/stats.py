"""Exemplar-free statistics of the frozen base's features, per task, for task-free routing.

Every task shares the frozen base, so one base forward gives a feature ``z`` (the pooled input
of the classifier) on which all tasks can be compared. Per task we keep, for its classes, the
count ``n_c`` and mean ``mu_c``, and its within-class scatter ``S_t = sum (z - mu_c)(z - mu_c)^T``.
These are sufficient for a pooled-covariance linear discriminant over all tasks (see
:mod:`taps_cl.routing.task_router`); no sample is kept.

Accumulation is float64 and exact under minibatching: each batch's per-class means and scatter
are merged with Chan et al.'s parallel formula, so batch-wise updates equal one update with all
the data up to float64 rounding.

Two stored forms (``TaskPatch`` tensors of kind ``route``), told apart by their names; ``d``
features, ``C`` classes, rank ``k`` (:data:`COMPACT_RANK`):

==================  ==============================================  =========================
name                content                                         dtype, shape
==================  ==============================================  =========================
``route.count``     samples per class (both forms)                  int64 ``[C]``
``route.calib``     patch confidence calibration (optional)         float64 ``[4]``
compact form        (new versions: ``2 C d + 2 k d + 4 d + 8 C`` bytes)
``route.mean``      class means                                     float16 ``[C, d]``
``route.basis``     ``U`` with ``S_t ~ U^T U + diag(r)``, top ``k``     float16 ``[k, d]``
``route.diag``      residual diagonal ``r`` (keeps ``diag(S_t)``)   float32 ``[d]``
full form           (older versions: ``8 C d + 2 d (d + 1) + 8 C`` bytes)
``route.mean``      class means                                     float64 ``[C, d]``
``route.scatter``   packed upper triangle of ``S_t``                float32 ``[d(d+1)/2]``
==================  ==============================================  =========================

For EfficientNet-Lite0 (``d = 1280``), ``C = 10`` and ``k = 16`` the compact form is 71,792 bytes
with the calibration, against 3,381,872 for the full form: the full scatter is the bulk, and the
rank-16-plus-diagonal approximation of it routes as well (measured in
``benchmarks/research/FINDINGS.md``, section d, and documented in ``docs/concepts.md``). Statistics
are accumulated in full (float64) and compressed once (:meth:`RouteStats.compress`); full statistics
of older versions keep routing through their exact scatter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from taps_cl.routing.calibration import Calibration, CalibrationAccumulator
from taps_cl.routing.compactstats import CompactStats, FullStats, compress

__all__ = [
    "COMPACT_RANK",
    "Calibration",
    "CalibrationAccumulator",
    "RouteStats",
    "RouteStatsAccumulator",
    "pack_symmetric",
    "unpack_symmetric",
]

ROUTE_PREFIX = "route."
COMPACT_RANK = 16  # rank of the compact scatter (see docs/concepts.md, routing statistics)
FULL_KEYS = frozenset({"route.count", "route.mean", "route.scatter"})
COMPACT_KEYS = frozenset({"route.count", "route.mean", "route.basis", "route.diag"})
_FP16_MAX = 6.0e4  # beyond this a value does not fit float16; such statistics keep float32


@functools.lru_cache(maxsize=4)
def _triu(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(dim, dim)
    return rows, cols


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric ``d x d`` matrix, row-major, as a 1-D tensor."""
    rows, cols = _triu(matrix.shape[0])
    return matrix[rows, cols]


def unpack_symmetric(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_symmetric`, as a float64 ``dim x dim`` matrix."""
    rows, cols = _triu(dim)
    out = torch.zeros(dim, dim, dtype=torch.float64)
    out[rows, cols] = packed.to(torch.float64)
    out[cols, rows] = packed.to(torch.float64)
    return out


def packed_dim(length: int) -> int:
    """``d`` such that ``d (d + 1) / 2 == length``; ``ValueError`` if there is none."""
    dim = (math.isqrt(8 * length + 1) - 1) // 2
    if dim * (dim + 1) // 2 != length:
        raise ValueError(f"{length} is not the length of a packed triangle d(d+1)/2")
    return dim


@dataclass(frozen=True)
class RouteStats:
    """One task's routing statistics: class counts and means, and its within-class scatter,
    either in full (``scatter``: versions written before compact statistics) or compact
    (``basis`` and ``diag``: ``S_t ~ basis^T basis + diag(diag)``)."""

    count: torch.Tensor  # int64 [C]: samples per class (0 = class never seen)
    mean: torch.Tensor  # float [C, d]: class means (rows of unseen classes are 0)
    scatter: torch.Tensor | None = None  # full form: [d(d+1)/2] packed upper triangle of S_t
    calibration: Calibration | None = None  # patch confidence on its own data, if measured
    basis: torch.Tensor | None = None  # compact form: float [k, d]
    diag: torch.Tensor | None = None  # compact form: float [d], the residual diagonal

    def __post_init__(self) -> None:
        count, mean, scatter = self.count, self.mean, self.scatter
        if count.ndim != 1 or count.dtype != torch.int64 or bool((count < 0).any()):
            raise ValueError("route count must be a 1-D int64 tensor of non-negative counts")
        if mean.ndim != 2 or mean.shape[0] != count.shape[0] or not mean.is_floating_point():
            raise ValueError(f"route mean must be float [C={count.shape[0]}, d], got {mean.shape}")
        compact = (self.basis, self.diag) != (None, None)
        if (scatter is None) == (not compact):
            raise ValueError("route statistics need either a scatter (full) or basis and diag")
        if compact:
            if self.basis is None or self.diag is None:
                raise ValueError("compact route statistics need both basis and diag")
            CompactStats(count, mean, self.basis, self.diag)  # its checks, its messages
            return
        dim = mean.shape[1]
        if scatter.shape != (dim * (dim + 1) // 2,) or not scatter.is_floating_point():
            raise ValueError(
                f"route scatter must be a packed float triangle of length {dim * (dim + 1) // 2} "
                f"for d={dim}, got shape {tuple(scatter.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(scatter).all()):
            raise ValueError("route statistics contain NaN or inf; recompute them")

    @property
    def compact(self) -> bool:
        """Whether the scatter is stored compact (rank ``k`` plus diagonal)."""
        return self.scatter is None

    @property
    def num_classes(self) -> int:
        return int(self.count.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])

    @property
    def total(self) -> int:
        return int(self.count.sum())

    @property
    def seen_classes(self) -> int:
        return int((self.count > 0).sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (:meth:`to_tensors` with its defaults)."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def scatter_matrix(self) -> torch.Tensor:
        """``S_t`` (full) or its compact approximation, as a float64 ``d x d`` matrix."""
        if self.scatter is not None:
            return unpack_symmetric(self.scatter, self.dim)
        return CompactStats(self.count, self.mean, self.basis, self.diag).scatter_matrix()

    def compress(self, rank: int = COMPACT_RANK) -> RouteStats:
        """The compact form: top-``rank`` eigenpairs of the scatter in float16 plus the exact
        residual diagonal, float16 means (float32 where a value exceeds float16's range).
        Deterministic; compact statistics of at most ``rank`` come back unchanged."""
        if self.compact and self.basis.shape[0] <= rank:
            return self
        full = FullStats(self.count, self.mean.to(torch.float64), self.scatter_matrix())
        big = math.sqrt(max(float(full.scatter.diagonal().sum()), 0.0))  # >= every |basis|
        small = torch.float16 if big < _FP16_MAX else torch.float32
        means = torch.float16 if float(self.mean.abs().max()) < _FP16_MAX else torch.float32
        c = compress(full, rank, basis_dtype=small, mean_dtype=means)
        return RouteStats(c.count, c.mean, None, self.calibration, c.basis, c.diag)

    def to_tensors(self, scatter_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``route.*`` tensors for a :class:`TaskPatch` (see the module docstring);
        ``scatter_dtype`` applies to the full form only."""
        out = {"route.count": self.count.clone()}
        if self.compact:
            out.update({"route.mean": self.mean.clone(), "route.basis": self.basis.clone()})
            out["route.diag"] = self.diag.clone()
        else:
            out["route.mean"] = self.mean.to(torch.float64).clone()
            out["route.scatter"] = self.scatter.to(scatter_dtype).clone()
        if self.calibration is not None:
            out["route.calib"] = self.calibration.to_tensor()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RouteStats:
        """Inverse of :meth:`to_tensors`; accepts a whole patch's tensors (ignores other kinds).

        ``ValueError`` if a statistic is missing, unknown, malformed or not finite, or if the
        tensors mix the full and the compact form.
        """
        route = {k: v for k, v in tensors.items() if k.startswith(ROUTE_PREFIX)}
        names = set(route) - {"route.calib"}
        if names - (FULL_KEYS | COMPACT_KEYS):
            raise ValueError(f"unknown route tensors {sorted(names - FULL_KEYS - COMPACT_KEYS)}")
        if "route.scatter" in names and names & (COMPACT_KEYS - FULL_KEYS):
            raise ValueError("route tensors mix the full (scatter) and compact (basis) forms")
        form = COMPACT_KEYS if names & (COMPACT_KEYS - FULL_KEYS) else FULL_KEYS
        missing = sorted(form - names)
        if missing:
            raise ValueError(f"route statistics incomplete: missing {missing}")
        calib = route.get("route.calib")
        return cls(
            count=route["route.count"],
            mean=route["route.mean"],
            scatter=route.get("route.scatter"),
            calibration=None if calib is None else Calibration.from_tensor(calib),
            basis=route.get("route.basis"),
            diag=route.get("route.diag"),
        )

    @classmethod
    def has_stats(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether ``tensors`` (e.g. a patch's) carry route statistics at all."""
        return any(k.startswith(ROUTE_PREFIX) for k in tensors)

    def with_calibration(self, calibration: Calibration | None) -> RouteStats:
        return dataclasses.replace(self, calibration=calibration)


class RouteStatsAccumulator:
    """Streams ``(features, labels)`` minibatches into float64 :class:`RouteStats`.

    Merging uses Chan's parallel update per class: with ``delta = mean_batch - mean_so_far``,
    ``S += S_batch + n_a n_b / (n_a + n_b) * delta delta^T``, so the order and size of batches
    do not change the result beyond float64 rounding.
    """

    def __init__(self, num_classes: int, dim: int | None = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.count = torch.zeros(num_classes, dtype=torch.int64)
        self.mean: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None
        if dim is not None:
            self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        self.mean = torch.zeros(self.num_classes, dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a minibatch: ``features`` float ``[n, d]``, ``labels`` int ``[n]`` in ``[0, C)``."""
        z, y = self._check(features, labels)
        if z.shape[0] == 0:
            return
        nb = torch.bincount(y, minlength=self.num_classes)
        sums = torch.zeros_like(self.mean).index_add_(0, y, z)
        seen = nb > 0
        mb = torch.where(seen[:, None], sums / nb.clamp(min=1)[:, None], torch.zeros_like(sums))
        centred = z - mb[y]
        batch_scatter = centred.T @ centred
        # Counts as float64 before dividing: int64 / int64 would give float32 in torch.
        na, nbf = self.count.to(torch.float64), nb.to(torch.float64)
        n = na + nbf
        delta = torch.where(seen[:, None], mb - self.mean, torch.zeros_like(mb))
        self.scatter += batch_scatter + (delta * (na * nbf / n.clamp(min=1))[:, None]).T @ delta
        self.mean += delta * (nbf / n.clamp(min=1))[:, None]
        self.count = self.count + nb

    def _check(self, features: torch.Tensor, labels: torch.Tensor) -> tuple:
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            raise ValueError(
                f"features must be a [n, d] tensor, got {getattr(features, 'shape', features)}"
            )
        if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],):
            raise ValueError(f"labels must be a [n] tensor matching features, got {labels!r}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
        if self.mean is None:
            self._allocate(features.shape[1])
        if features.shape[1] != self.mean.shape[1]:
            raise ValueError(f"features have d={features.shape[1]}, expected {self.mean.shape[1]}")
        z = features.detach().to("cpu", torch.float64)
        y = labels.detach().to("cpu", torch.int64)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got {y.min()}..{y.max()}"
            )
        if not torch.isfinite(z).all():
            raise ValueError("features contain NaN or inf")
        return z, y

    def result(self, calibration: Calibration | None = None) -> RouteStats:
        """The statistics so far (float64, packed scatter); ``ValueError`` if nothing was seen."""
        if self.mean is None or int(self.count.sum()) == 0:
            raise ValueError("no features were accumulated; call update() with data first")
        scatter = (self.scatter + self.scatter.T) / 2  # exact symmetry for packing
        return RouteStats(
            self.count.clone(), self.mean.clone(), pack_symmetric(scatter), calibration
        )
