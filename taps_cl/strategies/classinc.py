"""Class-incremental TAPS: each experience is a new task, evaluation routes over the tasks.

In a class-incremental benchmark (``nc_benchmark(..., task_labels=False)``, ``SplitMNIST``) every
experience carries task label 0 and its own slice of one global class space. TAPS then learns
one task per experience (``exp0``, ``exp1``, ...) whose head covers that experience's classes,
global class ids mapped to the head's indices ``0..k-1``. While a task trains, the route
statistics of :mod:`taps_cl.routing` are accumulated on its training data; afterwards a
:class:`~taps_cl.routing.TaskRouter` over every trained task decides, per input, which
patch answers. The model's output is then logits over the global class space: the routed task's
logits at its global ids, ``PAD_LOGIT`` everywhere else, which is what Avalanche's metrics expect.
With ``"lda"``/``"ncm"`` every row runs through its routed task in ONE mixed-task forward
(:class:`~taps_cl.taps.mixed.MixedTaskModel`: the base once, each task's delta, norms and head on
its rows; equal to each task's own forward to float rounding); ``"energy"``/``"combined"`` reuse
the logits of the patches they shortlisted.

What is accumulated, and when (last training epoch of the experience, one extra no-gradient
forward per minibatch):

- base features of the training minibatch (frozen base, eval mode: no dropout, base norms), with
  the minibatch's global labels mapped to the task's local ones: class counts, means, scatter;
- calibration (energy of the task's own logits) from the logits of that same training forward,
  i.e. the patch in training mode just before it is finalised. Only the ``"energy"`` and
  ``"combined"`` methods read it; the default ``"lda"`` does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from taps_cl.errors import UnknownTaskError
from taps_cl.routing import (
    CalibrationAccumulator,
    RouteResult,
    RouteStats,
    RouteStatsAccumulator,
    TaskRouter,
    base_features,
)
from taps_cl.strategies.experiences import PAD_LOGIT
from taps_cl.taps.mixed import MixedTaskModel
from taps_cl.taps.model import TAPSModel

MODES = ("auto", "task", "class")


class ClassIncremental:
    """Per-task global class ids, route statistics and the task router of a class-incremental
    TAPS model. ``method`` is a :meth:`TaskRouter.route` method; ``router_kw`` go to it."""

    def __init__(self, method: str = "lda", **router_kw: Any) -> None:
        self.method = method
        self.router = TaskRouter(**router_kw)
        self.classes: dict[str, torch.Tensor] = {}  # task -> its global class ids, sorted
        self.width = 0  # size of the global class space seen so far
        self._stats: RouteStatsAccumulator | None = None
        self._calib: CalibrationAccumulator | None = None
        self.last_route: RouteResult | None = None  # routing of the latest routed forward
        self._mixed: tuple[tuple, MixedTaskModel] | None = None  # (tasks, device), model

    # -- tasks -------------------------------------------------------------------------------

    def begin(self, name: str, classes: Iterable[int]) -> None:
        """Start task ``name`` owning the global ``classes`` (its head index i = i-th class)."""
        ids = torch.tensor(sorted({int(c) for c in classes}), dtype=torch.int64)
        if ids.numel() == 0 or int(ids.min()) < 0:
            raise ValueError(f"task {name!r} needs non-negative class ids, got {ids.tolist()}")
        self.classes[name] = ids
        self.see(ids.tolist())
        self._stats, self._calib = RouteStatsAccumulator(len(ids)), CalibrationAccumulator()

    def see(self, classes: Iterable[int]) -> None:
        """Widen the global output to cover ``classes`` (e.g. of an experience to evaluate)."""
        self.width = max([self.width, *(int(c) + 1 for c in classes)])

    def local_targets(self, name: str, target: torch.Tensor) -> torch.Tensor:
        """Global class ids -> the task's head indices; ``ValueError`` for a foreign class."""
        ids = self.classes[name].to(target.device)
        match = target.long()[:, None] == ids[None, :]
        if not bool(match.any(1).all()):
            foreign = sorted(set(target[~match.any(1)].tolist()))
            raise ValueError(f"classes {foreign} are not among task {name!r}'s {ids.tolist()}")
        return match.long().argmax(1)

    def task_view(self, name: str, output: torch.Tensor, target: torch.Tensor) -> tuple:
        """(the task's own columns of a global output, local targets): the training loss."""
        return output[:, self.classes[name].to(output.device)], self.local_targets(name, target)

    def observe(self, taps: TAPSModel, name: str, x: torch.Tensor, y: torch.Tensor, out) -> None:
        """Accumulate one training minibatch: base features (eval mode) and the task's logits."""
        was_training = taps.training
        taps.train(False)  # no dropout / drop-path in the base features
        try:
            features = base_features(taps, x)
        finally:
            taps.train(was_training)
        self._stats.update(features, self.local_targets(name, y))
        own, _ = self.task_view(name, out.detach(), y)
        if own.shape[0]:
            self._calib.update(own.float())

    def finish(self, name: str) -> RouteStats:
        """The task's route statistics (compact); the router now routes to it too."""
        if self._stats is None or int(self._stats.count.sum()) == 0:
            raise ValueError(f"no route statistics were accumulated for task {name!r}")
        calib = self._calib.result() if self._calib.count >= 2 else None
        stats = self._stats.result(calib).compress()  # the compact form a store keeps
        self.router.add(name, stats)
        self._stats = self._calib = None
        return stats

    # -- forward -----------------------------------------------------------------------------

    def expand(self, name: str, logits: torch.Tensor, out: torch.Tensor | None = None) -> Any:
        """Put a task's logits at its global class ids of a ``PAD_LOGIT``-filled output."""
        if out is None:
            out = logits.new_full((logits.shape[0], self.width), PAD_LOGIT)
        out[:, self.classes[name].to(out.device)] = logits.to(out.dtype)
        return out

    def route(self, taps: TAPSModel, x: torch.Tensor, cache: dict | None = None) -> RouteResult:
        """Route every input of ``x`` to a trained task (one base forward, plus the shortlisted
        patches for ``"energy"``/``"combined"``, their logits kept in ``cache``)."""
        if not self.router.tasks:
            raise UnknownTaskError(
                "no experience has been trained yet: class-incremental TAPS routes among trained "
                "tasks, so train at least one experience before evaluating"
            )
        cache = {} if cache is None else cache

        def patched(task: str, idx: torch.Tensor) -> torch.Tensor:
            logits = taps(x[idx.to(x.device)], task=task)
            full = cache.setdefault(task, logits.new_full((x.shape[0], logits.shape[1]), 0.0))
            full[idx.to(full.device)] = logits
            return logits

        return self.router.route(base_features(taps, x), self.method, patched_logits=patched)

    def forward(self, taps: TAPSModel, x: torch.Tensor, training_task: str | None) -> Any:
        """Global-class logits: the trained task's own (training), else the routed task's."""
        if training_task is not None:
            return self.expand(training_task, taps(x, task=training_task))
        cache: dict[str, torch.Tensor] = {}
        result = self.route(taps, x, cache)
        self.last_route = result
        mixed = None if cache else self._mixed_model(taps, x.device)
        if mixed is not None:  # every row through its routed task in ONE forward
            return self._spread(result, mixed(x, result.task_names))
        out: torch.Tensor | None = None
        for name, idx in result.groups().items():
            idx = idx.to(x.device)
            logits = cache[name][idx] if name in cache else taps(x[idx], task=name)
            if out is None:
                out = logits.new_full((x.shape[0], self.width), PAD_LOGIT)
            out[idx[:, None], self.classes[name].to(x.device)[None, :]] = logits.to(out.dtype)
        return out

    def _mixed_model(self, taps: TAPSModel, device: torch.device) -> MixedTaskModel | None:
        """The mixed-task model over the routed (frozen) tasks, kept while they and the
        device stay the same; None if a task is still training (each task then runs alone)."""
        key = (tuple(self.router.tasks), str(device))
        if self._mixed is None or self._mixed[0] != key:
            if not all(taps.is_frozen(t) for t in key[0]):
                return None
            self._mixed = (key, MixedTaskModel(taps, key[0]))
        return self._mixed[1]

    def _spread(self, result: RouteResult, logits: torch.Tensor) -> torch.Tensor:
        """Padded mixed logits (row i: its routed task's classes first) at global class ids."""
        out = logits.new_full((logits.shape[0], self.width), PAD_LOGIT)
        for name, idx in result.groups().items():
            idx, ids = idx.to(out.device), self.classes[name].to(out.device)
            out[idx[:, None], ids[None, :]] = logits[idx][:, : len(ids)]
        return out


class RouteStatsPlugin(SupervisedPlugin):
    """Feeds the last training epoch's minibatches of a class-incremental task to its
    :class:`ClassIncremental` statistics (a no-op in task-incremental mode)."""

    def __init__(self, router: Any) -> None:
        super().__init__()
        self.router = router  # the strategy's TAPSRouter

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        ci, task = self.router.classinc, self.router.training_task
        if ci is None or task is None:
            return
        if strategy.clock.train_exp_epochs != strategy.train_epochs - 1:
            return
        ci.observe(self.router.taps, task, strategy.mb_x, strategy.mb_y, strategy.mb_output)
