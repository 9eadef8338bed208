"""Task-free serving: route each input to the stored task (and class) whose data it looks like.

The engine-level side of :mod:`taps_cl.routing`. Per call: the task list (cached by the
server for ``version_ttl`` seconds); inputs preprocessed once per distinct trained input
size; one forward of the plain base feature extractor per size; the router's scores; then each
chosen (or, for ``"combined"``, shortlisted) task's merged module runs ONCE on its inputs.
The router (and its cached inverse covariance) is built once per set of routable task
versions and reused.

Statistics are taken at training time (:func:`route_stats`) from the task's training data: base
features per class (no task active) and the finalised patch's energy on the same batches.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from taps_cl.bases import Preprocessing, version_preprocessing
from taps_cl.batching import make_loader
from taps_cl.config import TrainConfig
from taps_cl.data import preprocess
from taps_cl.errors import UnknownTaskError
from taps_cl.routing import METHODS, RouteResult, RouteStats, TaskRouter
from taps_cl.routing.features import collect_route_stats
from taps_cl.runtime import Runtime
from taps_cl.taps.model import TAPSModel

__all__ = ["DEFAULT_METHOD", "Routed", "TaskRouting", "route_stats"]

# Measured on the offline suite (benchmarks/routing.py, results/routing.json): see docs.
DEFAULT_METHOD = "lda"
_CHUNK = 256  # inputs per forward
_CACHED_ROUTERS = 4  # routers kept (one per candidate set: all tasks, or a ``tasks=`` subset)


@dataclass(frozen=True)
class Routed:
    """Per input: the task it was routed to, the class within that task, and a confidence."""

    tasks: list[str]  # chosen task per input
    labels: torch.Tensor  # int64 [n]: class index within the chosen task (its patch's argmax)
    class_names: list[str | None]  # that class's name, if the task has class names
    confidence: torch.Tensor  # float64 [n]: P(task) from the router x P(class) from the patch
    versions: dict[str, int]  # candidate task -> version that served it

    def __len__(self) -> int:
        return len(self.tasks)


@dataclass(frozen=True)
class _Candidates:
    router: TaskRouter
    preps: dict[str, Preprocessing]  # task -> its version's preprocessing (and input size)
    class_names: dict[str, list[str] | None]
    versions: dict[str, int]


@torch.no_grad()
def route_stats(
    model: TAPSModel, names: Sequence[str], data: Mapping[str, Any], train: TrainConfig
) -> dict[str, RouteStats]:
    """Route statistics of each finalised task of ``model`` from its (preprocessed) training
    data: one pass per task, two forwards per batch (no task: base features; the task: its
    calibration), eval mode, no grad."""
    config = TrainConfig.from_dict({**train.to_dict(), "batch_size": max(train.batch_size, 64)})
    runtime = Runtime.of(config)
    was_training = model.training
    model.eval()
    try:
        out = {}
        for name in names:
            batches = _on_device(make_loader(data[name], config, runtime), runtime)
            out[name] = collect_route_stats(model, batches, name)
        return out
    finally:
        model.train(was_training)


def _on_device(loader: Iterable, runtime: Runtime) -> Iterable:
    for x, y in loader:
        yield runtime.to_device(x), y


class TaskRouting:
    """Routing over an engine's stored tasks (kept by its :class:`~taps_cl.serving.TaskServer`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._routers: OrderedDict[tuple, _Candidates] = OrderedDict()
        self._lock = threading.Lock()  # serving threads share the cache

    def clear(self) -> None:
        with self._lock:
            self._routers.clear()

    def candidates(self, tasks: Sequence[str] | None) -> _Candidates:
        """The router over the routable current versions (restricted to ``tasks``), cached
        by the tuple of (name, version) so any new or changed version rebuilds it."""
        records = self.engine.server.task_records()  # cached (see taps_cl.serving)
        if tasks is not None:
            if isinstance(tasks, str):
                tasks = [tasks]
            unknown = sorted(set(tasks) - set(records))
            if unknown:
                raise UnknownTaskError(
                    f"no task {unknown[0]!r} in {self.engine.store.url}; "
                    f"known: {sorted(records) or 'none'}"
                )
            plain = sorted(n for n in set(tasks) if not records[n].routable)
            if plain:
                raise ValueError(_not_routable(plain))
            records = {n: records[n] for n in set(tasks)}
        chosen = sorted((n, r.current_version) for n, r in records.items() if r.routable)
        if not chosen:
            raise ValueError(_not_routable(sorted(records)) if records else _no_tasks(self.engine))
        key = tuple(chosen)
        with self._lock:
            cand = self._routers.get(key)
            if cand is None:
                cand = self._routers[key] = self._build(chosen, records)
                while len(self._routers) > _CACHED_ROUTERS:
                    self._routers.popitem(last=False)
            self._routers.move_to_end(key)
            return cand

    def _build(self, chosen: list[tuple[str, int]], records: dict) -> _Candidates:
        store, fp = self.engine.store, self.engine.fingerprint
        stats, preps = {}, {}
        for name, version in chosen:
            stats[name] = store.route_stats(name, version, base=fp)
            config = next(v.config for v in store.versions(name, base=fp) if v.version == version)
            preps[name] = version_preprocessing(config, self.engine.base.preprocessing)
        return _Candidates(
            TaskRouter(stats),
            preps,
            {n: records[n].class_names for n, _ in chosen},
            dict(chosen),
        )

    @torch.no_grad()
    def route(self, inputs: Any, tasks: Sequence[str] | None, method: str | None) -> Routed:
        method = method or DEFAULT_METHOD
        if method not in METHODS:
            raise ValueError(f"unknown routing method {method!r}; methods: {METHODS}")
        if (
            getattr(inputs, "ndim", 0) == 4
            and inputs.shape[0] == 0
            or (isinstance(inputs, list | tuple) and not inputs)
        ):
            raise ValueError("no inputs to route (got 0 images)")
        cand = self.candidates(tasks)
        server = self.engine.server
        views_of = {_key(p): p for p in cand.preps.values()}  # one pass per distinct view
        x = {k: preprocess(inputs, p, p.input_size) for k, p in views_of.items()}
        feats = {k: server.features(xs) for k, xs in x.items()}
        views = {name: feats[_key(p)] for name, p in cand.preps.items()}
        logits: dict[str, torch.Tensor] = {}

        def patched(name: str, idx: torch.Tensor) -> torch.Tensor:
            entry = server.served(name, cand.versions[name])
            logits[name] = server.logits(entry, x[_key(cand.preps[name])][idx])
            return logits[name]

        result = cand.router.route(views, method, patched if method in ("energy", "combined")
                                   else None)  # fmt: skip
        return self._finish(result, cand, patched, logits, method)

    def _finish(self, result: RouteResult, cand, patched, logits, method) -> Routed:
        n = result.task_index.shape[0]
        labels = torch.empty(n, dtype=torch.int64)
        prob = torch.empty(n, dtype=torch.float64)
        for name, idx in result.groups().items():
            if method in ("lda", "ncm"):
                out = patched(name, idx)  # the chosen patch, once, on its group
            else:  # the patch already ran on every input it shortlisted (which hold idx)
                pos = _positions(self._shortlist(result, name), idx)
                out = logits[name][pos]
            p = torch.softmax(out.to(torch.float64), 1)
            labels[idx] = p.argmax(1)
            prob[idx] = p.max(1).values
        task_names = result.task_names
        names = [
            (cand.class_names[t][int(k)] if cand.class_names[t] else None)
            for t, k in zip(task_names, labels.tolist(), strict=True)
        ]
        return Routed(task_names, labels, names, result.confidence * prob, dict(cand.versions))

    @staticmethod
    def _shortlist(result: RouteResult, name: str) -> torch.Tensor:
        # the inputs a task was evaluated on are those with a finite score in its column
        return torch.isfinite(result.scores[:, result.tasks.index(name)]).nonzero().flatten()


def _positions(evaluated: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Positions of ``idx`` within the sorted index tensor ``evaluated``."""
    return torch.searchsorted(evaluated, idx)


def _not_routable(names: list[str]) -> str:
    return (
        f"task(s) {names} have no route statistics (trained before routing existed); add them "
        "with `taps-cl route-stats NAME --data SPEC` or Engine.add_route_stats(name, dataset)"
    )


def _no_tasks(engine: Any) -> str:
    return f"no tasks to route to in {engine.store.url}; train one with add_task first"


def _key(prep: Preprocessing) -> tuple:
    """Versions with equal preprocessing share one preprocessed view and one base forward."""
    return dataclasses.astuple(prep)
