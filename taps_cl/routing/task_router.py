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
The router caches its class rows (:class:`~taps_cl.routing.classtable.ClassTable`: one ``d x d``
factorisation and one solve over every class; float32 rows once any task is compact).
:meth:`TaskRouter.derive` makes the router of a slightly different set of tasks from an existing
one and leaves that one as it was, so serving threads can keep routing with it: the pooled sum
plus or minus the changed tasks' terms, and (stale) the source's factorised covariance and rows
with only the added tasks' classes solved, until the changes since the last full solve exceed
``stale_fraction`` of the degrees of freedom; then, or after :meth:`TaskRouter.rebuild`, every
row is solved again.

Size: the router holds each task's statistics as stored (compact: about 72 KB per task at
``d = 1280``, ``C = 10``, rank 16; no ``d x d`` matrix per task), one float64 ``d x d`` pooled
sum and the class table (``4 K d`` bytes of float32 rows, ``K`` classes over all tasks, plus a
float32 ``d x d`` inverse); :attr:`TaskRouter.nbytes` counts them.

Methods are registered (:mod:`~taps_cl.routing.methods`): a new one is a function plus
``@register_method``; the four above register at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from taps_cl.routing.classtable import ClassTable
from taps_cl.routing.closedform import oas_shrinkage
from taps_cl.routing.methods import METHODS, PATCHED_METHODS, ROUTING_METHODS, register_method
from taps_cl.routing.pool import PooledScatter
from taps_cl.routing.result import RouteResult, checked_features, route_result
from taps_cl.routing.stats import RouteStats

__all__ = ["METHODS", "PATCHED_METHODS", "RouteResult", "TaskRouter", "oas_shrinkage"]

# A derived router solves only its added tasks' classes against its source's factorised
# covariance until the degrees of freedom of the tasks changed since the last full solve exceed
# this fraction of its own (with 1,000 similar tasks: about 20 added or removed tasks).
STALE_FRACTION = 0.02

PatchedLogits = Callable[[str, torch.Tensor], torch.Tensor]
# Base features [n, d] of the inputs, or task name -> its own view of them: tasks trained at
# different input sizes compare an input by its features at each task's size.
Features = torch.Tensor | Mapping[str, torch.Tensor]


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
        stale_fraction: float = STALE_FRACTION,
    ) -> None:
        if not (shrinkage == "oas" or (isinstance(shrinkage, float | int) and 0 <= shrinkage <= 1)):
            raise ValueError(f"shrinkage must be 'oas' or a float in [0, 1], got {shrinkage!r}")
        if reduce not in ("logsumexp", "max"):
            raise ValueError(f"reduce must be 'logsumexp' or 'max', got {reduce!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if not (isinstance(stale_fraction, float | int) and 0 <= stale_fraction <= 1):
            raise ValueError(f"stale_fraction must be a float in [0, 1], got {stale_fraction!r}")
        self.shrinkage, self.reduce, self.top_k = shrinkage, reduce, top_k
        self.discriminant_weight = float(discriminant_weight)
        self.cosine_scale = float(cosine_scale)  # softmax scale of cosine scores (confidence)
        self.stale_fraction = float(stale_fraction)  # see derive()
        self._pool = PooledScatter()
        self._cache: ClassTable | None = None
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
        additions and removals accumulate) and, on next use, every class row against it (also
        what makes a stale derived router exact again)."""
        self._pool.rebuild()
        self._cache = None

    def derive(
        self,
        add: Mapping[str, RouteStats] | None = None,
        remove: Iterable[str] = (),
        *,
        exact: bool = False,
    ) -> TaskRouter:
        """A new router over this one's tasks without ``remove`` and with ``add`` (new tasks or
        replaced statistics), same settings; ``self`` is left as it was. The pooled sum is this
        one's plus or minus the changed tasks' terms (``O(k d^2)`` each with compact statistics;
        no task is re-read). If this router has solved its class rows and any task is compact,
        the new one reuses its factorised covariance and unchanged rows and solves only the
        added tasks' classes (stale: see :mod:`taps_cl.routing.classtable`) until the changed
        degrees of freedom since the last full solve exceed ``stale_fraction`` of the total;
        ``exact=True`` (or ``stale_fraction=0``) solves every row again on first use."""
        out = TaskRouter(
            shrinkage=self.shrinkage,
            reduce=self.reduce,
            top_k=self.top_k,
            discriminant_weight=self.discriminant_weight,
            cosine_scale=self.cosine_scale,
            stale_fraction=self.stale_fraction,
        )
        out._pool = self._pool.copy()
        remove = list(remove)
        for name in remove:
            out.remove(name)
        for name, value in (add or {}).items():
            out.add(name, value)
        if self._cache is not None and out.tasks and not exact:
            changed = {*remove, *(add or {})}
            drift = sum(self._pool.dof(n) for n in changed if n in self)
            drift += sum(out._pool.dof(n) for n in add or {})
            limit = self.stale_fraction * out._pool.dof()
            stats = {n: out.stats(n) for n in out.tasks}
            out._cache = self._cache.derived(stats, changed, drift, limit)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the router holds: statistics, pooled sum and class table."""
        held = sum(s.nbytes for s in self._pool.values()) + self._pool.nbytes
        return held + (self._cache.nbytes if self._cache is not None else 0)

    # -- cached projection -------------------------------------------------------------------

    def pooled_covariance(self) -> tuple[torch.Tensor, int]:
        """(``Sigma = sum_t S_t / (N - C)`` over every task, ``N - C``), float64, unshrunk.

        Each task adds its own term (exact or compact scatter, see :mod:`taps_cl.routing.pool`)."""
        _require_tasks(self)
        total = self._pool.total()
        dof = self._pool.dof()
        if dof <= 0:
            seen = sum(s.seen_classes for s in self._pool.values())
            raise ValueError(
                f"the tasks' statistics hold {dof + seen} samples for {seen} classes; "
                "the discriminant needs more samples than classes"
            )
        return total / dof, dof

    def _table(self) -> ClassTable:
        if self._cache is None:
            _require_tasks(self)
            self._cache = ClassTable({name: self._pool.stats(name) for name in self.tasks})
        return self._cache

    @property
    def shrinkage_value(self) -> float:
        """The shrinkage ``a`` in use (OAS estimate or the fixed value; a stale router's is the
        one of its last full solve)."""
        return self._table().factor(self.pooled_covariance, self.shrinkage).alpha

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
                    checked[id(view)] = checked_features(view, self.dim)
                views[name] = checked[id(view)]
            if len({v.shape[0] for v in views.values()}) != 1:
                raise ValueError("every task's features must have one row per input")
            return views
        return checked_features(features, self.dim)

    def class_scores(self, features: Features, method: str = "lda") -> torch.Tensor:
        """Scores ``[n, K]`` of every seen class of every task (``"lda"`` or ``"ncm"``); with
        features per task, each task's classes are scored on that task's view."""
        z = self._check(features)
        if isinstance(z, dict):
            return _view_scores(self, z, method)
        if method == "lda":
            return self._table().lda_scores(z, self.pooled_covariance, self.shrinkage)
        if method == "ncm":
            return torch.nn.functional.normalize(z, dim=1) @ self._table().unit_means().T
        raise ValueError(f"class scores exist for 'lda' and 'ncm', not {method!r}")

    def task_scores(self, features: Features, method: str = "lda") -> torch.Tensor:
        """Discriminant (or cosine) task scores ``[n, T]``, columns in :attr:`tasks` order."""
        return _reduce(self, self.class_scores(features, method), method)

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
        scores = _reduce(self, class_scores, method)
        within = _best_class(self._table(), class_scores, scores.argmax(1))
        scale = self.cosine_scale if method == "ncm" else 1.0
        return route_result(self.tasks, scores, within, scale)

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
            scores[idx, tasks.index(name)] = _patch_score(self, name, idx, logits.get(name), post)
        if bool(torch.isinf(scores).all(1).any()):
            raise ValueError("some inputs were shortlisted for no task")
        chosen = scores.argmax(1)
        within = torch.empty(n, dtype=torch.int64)
        for name, idx in shortlist.items():
            mask = chosen[idx] == tasks.index(name)
            within[idx[mask]] = logits[name].detach().cpu()[mask].argmax(1).to(torch.int64)
        return route_result(tasks, scores, within, 1.0)


def _patch_score(
    router: TaskRouter,
    name: str,
    idx: torch.Tensor,
    logits: torch.Tensor | None,
    post: torch.Tensor | None,
) -> torch.Tensor:
    """Calibrated energy of ``name``'s patch on ``idx`` (plus the weighted log-posterior)."""
    stats = router.stats(name)
    if stats.calibration is None:
        raise ValueError(f"task {name!r} has no calibration; collect it with its statistics")
    expect = (len(idx), int(stats.num_classes))
    if logits is None or tuple(logits.shape) != expect:
        got = None if logits is None else tuple(logits.shape)
        raise ValueError(f"patched logits of {name!r} must have shape {expect}, got {got}")
    score = stats.calibration.score(logits.detach().to("cpu"))
    if post is not None:
        score = score + router.discriminant_weight * post[idx, router.tasks.index(name)]
    return score


def _reduce(router: TaskRouter, scores: torch.Tensor, method: str) -> torch.Tensor:
    """Class scores ``[n, K]`` -> task scores ``[n, T]`` (logsumexp or max over each task)."""
    n, num_tasks = scores.shape[0], len(router.tasks)
    out = torch.full((n, num_tasks), -math.inf, dtype=torch.float64)
    index = router._table().task_of.expand(n, -1)
    if router.reduce == "max" or method == "ncm":
        return out.scatter_reduce(1, index, scores, "amax")
    peak = out.scatter_reduce(1, index, scores, "amax")
    summed = torch.zeros_like(out).scatter_add(1, index, (scores - peak.gather(1, index)).exp())
    return peak + summed.log()


def _rows(z: torch.Tensor | dict[str, torch.Tensor]) -> int:
    return next(iter(z.values())).shape[0] if isinstance(z, dict) else z.shape[0]


def _best_class(
    table: ClassTable, class_scores: torch.Tensor, chosen: torch.Tensor
) -> torch.Tensor:
    """The best class of each input within its chosen task (columns of other tasks masked)."""
    masked = class_scores.masked_fill(table.task_of[None, :] != chosen[:, None], -math.inf)
    return table.class_of[masked.argmax(1)]


def _require_tasks(router: TaskRouter) -> None:
    if not router.tasks:
        raise ValueError("the router has no tasks with route statistics; add some first")


def _view_scores(router: TaskRouter, views: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    """Class scores with each task's columns taken from that task's own view of the inputs
    (one scoring per distinct view; one masked copy per further view, not per task)."""
    groups: dict[int, list[int]] = {}
    for t, name in enumerate(router.tasks):
        groups.setdefault(id(views[name]), []).append(t)
    firsts = [router.tasks[ts[0]] for ts in groups.values()]
    out = router.class_scores(views[firsts[0]], method)
    task_of = router._table().task_of
    for first, tasks in zip(firsts[1:], list(groups.values())[1:], strict=True):
        cols = torch.isin(task_of, torch.tensor(tasks, dtype=torch.int64))
        out[:, cols] = router.class_scores(views[first], method)[:, cols]
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
