"""Exemplar-free statistics of the frozen base's features, per task, for task-free routing.

Every task shares the frozen base, so one base forward gives a feature ``z`` (the pooled input
of the classifier) on which all tasks can be compared. Per task we keep, for its classes, the
count ``n_c`` and mean ``mu_c``, and one within-class scatter ``S_t = sum (z - mu_c)(z - mu_c)^T``.
These are sufficient for a pooled-covariance linear discriminant over all tasks (see
:mod:`taps_cl.routing.task_router`); no sample is kept.

Accumulation is float64 and exact under minibatching: each batch's per-class means and scatter
are merged with Chan et al.'s parallel formula, so batch-wise updates equal one update with all
the data up to float64 rounding.

Stored form (``TaskPatch`` tensors of kind ``route``), for ``d`` features and ``C`` classes:

==================  ============================  ========================  ================
name                content                       dtype, shape              bytes
==================  ============================  ========================  ================
``route.count``     samples per class             int64 ``[C]``             ``8 C``
``route.mean``      class means                   float64 ``[C, d]``        ``8 C d``
``route.scatter``   packed upper triangle of S_t  float32 ``[d(d+1)/2]``    ``2 d (d+1)``
``route.calib``     patch confidence calibration  float64 ``[4]`` optional  ``32``
==================  ============================  ========================  ================

For EfficientNet-Lite0 (``d = 1280``) and ``C = 10``: 80 + 102,400 + 3,279,360 + 32 =
3,381,872 bytes (3.4 MB), against 13.1 MB for the full float64 ``d x d`` scatter, which would
outweigh a whole patch (4-7 MB). Why this form: the scatter is symmetric (the triangle halves
it), and it is only ever summed over tasks, divided by ``N - C``, shrunk towards a multiple of
the identity and inverted, so float32's relative rounding (6e-8) is far below the shrinkage and
the sampling error (accumulation itself stays float64, where long sums of outer products need
it). The means stay float64 because they are small (``C d``) and enter every score directly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

ROUTE_PREFIX = "route."
# count, temperature, mean and std of the energy -T logsumexp(logits / T) on the task's own data
_CALIB_FIELDS = 4


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
class Calibration:
    """How confident a task's own patch is on its own training data, to compare patches.

    A patch's energy ``E(x) = -T logsumexp(logits / T)`` is low on inputs like its training data;
    ``score(logits) = (energy_mean - E) / energy_std`` puts every patch on one scale.
    """

    count: int  # training samples the statistics were taken on
    temperature: float  # T of the energy
    energy_mean: float  # mean energy on the task's training data
    energy_std: float  # its standard deviation (> 0)

    def __post_init__(self) -> None:
        values = (self.temperature, self.energy_mean, self.energy_std)
        if self.count < 1 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"calibration needs count >= 1 and finite values, got {self}")
        if self.temperature <= 0 or self.energy_std <= 0:
            raise ValueError(f"calibration temperature and energy_std must be > 0, got {self}")

    def energy(self, logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return -t * torch.logsumexp(logits.to(torch.float64) / t, dim=-1)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Standardised negative energy: higher means more like the task's own data."""
        return (self.energy_mean - self.energy(logits)) / self.energy_std

    def to_tensor(self) -> torch.Tensor:
        fields = [self.count, self.temperature, self.energy_mean, self.energy_std]
        return torch.tensor(fields, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Calibration:
        if tensor.shape != (_CALIB_FIELDS,) or not tensor.is_floating_point():
            raise ValueError(f"route.calib must be a float [{_CALIB_FIELDS}], got {tensor.shape}")
        count, temperature, mean, std = (float(v) for v in tensor.to(torch.float64))
        if not math.isfinite(count) or count != int(count):
            raise ValueError(f"route.calib count must be an integer, got {count}")
        return cls(int(count), temperature, mean, std)


@dataclass(frozen=True)
class RouteStats:
    """One task's routing statistics: class counts and means, and its within-class scatter."""

    count: torch.Tensor  # int64 [C]: samples per class (0 = class never seen)
    mean: torch.Tensor  # float64 [C, d]: class means (rows of unseen classes are 0)
    scatter: torch.Tensor  # [d(d+1)/2]: packed upper triangle of S_t (float64 or float32)
    calibration: Calibration | None = None  # patch confidence on its own data, if measured

    def __post_init__(self) -> None:
        count, mean, scatter = self.count, self.mean, self.scatter
        if count.ndim != 1 or count.dtype != torch.int64 or bool((count < 0).any()):
            raise ValueError("route count must be a 1-D int64 tensor of non-negative counts")
        if mean.ndim != 2 or mean.shape[0] != count.shape[0] or not mean.is_floating_point():
            raise ValueError(f"route mean must be float [C={count.shape[0]}, d], got {mean.shape}")
        dim = mean.shape[1]
        if scatter.shape != (dim * (dim + 1) // 2,) or not scatter.is_floating_point():
            raise ValueError(
                f"route scatter must be a packed float triangle of length {dim * (dim + 1) // 2} "
                f"for d={dim}, got shape {tuple(scatter.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(scatter).all()):
            raise ValueError("route statistics contain NaN or inf; recompute them")

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

    def scatter_matrix(self) -> torch.Tensor:
        """``S_t`` as a float64 ``d x d`` matrix."""
        return unpack_symmetric(self.scatter, self.dim)

    def to_tensors(self, scatter_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``route.*`` tensors for a :class:`TaskPatch` (compact form: see module docstring)."""
        out = {
            "route.count": self.count.clone(),
            "route.mean": self.mean.to(torch.float64).clone(),
            "route.scatter": self.scatter.to(scatter_dtype).clone(),
        }
        if self.calibration is not None:
            out["route.calib"] = self.calibration.to_tensor()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RouteStats:
        """Inverse of :meth:`to_tensors`; accepts a whole patch's tensors (ignores other kinds).

        ``ValueError`` if a statistic is missing, unknown, malformed or not finite.
        """
        route = {k: v for k, v in tensors.items() if k.startswith(ROUTE_PREFIX)}
        known = {"route.count", "route.mean", "route.scatter", "route.calib"}
        if set(route) - known:
            raise ValueError(f"unknown route tensors {sorted(set(route) - known)}")
        missing = sorted({"route.count", "route.mean", "route.scatter"} - set(route))
        if missing:
            raise ValueError(f"route statistics incomplete: missing {missing}")
        calib = route.get("route.calib")
        return cls(
            count=route["route.count"],
            mean=route["route.mean"],
            scatter=route["route.scatter"],
            calibration=None if calib is None else Calibration.from_tensor(calib),
        )

    @classmethod
    def has_stats(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether ``tensors`` (e.g. a patch's) carry route statistics at all."""
        return any(k.startswith(ROUTE_PREFIX) for k in tensors)

    def with_calibration(self, calibration: Calibration | None) -> RouteStats:
        return RouteStats(self.count, self.mean, self.scatter, calibration)


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


class CalibrationAccumulator:
    """Streams a patch's logits on its own training data into a :class:`Calibration`."""

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, logits: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError("logits must be a [n, classes] tensor")
        if not torch.isfinite(logits).all():
            raise ValueError("logits contain NaN or inf")
        t = self.temperature
        energy = -t * torch.logsumexp(logits.detach().to("cpu", torch.float64) / t, dim=-1)
        nb = energy.numel()
        if nb == 0:
            return
        mb = float(energy.mean())
        m2b = float(((energy - mb) ** 2).sum())
        n = self.count + nb
        delta = mb - self.mean
        self.m2 += m2b + delta * delta * self.count * nb / n
        self.mean += delta * nb / n
        self.count = n

    def result(self) -> Calibration:
        if self.count < 2:
            raise ValueError("calibration needs the logits of at least 2 samples")
        std = math.sqrt(self.m2 / (self.count - 1))
        return Calibration(self.count, self.temperature, self.mean, max(std, 1e-12))
