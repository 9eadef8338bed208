"""Serving stored tasks: one frozen base in memory, tasks loaded from the store on demand.

A :class:`TaskServer` is built from what it uses: the base's fingerprint and preprocessing, a
store (:class:`~taps_cl.storage.TaskStoreAPI`), a device and a factory for the TAPS model that
patches are checked and folded against. It owns task-free routing over the same tasks
(:attr:`TaskServer.routing`, :meth:`TaskServer.route`).

Thread safety: every loaded task version is served by its own plain merged module
(:func:`~taps_cl.taps.merge.merge_patch`: the task's deltas folded into the weights, every other
tensor shared with the frozen base), so no forward reads or writes an "active task": any number
of threads may call ``predict``/``route`` at once. Loads are serialised by one lock with a
double-checked cache (concurrent first loads of a task load it once; a load that raises leaves
the cache as it was). Loaded versions are kept in an LRU of ``max_loaded`` entries.

Routing (``"lda"``/``"ncm"``) and ``predict`` with a task per input do not use the merged
modules: their rows run in one mixed-task forward (:class:`~taps_cl.serving.mixed.MixedForwards`,
its own LRU of at most ``max_loaded`` versions, same locking rule), agreeing with the merged
modules to float rounding (``tests/test_mixed.py`` states the tolerance).

Staleness rule: committed versions are immutable, so a loaded ``(task, version)`` never goes
stale. Which version is *current* is cached per server for ``version_ttl`` seconds: a version
committed (or a task deleted) by another process becomes the default within ``version_ttl``
seconds, or at once after ``refresh()``; writes through the engine that owns it (add_task, import,
remove_task, add_route_stats) invalidate the cache immediately. An unknown task name is always
looked up in the store before ``UnknownTaskError`` is raised.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from taps_cl.bases import Preprocessing, version_preprocessing
from taps_cl.config import TrainConfig
from taps_cl.data import prepare, preprocess
from taps_cl.errors import BaseMismatchError, UnknownTaskError
from taps_cl.routing import base_feature_extractor
from taps_cl.serving.mixed import MixedForwards
from taps_cl.serving.route import Routed, TaskRouting
from taps_cl.storage import StoredTask, TaskStoreAPI
from taps_cl.taps.merge import merge_patch
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch, validate_task_name
from taps_cl.taps.prefix import Resume, recordable
from taps_cl.training.loop import evaluate

_CHUNK = 256  # inputs per forward


@dataclass(frozen=True)
class Served:
    """One loaded task version: its merged module and what serving it needs."""

    name: str
    version: int
    module: nn.Module  # plain, eval, frozen; shares unchanged tensors with the base
    image_size: int  # input side the version was trained at
    preprocessing: Preprocessing  # what the version was trained with (at image_size)
    num_classes: int
    class_names: list[str] | None


class TaskServer:
    """Stored tasks of one base served from ``store`` on ``device`` (see the module docstring).

    ``new_model()`` builds the (task-free) TAPS model of the base, once, on first use;
    ``preprocessing`` is the base's, used for versions that did not record their own.
    """

    def __init__(
        self,
        *,
        fingerprint: str,
        preprocessing: Preprocessing,
        store: TaskStoreAPI,
        device: torch.device,
        new_model: Callable[[], TAPSModel],
        max_loaded: int = 8,
        version_ttl: float = 2.0,
    ) -> None:
        if not isinstance(max_loaded, int) or isinstance(max_loaded, bool) or max_loaded < 1:
            raise ValueError(f"max_loaded must be an int >= 1, got {max_loaded!r}")
        if not isinstance(version_ttl, (int, float)) or version_ttl < 0:
            raise ValueError(f"version_ttl must be a number of seconds >= 0, got {version_ttl!r}")
        self.fingerprint = fingerprint
        self.preprocessing = preprocessing
        self.store = store
        self.device = device
        self._new_model = new_model
        self.max_loaded = max_loaded
        self.version_ttl = float(version_ttl)
        self._model: TAPSModel | None = None  # the loader: holds no task between loads
        self._features: nn.Module | None = None
        self._served: OrderedDict[tuple[str, int], Served] = OrderedDict()
        self._records: tuple[float, dict[str, StoredTask]] | None = None  # (time read, records)
        self._lock = threading.Lock()  # guards _served and _records (short, no I/O)
        self._load_lock = threading.RLock()  # serialises loads and every use of the loader
        self.routing = TaskRouting(self)  # task-free routing over the same tasks
        # Rows of many versions in one forward (routing, per-row predict): a holder of its own,
        # at most max_loaded versions (see taps_cl.serving.mixed).
        self.mixed = MixedForwards(
            new_model=new_model,
            load_patch=self.load_patch,
            base_preprocessing=preprocessing,
            device=device,
            max_loaded=lambda: self.max_loaded,
        )

    @property
    def model(self) -> TAPSModel:
        """The TAPS model patches are checked and folded against (no task loaded; not used by
        the serving forwards, which never share it)."""
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._new_model().to(self.device).eval()
        return self._model

    # -- versions ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the cached current versions (the next call reads them from the store)."""
        with self._lock:
            self._records = None

    def unload(self, name: str) -> None:
        """Drop every loaded version of ``name`` and the cached current versions."""
        with self._lock:
            for key in [k for k in self._served if k[0] == name]:
                del self._served[key]
            self._records = None
        self.mixed.forget(name)

    def task_records(self, *, fresh: bool = False) -> dict[str, StoredTask]:
        """Name -> store record of this base's tasks, at most ``version_ttl`` seconds old."""
        now = time.monotonic()
        with self._lock:
            cached = self._records
        if fresh or cached is None or now - cached[0] > self.version_ttl:
            records = {r.name: r for r in self.store.list_tasks(base=self.fingerprint)}
            with self._lock:
                self._records = cached = (now, records)
        return cached[1]

    def current_version(self, name: str) -> int:
        validate_task_name(name)
        record = self.task_records().get(name) or self.task_records(fresh=True).get(name)
        if record is None:
            known = sorted(self.task_records())
            raise UnknownTaskError(
                f"no task {name!r} in {self.store.url}; known: {known or 'none'}"
            )
        return record.current_version

    # -- loading ----------------------------------------------------------------------------

    def load_patch(self, name: str, version: int | None = None) -> TaskPatch:
        """The stored patch (verified against its sha256s and this server's base)."""
        fp = self.fingerprint
        patch = self.store.load(name, version, base=fp)
        if patch.base_fingerprint != fp:
            raise BaseMismatchError(f"task {name!r} belongs to another base")
        return patch

    def served(self, name: str, version: int | None = None) -> Served:
        """Task ``name`` at ``version`` (default: current), loaded if it is not yet."""
        key = (name, version or self.current_version(name))
        with self._lock:
            entry = self._served.get(key)
            if entry is not None:
                self._served.move_to_end(key)
                return entry
        with self._load_lock:
            with self._lock:
                entry = self._served.get(key)  # loaded by another thread while we waited
            if entry is None:
                entry = self._load(*key)  # raises: nothing cached, nothing half-loaded
            with self._lock:
                self._served[key] = entry
                self._served.move_to_end(key)
                while len(self._served) > self.max_loaded:
                    self._served.popitem(last=False)
            return entry

    def _load(self, name: str, version: int) -> Served:
        patch = self.load_patch(name, version)
        module = merge_patch(self.model, patch, consume=True)  # the patch is ours alone
        prep = version_preprocessing(patch.config, self.preprocessing)
        return Served(
            name, version, module, prep.input_size, prep, patch.num_classes, patch.class_names
        )

    def loaded(self) -> list[tuple[str, int]]:
        """The loaded (task, version) pairs, least recently used first."""
        with self._lock:
            return list(self._served)

    @contextlib.contextmanager
    def task_model(self, name: str, version: int) -> Iterator[TAPSModel]:
        """The loader model with the task loaded (for what needs a TAPSModel, e.g. route
        statistics); holds the load lock, so keep it short. Serving is not blocked."""
        with self._load_lock:
            model = self.model
            model.load_patch(self.load_patch(name, version))
            try:
                yield model
            finally:
                model.remove_task(name)

    # -- forwards ---------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, entry: Served, x: torch.Tensor) -> torch.Tensor:
        """The task's logits for preprocessed ``x`` (CPU, float32)."""
        return self._run(entry.module, x)

    def task_logits(self, name: str, version: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of task ``name`` at ``version`` for preprocessed ``x`` (CPU, float32)."""
        return self.logits(self.served(name, version), x)

    def mixed_logits(
        self,
        keys: Sequence[tuple[str, int]],
        x: torch.Tensor,
        rows: torch.Tensor,
        resume: Resume | None = None,
    ) -> torch.Tensor:
        """Row ``i`` of preprocessed ``x`` through version ``keys[rows[i]]``, all rows in one
        mixed forward: logits padded with ``-inf`` to the widest head (CPU, float32).
        ``resume``: the routing pass ``x`` came from (see :mod:`taps_cl.taps.prefix`)."""
        return self.mixed.logits(keys, x, rows, resume=resume)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Base features (the classifier's input, no task) of preprocessed ``x``."""
        if self._features is None:
            with self._load_lock:
                if self._features is None:
                    # over the mixed forwards' base (the same tensors) and recordable: a
                    # routed batch's mixed forward may resume from this pass
                    self._features = recordable(base_feature_extractor(self.mixed.holder()))
        return self._run(self._features, x)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        device = self.device
        outs = [module(c.to(device)).float().cpu() for c in x.split(_CHUNK)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def predict(
        self, name: str | Sequence[str], inputs: Any, version: int | None = None
    ) -> torch.Tensor:
        """Logits of task ``name`` for raw ``inputs`` (CPU, float32). ``name`` may also name
        a task per input (current versions): then one mixed forward, logits padded with
        ``-inf`` to the widest head."""
        if isinstance(name, str):
            entry = self.served(name, version)
            return self.logits(entry, preprocess(inputs, entry.preprocessing, entry.image_size))
        names = row_names(name)
        if version is not None:
            raise ValueError("version= applies to one task; a task per row uses current versions")
        current = {n: self.current_version(n) for n in dict.fromkeys(names)}  # unknown: now
        return self.mixed.predict([(n, current[n]) for n in names], inputs)

    def evaluate(self, name: str, dataset: Any, version: int | None = None) -> dict[str, float]:
        entry = self.served(name, version)
        data = prepare(
            dataset,
            preprocessing=entry.preprocessing,
            image_size=entry.image_size,
            num_classes=entry.num_classes,
        )
        config = TrainConfig(device=str(self.device))
        return evaluate(_AnyTask(entry.module), name, data, config)

    def merged(self, name: str, version: int | None = None) -> nn.Module:
        """An independent copy of the served module (the caller may modify it)."""
        return copy.deepcopy(self.served(name, version).module)

    def route(
        self, inputs: Any, tasks: list[str] | None = None, method: str | None = None
    ) -> Routed:
        """Task-free prediction over this server's routable tasks (see
        :class:`~taps_cl.serving.route.TaskRouting`)."""
        return self.routing.route(inputs, tasks, method)


def row_names(names: object) -> list[str]:
    """``names`` as a non-empty list of task names (one per input), or a clear error."""
    if not isinstance(names, Sequence) or isinstance(names, (str, bytes)):
        raise TypeError(
            f"name must be a task name or a sequence of them (one per input), got "
            f"{type(names).__name__}"
        )
    names = list(names)
    if not names:
        raise ValueError("a task per input needs at least one input (got no task names)")
    bad = sorted({type(n).__name__ for n in names if not isinstance(n, str)})
    if bad:
        raise TypeError(f"task names per input must be str, got {bad}")
    return names


class _AnyTask(nn.Module):
    """A served module called the way :func:`~taps_cl.training.evaluate` calls a TAPSModel;
    it stays in eval mode whatever ``train()`` asks (it is shared by serving threads)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        return self.module(x)

    def train(self, mode: bool = True) -> _AnyTask:
        return self
