"""Task-free routing: choose, for each input, the task (and class) whose data it looks like.

The router works on base features (:mod:`~taps_cl.routing.features`) and per-task statistics
(:mod:`~taps_cl.routing.stats`). Methods of :meth:`TaskRouter.route`, all on base features
``z`` (one base forward per input):

- ``"lda"``: Gaussian linear discriminant with the covariance pooled over every task,
  ``Sigma = sum_t S_t / (N - C)``, shrunk ``(1 - a) Sigma + a tr(Sigma)/d I`` (``a`` fixed or
  OAS, the Ledoit-Wolf-type estimator that needs only ``Sigma``: Ledoit-Wolf proper needs fourth
  moments, which do not merge exactly across minibatches). Class score
  ``g_c(z) = mu_c' W z - 0.5 mu_c' W mu_c``, ``W = Sigma'^-1``; task score = logsumexp (or max)
  over its classes, i.e. its posterior mass under equal class priors.
- ``"ncm"``: nearest class mean by cosine (SimpleCIL), the baseline: ``W = I`` on normalised z.
- ``"energy"``: every task's own patch scores its inputs by calibrated energy (needs the patched
  logits of every task: ``T`` patched forwards; for comparison, not for serving).
- ``"combined"``: the discriminant shortlists the top-k tasks per input; each shortlisted patch
  runs once on the group of inputs that shortlisted it and its calibrated energy, plus
  ``discriminant_weight`` times the discriminant's log-posterior, decides.

Each task's statistics are full (versions written before compact statistics) or compact
(rank-``k`` scatter plus diagonal, :mod:`~taps_cl.routing.stats`); either way the task adds its
own term to one pooled scatter (:class:`~taps_cl.routing.pool.PooledScatter`). With every task
full the pooled sum, the discriminant and hence every decision and confidence are the previous
release's, bit for bit; with compact tasks adding or removing one updates the sum in place.
The router caches the inverse covariance and class projections and recomputes them after a
change (one ``d x d`` Cholesky factorisation).

Methods are registered (:mod:`~taps_cl.routing.methods`): a new one is a function plus
``@register_method``; the four above register at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from taps_cl.routing.closedform import oas_shrinkage
from taps_cl.routing.methods import METHODS, PATCHED_METHODS, ROUTING_METHODS, register_method
from taps_cl.routing.pool import PooledScatter
from taps_cl.routing.stats import RouteStats

__all__ = ["METHODS", "PATCHED_METHODS", "RouteResult", "TaskRouter", "oas_shrinkage"]

PatchedLogits = Callable[[str, torch.Tensor], torch.Tensor]
# Base features [n, d] of the inputs, or task name -> its own view of them: tasks trained at
# different input sizes compare an input by its features at each task's size.
Features = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class RouteResult:
    """Per-input routing decisions; ``scores`` columns follow ``tasks``."""

    tasks: tuple[str, ...]  # candidate task names (column order of ``scores``)
    task_index: torch.Tensor  # int64 [n]: chosen column of ``tasks``
    class_index: torch.Tensor  # int64 [n]: class within the chosen task
    confidence: torch.Tensor  # float64 [n]: softmax probability of the chosen task's score
    scores: torch.Tensor  # float64 [n, T]: task scores (-inf where a task was not evaluated)

    @property
    def task_names(self) -> list[str]:
        return [self.tasks[i] for i in self.task_index.tolist()]

    def groups(self) -> dict[str, torch.Tensor]:
        """Task name -> indices of the inputs routed to it (only tasks that got inputs)."""
        return {
            self.tasks[t]: (self.task_index == t).nonzero().flatten()
            for t in self.task_index.unique().tolist()
        }


class TaskRouter:
    """Scores every task for each base feature; built from ``{task_name: RouteStats}``."""

    def __init__(
        self,
        stats: Mapping[str, RouteStats] | None = None,
        *,
        shrinkage: float | str = "oas",
        reduce: str = "logsumexp",
        top_k: int = 2,
        discriminant_weight: float = 1.0,
        cosine_scale: float = 16.0,
    ) -> None:
        if not (shrinkage == "oas" or (isinstance(shrinkage, float | int) and 0 <= shrinkage <= 1)):
            raise ValueError(f"shrinkage must be 'oas' or a float in [0, 1], got {shrinkage!r}")
        if reduce not in ("logsumexp", "max"):
            raise ValueError(f"reduce must be 'logsumexp' or 'max', got {reduce!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        self.shrinkage, self.reduce, self.top_k = shrinkage, reduce, top_k
        self.discriminant_weight = float(discriminant_weight)
        self.cosine_scale = float(cosine_scale)  # softmax scale of cosine scores (confidence)
        self._pool = PooledScatter()
        self._cache: dict[str, torch.Tensor | float | tuple] | None = None
        for name, value in (stats or {}).items():
            self.add(name, value)

    # -- tasks -------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._pool.tasks

    @property
    def dim(self) -> int | None:
        return self._pool.values()[0].dim if len(self._pool) else None

    def __contains__(self, name: object) -> bool:
        return name in self._pool

    def add(self, name: str, stats: RouteStats) -> None:
        """Add (or replace) a task's statistics (full or compact): its term joins the pooled
        scatter; the cached projection is rebuilt lazily."""
        if not isinstance(stats, RouteStats):
            raise TypeError(f"stats of {name!r} must be RouteStats, got {type(stats).__name__}")
        if stats.seen_classes == 0:
            raise ValueError(f"task {name!r} has no samples in its route statistics")
        if self.dim is not None and stats.dim != self.dim and set(self.tasks) != {name}:
            raise ValueError(f"task {name!r} has d={stats.dim}, the router's tasks d={self.dim}")
        self._pool.add(name, stats)
        self._cache = None

    def remove(self, name: str) -> None:
        """Remove a task: afterwards the router is as if it had never been added (exactly with
        full statistics only; within float64 rounding of the pooled sum otherwise)."""
        self._pool.remove(name)
        self._cache = None

    def stats(self, name: str) -> RouteStats:
        return self._pool.stats(name)

    def rebuild(self) -> None:
        """Recompute the pooled scatter in task-name order (drops the rounding that in-place
        additions and removals accumulate)."""
        self._pool.rebuild()
        self._cache = None

    # -- cached projection -------------------------------------------------------------------

    def pooled_covariance(self) -> tuple[torch.Tensor, int]:
        """(``Sigma = sum_t S_t / (N - C)`` over every task, ``N - C``), float64, unshrunk.

        Each task adds its own term (exact or compact scatter, see :mod:`taps_cl.routing.pool`)."""
        _require_tasks(self)
        total = self._pool.total()
        stats = self._pool.values()
        dof = sum(s.total - s.seen_classes for s in stats)
        if dof <= 0:
            seen = sum(s.seen_classes for s in stats)
            raise ValueError(
                f"the tasks' statistics hold {dof + seen} samples for {seen} classes; "
                "the discriminant needs more samples than classes"
            )
        return total / dof, dof

    def _prepared(self, need_lda: bool) -> dict:
        if self._cache is None:
            _require_tasks(self)
            means, task_of, class_of = [], [], []
            for t, name in enumerate(self.tasks):
                stats = self._pool.stats(name)
                seen = (stats.count > 0).nonzero().flatten()
                means.append(stats.mean.to(torch.float64)[seen])
                task_of += [t] * len(seen)
                class_of += seen.tolist()
            mu = torch.cat(means)
            self._cache = {
                "mu": mu,
                "mu_unit": torch.nn.functional.normalize(mu, dim=1),
                "task_of": torch.tensor(task_of, dtype=torch.int64),
                "class_of": torch.tensor(class_of, dtype=torch.int64),
            }
        if need_lda and "proj" not in self._cache:
            sigma, dof = self.pooled_covariance()
            self._cache.update(_lda_projection(self._cache["mu"], sigma, dof, self.shrinkage))
        return self._cache

    @property
    def shrinkage_value(self) -> float:
        """The shrinkage ``a`` in use (OAS estimate or the fixed value)."""
        return float(self._prepared(True)["alpha"])

    # -- scores ------------------------------------------------------------------------------

    def _check(self, features: Features) -> torch.Tensor | dict[str, torch.Tensor]:
        _require_tasks(self)
        if isinstance(features, Mapping):
            missing = sorted(set(self.tasks) - set(features))
            if missing:
                raise ValueError(f"features per task miss the router's tasks {missing}")
            checked: dict[int, torch.Tensor] = {}
            views = {}
            for name in self.tasks:
                view = features[name]
                if id(view) not in checked:
                    checked[id(view)] = _checked(view, self.dim)
                views[name] = checked[id(view)]
            if len({v.shape[0] for v in views.values()}) != 1:
                raise ValueError("every task's features must have one row per input")
            return views
        return _checked(features, self.dim)

    def class_scores(self, features: Features, method: str = "lda") -> torch.Tensor:
        """Scores ``[n, K]`` of every seen class of every task (``"lda"`` or ``"ncm"``); with
        features per task, each task's classes are scored on that task's view."""
        z = self._check(features)
        if isinstance(z, dict):
            return _view_scores(self, z, method)
        if method == "lda":
            cache = self._prepared(True)
            return z @ cache["proj"].T + cache["bias"]
        if method == "ncm":
            cache = self._prepared(False)
            return torch.nn.functional.normalize(z, dim=1) @ cache["mu_unit"].T
        raise ValueError(f"class scores exist for 'lda' and 'ncm', not {method!r}")

    def _reduce(self, scores: torch.Tensor, method: str) -> torch.Tensor:
        cache = self._prepared(False)
        n, num_tasks = scores.shape[0], len(self.tasks)
        out = torch.full((n, num_tasks), -math.inf, dtype=torch.float64)
        index = cache["task_of"].expand(n, -1)
        if self.reduce == "max" or method == "ncm":
            return out.scatter_reduce(1, index, scores, "amax")
        peak = out.scatter_reduce(1, index, scores, "amax")
        summed = torch.zeros_like(out).scatter_add(1, index, (scores - peak.gather(1, index)).exp())
        return peak + summed.log()

    def task_scores(self, features: Features, method: str = "lda") -> torch.Tensor:
        """Discriminant (or cosine) task scores ``[n, T]``, columns in :attr:`tasks` order."""
        return self._reduce(self.class_scores(features, method), method)

    # -- routing -----------------------------------------------------------------------------

    def route(
        self,
        features: Features,
        method: str = "lda",
        patched_logits: PatchedLogits | None = None,
        *,
        top_k: int | None = None,
    ) -> RouteResult:
        """Choose a task, a class within it, and a confidence for each feature row.

        ``patched_logits(task, indices) -> logits [len(indices), C_task]`` runs one task's patch
        on the inputs ``indices``; ``"energy"`` and ``"combined"`` need it (once per task).
        """
        entry = ROUTING_METHODS.get(method)  # ValueError naming the registered methods
        if entry.patched and patched_logits is None:
            raise ValueError(f"method {method!r} needs patched_logits(task, indices)")
        return entry.route(self, features, patched_logits, top_k)

    def discriminant(self, features: Features, method: str) -> RouteResult:
        """Route by class scores alone (``"lda"`` or ``"ncm"``): the best task, its best class."""
        class_scores = self.class_scores(features, method)
        scores = self._reduce(class_scores, method)
        within = _best_class(self._prepared(False), class_scores, scores.argmax(1))
        scale = self.cosine_scale if method == "ncm" else 1.0
        return _result(self.tasks, scores, within, scale)

    def shortlist(self, features: Features, k: int | None = None) -> dict[str, torch.Tensor]:
        """Task name -> indices of the inputs whose top-``k`` discriminant tasks include it: run
        each listed patch once on its group, then pass the logits to :meth:`decide`."""
        k = min(k or self.top_k, len(self.tasks))
        top = self.task_scores(features, "lda").topk(k, dim=1).indices
        return {
            self.tasks[t]: (top == t).any(1).nonzero().flatten()
            for t in range(len(self.tasks))
            if bool((top == t).any())
        }

    def decide(
        self,
        features: Features,
        shortlist: Mapping[str, torch.Tensor],
        logits: Mapping[str, torch.Tensor],
        *,
        use_discriminant: bool = True,
    ) -> RouteResult:
        """Route by the shortlisted patches' calibrated energy (plus ``discriminant_weight`` x the
        discriminant's log-posterior when ``use_discriminant``); ``logits[task]`` are the
        patch's logits on the inputs ``shortlist[task]``, in that order."""
        z = self._check(features)
        n, tasks = _rows(z), self.tasks
        scores = torch.full((n, len(tasks)), -math.inf, dtype=torch.float64)
        post = torch.log_softmax(self.task_scores(z), 1) if use_discriminant else None
        for name, idx in shortlist.items():
            scores[idx, tasks.index(name)] = self._patch_score(name, idx, logits.get(name), post)
        if bool(torch.isinf(scores).all(1).any()):
            raise ValueError("some inputs were shortlisted for no task")
        chosen = scores.argmax(1)
        within = torch.empty(n, dtype=torch.int64)
        for name, idx in shortlist.items():
            mask = chosen[idx] == tasks.index(name)
            within[idx[mask]] = logits[name].detach().cpu()[mask].argmax(1).to(torch.int64)
        return _result(tasks, scores, within, 1.0)

    def _patch_score(
        self, name: str, idx: torch.Tensor, logits: torch.Tensor | None, post: torch.Tensor | None
    ) -> torch.Tensor:
        calib = self._pool.stats(name).calibration
        if calib is None:
            raise ValueError(f"task {name!r} has no calibration; collect it with its statistics")
        expect = (len(idx), int(self._pool.stats(name).num_classes))
        if logits is None or tuple(logits.shape) != expect:
            got = None if logits is None else tuple(logits.shape)
            raise ValueError(f"patched logits of {name!r} must have shape {expect}, got {got}")
        score = calib.score(logits.detach().to("cpu"))
        if post is not None:
            score = score + self.discriminant_weight * post[idx, self.tasks.index(name)]
        return score


def _rows(z: torch.Tensor | dict[str, torch.Tensor]) -> int:
    return next(iter(z.values())).shape[0] if isinstance(z, dict) else z.shape[0]


def _result(
    tasks: tuple[str, ...], scores: torch.Tensor, within: torch.Tensor, scale: float
) -> RouteResult:
    chosen = scores.argmax(1)
    probs = torch.softmax(scores * scale, dim=1)
    confidence = probs.gather(1, chosen[:, None]).squeeze(1)
    return RouteResult(tasks, chosen, within, confidence, scores)


def _lda_projection(
    mu: torch.Tensor, sigma: torch.Tensor, dof: int, shrinkage: float | str
) -> dict:
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
    proj = torch.cholesky_solve(mu.T.contiguous(), chol).T  # rows: W mu_c
    return {"proj": proj, "bias": -0.5 * (proj * mu).sum(1), "alpha": a}


def _checked(features: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``features`` as float64 CPU ``[n, dim]``, or a ``ValueError`` saying what is wrong."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(
            f"features must be a [n, d] tensor, got {getattr(features, 'shape', features)}"
        )
    if features.shape[0] == 0:
        raise ValueError("no inputs to route (features has 0 rows)")
    if features.shape[1] != dim:
        raise ValueError(f"features have d={features.shape[1]}, the tasks' statistics d={dim}")
    z = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(z).all():
        raise ValueError("features contain NaN or inf")
    return z


def _best_class(cache: dict, class_scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The best class of each input within its chosen task (columns of other tasks masked)."""
    masked = class_scores.masked_fill(cache["task_of"][None, :] != chosen[:, None], -math.inf)
    return cache["class_of"][masked.argmax(1)]


def _require_tasks(router: TaskRouter) -> None:
    if not router.tasks:
        raise ValueError("the router has no tasks with route statistics; add some first")


def _view_scores(router: TaskRouter, views: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    """Class scores with each task's columns taken from that task's own view of the inputs."""
    task_of = router._prepared(False)["task_of"]
    done: dict[int, torch.Tensor] = {}
    out = None
    for t, name in enumerate(router.tasks):
        view = views[name]
        if id(view) not in done:
            done[id(view)] = router.class_scores(view, method)
        out = done[id(view)].clone() if out is None else out
        cols = task_of == t
        out[:, cols] = done[id(view)][:, cols]
    return out


# -- the built-in methods (a new method: a function like these and one registration) ----------


@register_method("lda")
def _lda(router: TaskRouter, features: Features, patched: object, top_k: int | None):
    return router.discriminant(features, "lda")


@register_method("ncm")
def _ncm(router: TaskRouter, features: Features, patched: object, top_k: int | None):
    return router.discriminant(features, "ncm")


@register_method("energy", patched=True)
def _energy(router: TaskRouter, features: Features, patched: PatchedLogits, top_k: int | None):
    z = router._check(features)
    every = torch.arange(_rows(z))
    shortlist = {name: every for name in router.tasks}
    logits = {t: patched(t, idx) for t, idx in shortlist.items()}
    return router.decide(z, shortlist, logits, use_discriminant=False)


@register_method("combined", patched=True)
def _combined(router: TaskRouter, features: Features, patched: PatchedLogits, top_k: int | None):
    z = router._check(features)
    shortlist = router.shortlist(z, top_k)
    logits = {t: patched(t, idx) for t, idx in shortlist.items()}
    return router.decide(z, shortlist, logits, use_discriminant=True)
