"""Task-free serving: route each input to the stored task (and class) whose data it looks like.

The server-side of :mod:`taps_cl.routing`, owned by a :class:`~taps_cl.serving.TaskServer`
(``server.route(...)``). Per call: the task list (cached by the server for ``version_ttl``
seconds); inputs preprocessed once per distinct trained input size; one forward of the plain
base feature extractor per size; the router's scores; then ONE mixed-task forward runs every
input through its chosen task (:mod:`taps_cl.serving.mixed`), or, for ``"combined"`` and
``"energy"``, each shortlisted task's merged module runs once on its shortlisted inputs. The
router (and its cached inverse covariance) is built once per set of routable task versions.

Statistics are taken at training time (:func:`taps_cl.training.route_stats.route_stats`) from the
task's training data and stored with the version; routing reads them back from the store.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from taps_cl.bases import Preprocessing, version_preprocessing
from taps_cl.data import preprocess
from taps_cl.errors import UnknownTaskError
from taps_cl.routing import METHODS, PATCHED_METHODS, RouteResult, RouteStats, TaskRouter
from taps_cl.serving.routerdiff import changes, closest, superseded
from taps_cl.storage import BulkRouteStats, StoredTask, TaskStoreAPI
from taps_cl.taps.prefix import Recording, Resume, recording

__all__ = ["DEFAULT_METHOD", "Routed", "RoutingHost", "TaskRouting"]

# Measured on the offline suite (benchmarks/routing.py, results/routing.json): see docs.
DEFAULT_METHOD = "lda"
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


class RoutingHost(Protocol):
    """What routing uses of the server that owns it: the store it serves from, the base's
    fingerprint and preprocessing, the cached task list and two forwards."""

    store: TaskStoreAPI
    fingerprint: str
    preprocessing: Preprocessing

    def task_records(self, *, fresh: bool = False) -> dict[str, StoredTask]: ...

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def task_logits(self, name: str, version: int, x: torch.Tensor) -> torch.Tensor: ...

    def mixed_logits(
        self,
        keys: Sequence[tuple[str, int]],
        x: torch.Tensor,
        rows: torch.Tensor,
        resume: Resume | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Candidates:
    router: TaskRouter
    preps: dict[str, Preprocessing]  # task -> its version's preprocessing (and input size)
    class_names: dict[str, list[str] | None]
    versions: dict[str, int]


class TaskRouting:
    """Routing over the stored tasks a server serves (kept by that server)."""

    def __init__(self, host: RoutingHost) -> None:
        self.host = host
        self._routers: OrderedDict[tuple, _Candidates] = OrderedDict()
        self._lock = threading.Lock()  # serving threads share the cache

    def clear(self) -> None:
        with self._lock:
            self._routers.clear()

    def candidates(self, tasks: Sequence[str] | None) -> _Candidates:
        """The router over the routable current versions (restricted to ``tasks``), cached
        by the tuple of (name, version); a new or changed version derives a new router from
        the closest cached one (see :mod:`taps_cl.serving.routerdiff`), and routers of
        versions that are no longer current leave the cache."""
        records = every = self.host.task_records()  # cached (see taps_cl.serving.server)
        if tasks is not None:
            if isinstance(tasks, str):
                tasks = [tasks]
            unknown = sorted(set(tasks) - set(records))
            if unknown:
                raise UnknownTaskError(
                    f"no task {unknown[0]!r} in {self.host.store.url}; "
                    f"known: {sorted(records) or 'none'}"
                )
            plain = sorted(n for n in set(tasks) if not records[n].routable)
            if plain:
                raise ValueError(_not_routable(plain))
            records = {n: records[n] for n in set(tasks)}
        chosen = sorted((n, r.current_version) for n, r in records.items() if r.routable)
        if not chosen:
            raise ValueError(_not_routable(sorted(records)) if records else _no_tasks(self.host))
        key = tuple(chosen)
        with self._lock:
            cand = self._routers.get(key)
            if cand is None:
                cand = self._routers[key] = self._build(chosen, records)
                for old in [k for k in self._routers if superseded(k, key, tasks, every)]:
                    del self._routers[old]  # never asked again: bounded memory
                while len(self._routers) > _CACHED_ROUTERS:
                    self._routers.popitem(last=False)
            self._routers.move_to_end(key)
            return cand

    def _build(self, chosen: list[tuple[str, int]], records: dict) -> _Candidates:
        """The candidates of ``chosen``: derived from the closest cached router when few tasks
        changed (only the changed versions are read from the store), else built afresh."""
        cached = list(self._routers.values())
        src = closest([c.versions for c in cached], dict(chosen))
        source = cached[src] if src is not None else None
        added, removed = changes(source.versions if source else {}, dict(chosen))
        stats, configs = self._read(added, fresh=source is None)
        preps = {n: version_preprocessing(c, self.host.preprocessing) for n, c in configs.items()}
        if source is not None:
            router = source.router.derive(stats, removed)
            preps = {**{n: p for n, p in source.preps.items() if n not in removed}, **preps}
        else:
            router = TaskRouter(stats)
        return _Candidates(
            router,
            preps,
            {n: records[n].class_names for n, _ in chosen},
            dict(chosen),
        )

    def _read(self, added: dict[str, int], fresh: bool) -> tuple[dict, dict]:
        """(statistics, config) of the ``added`` versions: in bulk for a fresh router where the
        store can (a few queries for every task), else one by one (a derived router's few)."""
        store, fp = self.host.store, self.host.fingerprint
        if fresh and isinstance(store, BulkRouteStats):
            read = store.route_stats_many(added, base=fp)
            return {n: r.stats for n, r in read.items()}, {n: r.config for n, r in read.items()}
        known = self._known_stats()
        stats, configs = {}, {}
        for name, version in added.items():
            stats[name] = known.get((name, version)) or store.route_stats(name, version, base=fp)
            configs[name] = next(
                v.config for v in store.versions(name, base=fp) if v.version == version
            )
        return stats, configs

    def _known_stats(self) -> dict[tuple[str, int], RouteStats]:
        """Statistics of the versions cached routers already hold (a version's statistics never
        change once routable, except through ``add_route_stats``, which clears the cache): a new
        candidate set reads only its new versions from the store. Called under ``self._lock``."""
        cached = list(self._routers.values())
        return {(n, v): c.router.stats(n) for c in cached for n, v in c.versions.items()}

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
        host = self.host
        views_of = {_key(p): p for p in cand.preps.values()}  # one pass per distinct view
        x = {k: preprocess(inputs, p, p.input_size) for k, p in views_of.items()}
        records: dict[tuple, Recording] = {}  # each view's routing pass, for the mixed forward
        feats = {}
        for k, xs in x.items():
            if method in PATCHED_METHODS:
                feats[k] = host.features(xs)
                continue
            with recording() as records[k]:
                feats[k] = host.features(xs)
        views = {name: feats[_key(p)] for name, p in cand.preps.items()}
        logits: dict[str, torch.Tensor] = {}

        def patched(name: str, idx: torch.Tensor) -> torch.Tensor:
            view = x[_key(cand.preps[name])][idx]
            logits[name] = host.task_logits(name, cand.versions[name], view)
            return logits[name]

        if method in PATCHED_METHODS:
            result = cand.router.route(views, method, patched)
            return self._finish(result, cand, self._shortlisted(result, logits))
        result = cand.router.route(views, method, None)
        return self._finish(result, cand, self._mixed(result, cand, x, records))

    def _shortlisted(self, result: RouteResult, logits: dict[str, torch.Tensor]) -> dict:
        """Each chosen task's logits on its rows: the patch already ran on every input it
        shortlisted ("combined"/"energy": a merged forward per shortlisted task)."""
        out = {}
        for name, idx in result.groups().items():
            out[name] = (idx, logits[name][_positions(self._shortlist(result, name), idx)])
        return out

    def _mixed(self, result: RouteResult, cand: _Candidates, x: dict, records: dict) -> dict:
        """The chosen tasks on their rows in ONE mixed-task forward per distinct view (the base
        once, each task's delta, norms and head on its rows), not a merged forward per task.
        It resumes from the view's routing pass where the chosen tasks share a prefix of the
        base (:mod:`taps_cl.taps.prefix`)."""
        groups = result.groups()
        by_view: dict[tuple, list[str]] = {}
        for name in sorted(groups):
            by_view.setdefault(_key(cand.preps[name]), []).append(name)
        out = {}
        for view, names in by_view.items():
            slot = {name: i for i, name in enumerate(names)}
            rows = torch.cat([groups[name] for name in names]).sort().values  # batch order
            slots = torch.tensor([slot[result.task_names[i]] for i in rows.tolist()])
            everything = rows.numel() == x[view].shape[0]
            xs = x[view] if everything else x[view][rows]
            rec = records.get(view)
            more = {}
            if rec is not None and rec.usable() and rec.outputs:  # else: nothing to resume
                more["resume"] = Resume(rec, None if everything else rows)
            keys = [(n, cand.versions[n]) for n in names]
            logits = self.host.mixed_logits(keys, xs, slots, **more)
            for name, i in slot.items():
                mine = slots == i
                out[name] = (rows[mine], logits[mine])
        return out

    def _finish(self, result: RouteResult, cand: _Candidates, chosen: dict) -> Routed:
        """Labels and confidences from each chosen task's logits on its rows (``chosen``: task
        -> (rows, logits; a mixed forward's are padded with ``-inf``, which softmax zeroes))."""
        n = result.task_index.shape[0]
        labels = torch.empty(n, dtype=torch.int64)
        prob = torch.empty(n, dtype=torch.float64)
        for idx, out in chosen.values():
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


def _no_tasks(host: RoutingHost) -> str:
    return f"no tasks to route to in {host.store.url}; train one with add_task first"


@functools.lru_cache(maxsize=256)  # once per distinct preprocessing, not per task and call
def _key(prep: Preprocessing) -> tuple:
    """Versions with equal preprocessing share one preprocessed view and one base forward."""
    return dataclasses.astuple(prep)
