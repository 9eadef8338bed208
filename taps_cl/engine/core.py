"""Engine = one frozen base + a task store (+ optional MLflow tracking): a thin facade.

``add_task(dataset)`` validates the data, trains the task's gates and deltas on a private copy
of the base, evaluates, and commits the pruned patch as a new version. Only then is the task
loaded into the serving model, so a failed or interrupted training changes nothing anywhere.

The engine ties parts together and hands each what it uses: training runs through
:func:`taps_cl.joint.fit_joint` and a :class:`~taps_cl.engine.taskrun.TaskRun` (commit and
tracking); serving and routing through a :class:`~taps_cl.serving.TaskServer` built from the
base's fingerprint and preprocessing, the store and the device (the read-only methods are
:class:`~taps_cl.engine.inference.Inference`); the store is any
:class:`~taps_cl.storage.TaskStoreAPI`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from taps_cl.bases import Base, fingerprint, load_base
from taps_cl.config import JointConfig, TAPSConfig, TrainConfig, environment
from taps_cl.data import TaskData, prepare
from taps_cl.engine.inference import Inference
from taps_cl.engine.taskrun import TaskRecord, TaskRun, prepare_all
from taps_cl.errors import BaseMismatchError, UnknownBaseError
from taps_cl.serving import Routed, TaskRouting, TaskServer
from taps_cl.storage import TaskStoreAPI, VersionRecord, open_store, read_patch_file
from taps_cl.storage.layout import model_layout
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import validate_task_name, validate_version
from taps_cl.training.route_stats import route_stats
from taps_cl.training.runtime import resolve_device, world

__all__ = ["Engine", "Routed", "TaskRecord"]


class Engine(Inference):
    """A frozen base, a versioned task store and (optionally) MLflow tracking, tied together."""

    def __init__(
        self,
        base: str | nn.Module | Base | None = None,
        store: str | os.PathLike | TaskStoreAPI | None = None,
        tracking: str | None = None,
        device: str = "auto",
        *,
        head: str | None = None,
        config: TAPSConfig | None = None,
        train: TrainConfig | None = None,
        experiment: str = "taps_cl",
        max_loaded: int = 8,
        version_ttl: float = 2.0,
    ) -> None:
        """``store``: a URL or path (the SQL ``TaskStore`` opens it; None: the default store)
        or any object implementing :class:`~taps_cl.storage.TaskStoreAPI`. ``max_loaded``:
        task versions kept loaded for serving (least recently used are dropped).
        ``version_ttl``: seconds a task's current version is cached before the store is asked
        again (see :mod:`taps_cl.serving.server` for the staleness rule)."""
        self.base = load_base(base if base is not None else environment().base)
        self.base.module.requires_grad_(False).eval()
        self.fingerprint = fingerprint(self.base.module)
        self.store = open_store(store)
        self.head = head
        self._layout: dict | None = None
        _register_base(self.store, self.base, self.fingerprint, self.patch_layout)
        self.tracking = tracking
        self.experiment = experiment
        self.device = resolve_device(device)
        self.config = config or TAPSConfig()
        self.train_config = train or TrainConfig()
        self.server = TaskServer(
            fingerprint=self.fingerprint,
            preprocessing=self.base.preprocessing,
            store=self.store,
            device=self.device,
            new_model=lambda: self._new_model(self.config),
            max_loaded=max_loaded,
            version_ttl=version_ttl,
        )

    @property
    def routing(self) -> TaskRouting:
        """The server's task-free routing (its router cache)."""
        return self.server.routing

    def patch_layout(self) -> dict:
        """What a patch of this base may hold (tensor names, dtypes, shapes), from a throwaway
        model; the store keeps it so that imported files are checked against the base."""
        if self._layout is None:
            base = copy.deepcopy(self.base.module)
            self._layout = model_layout(TAPSModel(base, TAPSConfig(), head=self.head))
        return self._layout

    # -- inspection -------------------------------------------------------------------------

    @property
    def base_model(self) -> nn.Module:
        """The frozen base ``nn.Module`` (never modified by taps_cl)."""
        return self.base.module

    def tasks(self) -> list:
        """The store's tasks trained on this engine's base (records with ``.name``)."""
        return self.store.list_tasks(base=self.fingerprint)

    def versions(self, name: str) -> list:
        return self.store.versions(name, base=self.fingerprint)

    def __repr__(self) -> str:
        return f"Engine(base={self.base.name!r}, store={self.store.url!r}, device={self.device})"

    # -- training ---------------------------------------------------------------------------

    def prepare(self, dataset: Any, train: TrainConfig, **kw: Any) -> TaskData:
        """Validate ``dataset`` and wrap it with this base's preprocessing at the train size."""
        return prepare(
            dataset,
            preprocessing=self.base.preprocessing,
            image_size=train.image_size,
            **kw,
        )

    def _new_model(self, config: TAPSConfig) -> TAPSModel:
        base = copy.deepcopy(self.base.module)
        return TAPSModel(base, config, head=self.head, base_fingerprint=self.fingerprint)

    def add_task(
        self,
        dataset: Any,
        *,
        name: str | None = None,
        eval_dataset: Any = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        config: TAPSConfig | None = None,
        train: TrainConfig | None = None,
        quiet: bool = False,
    ) -> TaskRecord:
        """Train a task on ``dataset`` and commit it as a new version (never overwrites).

        The data is validated before any training; invalid data raises ``ValueError`` or
        ``TypeError`` and nothing is trained or stored. This is the one-task case of
        :meth:`add_tasks`: the same loop, the same commit, the same record.
        """
        name = validate_task_name(name or _default_name(dataset, self.tasks))
        train = _resolved_train(train, self.train_config, self.device)
        data = self.prepare(dataset, train, num_classes=num_classes, class_names=class_names)
        evals = {}
        if eval_dataset is not None:
            evals[name] = self.prepare(
                eval_dataset, train, num_classes=data.num_classes, class_names=data.class_names
            )
        return self._train_and_commit({name: data}, evals, config, train, quiet=quiet)[0]

    def add_tasks(
        self,
        datasets: dict[str, Any],
        *,
        joint: bool = True,
        train_base: bool = False,
        config: TAPSConfig | None = None,
        train: TrainConfig | None = None,
        eval_datasets: dict[str, Any] | None = None,
        sampling: JointConfig | None = None,
        quiet: bool = False,
    ) -> list[TaskRecord]:
        """Train several tasks (name -> dataset). ``joint=True`` trains them together (see
        :mod:`taps_cl.joint`; ``sampling`` is a ``JointConfig``) and commits them in ONE
        transaction: all become visible or none. ``train_base=True`` also trains the shared
        weights into a NEW base, stored with its own fingerprint (open it with
        :meth:`open_stored_base`); this engine's base and tasks stay untouched. Every dataset
        is validated before anything trains. Under torchrun only rank 0 writes."""
        train = _resolved_train(train, self.train_config, self.device)
        data, evals = prepare_all(
            datasets, eval_datasets, lambda d, **kw: self.prepare(d, train, **kw)
        )
        if not joint:
            if train_base:
                raise ValueError("train_base=True needs joint=True")
            return [
                self._train_and_commit({n: d}, {n: evals[n]} if n in evals else {}, config, train,
                                       quiet=quiet)[0]
                for n, d in data.items()
            ]  # fmt: skip
        return self._train_and_commit(
            data, evals, config, train, sampling=sampling, train_base=train_base, quiet=quiet
        )

    def _train_and_commit(
        self,
        data: dict[str, TaskData],
        evals: dict[str, TaskData],
        config: TAPSConfig | None,
        train: TrainConfig,
        *,
        sampling: JointConfig | None = None,
        train_base: bool = False,
        quiet: bool = False,
    ) -> list[TaskRecord]:
        """Train ``data`` in one run on a private copy of the base, then commit every task in
        one transaction; only then are stale serving copies dropped."""
        from taps_cl.joint import fit_joint, init_distributed

        config = config or self.config
        if not isinstance(config, TAPSConfig):
            raise TypeError(f"config must be a TAPSConfig, got {type(config).__name__}")
        init_distributed()
        model = self._new_model(config)
        for name, d in data.items():
            model.add_task(name, d.num_classes, d.class_names, seed=train.seed)
        fit = fit_joint(
            model, data, train, joint=sampling, train_base=train_base, eval_data=evals, quiet=quiet
        )
        run = TaskRun(
            model, fit, data, evals, base=self.base, config=config, train=train, sampling=sampling
        )
        run.finalize()
        run.commit(self.store)
        for name in data:
            self.server.unload(name)
        if self.tracking and world()[0] == 0:
            run.track(self.tracking, self.experiment)
        return run.records()

    def open_stored_base(self, fingerprint: str) -> Engine:
        """An Engine (same store, tracking, device, configs) on a base whose weights the store
        holds, e.g. the new base of ``add_tasks(train_base=True)``; its architecture and
        preprocessing are this engine's base's."""
        from taps_cl.joint import stored_base

        return Engine(
            stored_base(self.store, fingerprint, self.base),
            store=self.store,
            tracking=self.tracking,
            device=str(self.device),
            head=self.head,
            config=self.config,
            train=self.train_config,
            experiment=self.experiment,
        )

    def add_route_stats(
        self, name: str, dataset: Any, version: int | None = None, *, replace: bool = False
    ) -> VersionRecord:
        """Compute route statistics (and calibration) of a stored version (default: current)
        from its training ``dataset`` and store them, making that version routable."""
        version = version or self.server.current_version(name)
        served = self.server.served(name, version)
        data = prepare(
            dataset,
            preprocessing=served.preprocessing,
            image_size=served.image_size,
            num_classes=served.num_classes,
        )
        train = _resolved_train(None, self.train_config, self.device)
        with self.server.task_model(name, version) as model:
            stats = route_stats(model, [name], {name: data}, train)[name]
        record = self.store.add_route_stats(
            name, stats, version, base=self.fingerprint, replace=replace
        )
        self.server.refresh()  # the version is routable now
        self.server.routing.clear()
        return record

    # -- housekeeping -----------------------------------------------------------------------

    def remove_task(self, name: str, version: int | None = None) -> list[int]:
        validate_version(version)
        self.server.current_version(name)
        self.server.unload(name)
        return self.store.delete(name, version, base=self.fingerprint)

    def export_task(self, name: str, path: str | os.PathLike, version: int | None = None) -> Path:
        validate_version(version)
        self.server.current_version(name)
        return self.store.export(name, path, version, base=self.fingerprint)

    def import_task(self, path: str | os.PathLike):
        """Import a ``.safetensors`` task file; it must have been trained on this base."""
        patch, meta = read_patch_file(path)
        if patch.base_fingerprint != self.fingerprint:
            info = meta.get("base") or {}
            raise BaseMismatchError(
                f"{path} was trained on base {patch.base_fingerprint[:12]} "
                f"({info.get('name', '?')}), this engine's base is {self.fingerprint[:12]} "
                f"({self.base.name}); open an Engine on that base"
            )
        record = self.store.import_file(path, layout=self.patch_layout())  # the live model's
        self.server.unload(patch.name)
        return record


def _register_base(store: TaskStoreAPI, base: Base, fp: str, layout: Callable[[], dict]) -> None:
    """Name the base in the store once; opening an engine on a known base writes nothing
    (no write lock per CLI call, and read-only database users can still predict).
    ``layout()`` gives the base's patch layout (built only when the store needs it)."""
    if store.readonly:
        return  # serving from a read-only store: imports need a writable one anyway
    try:
        known = store.base(fp)
    except UnknownBaseError:
        known = None
    if known is None or known.name == f"base-{fp[:12]}":  # placeholder name
        store.register_base(fp, base.name, base.source, base.num_parameters, layout=layout())
    elif store.base_layout(fp) is None:  # registered before layouts
        store.set_base_layout(fp, layout())


def _resolved_train(train: TrainConfig | None, default: TrainConfig, device: Any) -> TrainConfig:
    """``train`` (else ``default``) with ``device="auto"`` resolved to the engine's device."""
    train = train or default
    if not isinstance(train, TrainConfig):
        raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")
    if train.device == "auto":
        train = TrainConfig.from_dict({**train.to_dict(), "device": str(device)})
    return train


def _default_name(dataset: Any, tasks: Callable[[], list]) -> str:
    """A file or folder dataset's name, else ``task<N>`` not yet taken among ``tasks()``."""
    if isinstance(dataset, (str, Path)):
        stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(dataset).name)
        if stem and stem[0].isalpha():
            return stem[:64]
    existing = {r.name for r in tasks()}
    i = len(existing) + 1
    while f"task{i}" in existing:
        i += 1
    return f"task{i}"
