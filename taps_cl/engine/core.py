"""Engine = one frozen base + a task store (+ optional MLflow tracking).

``add_task(dataset)`` validates the data, trains the task's gates and deltas on a private copy
of the base, evaluates, and commits the pruned patch as a new version. Only then is the task
loaded into the serving model, so a failed or interrupted training changes nothing anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taps_cl.bases import Base, fingerprint, load_base
from taps_cl.config import JointConfig, TAPSConfig, TrainConfig, environment
from taps_cl.data import TaskData, prepare, preprocess
from taps_cl.errors import BaseMismatchError, UnknownBaseError
from taps_cl.router import Routed, TaskRouting, route_stats
from taps_cl.runs import (
    TaskRecord,
    attach_route_stats,
    commit_run,
    finalize_run,
    parent_run,
    prepare_all,
    run_config,
    task_metrics,
    task_record,
    track_task,
)
from taps_cl.runtime import resolve_device, world
from taps_cl.serving import TaskServer
from taps_cl.storage import TaskStore, VersionRecord, read_patch_file
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch, validate_task_name, validate_version

__all__ = ["Engine", "Routed", "TaskRecord"]


class Engine:
    """A frozen base, a versioned task store and (optionally) MLflow tracking, tied together."""

    def __init__(
        self,
        base: str | nn.Module | Base | None = None,
        store: str | TaskStore | None = None,
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
        """``max_loaded``: task versions kept loaded for serving (least recently used are
        dropped). ``version_ttl``: seconds a task's current version is cached before the store
        is asked again (see :mod:`taps_cl.serving` for the staleness rule)."""
        self.base = load_base(base if base is not None else environment().base)
        self.base.module.requires_grad_(False).eval()
        self.fingerprint = fingerprint(self.base.module)
        self.store = store if isinstance(store, TaskStore) else TaskStore(store)
        self.head = head
        self._register_base()
        self.tracking = tracking
        self.experiment = experiment
        self.device = resolve_device(device)
        self.config = config or TAPSConfig()
        self.train_config = train or TrainConfig()
        self.server = TaskServer(
            self, lambda: self._new_model(self.config), max_loaded, version_ttl
        )
        self.routing = TaskRouting(self)

    def _register_base(self) -> None:
        """Name the base in the store once; opening an engine on a known base writes nothing
        (no write lock per CLI call, and read-only database users can still predict)."""
        if self.store.readonly:
            return  # serving from a read-only store: imports need a writable one anyway
        try:
            known = self.store.base(self.fingerprint)
        except UnknownBaseError:
            known = None
        if known is None or known.name == f"base-{self.fingerprint[:12]}":  # placeholder name
            self.store.register_base(
                self.fingerprint, self.base.name, self.base.source, self.base.num_parameters,
                layout=self.patch_layout(),
            )  # fmt: skip
        elif self.store.base_layout(self.fingerprint) is None:  # registered before layouts
            self.store.set_base_layout(self.fingerprint, self.patch_layout())

    def patch_layout(self) -> dict:
        """What a patch of this base may hold (tensor names, dtypes, shapes), from a throwaway
        model; the store keeps it so that imported files are checked against the base."""
        if getattr(self, "_layout", None) is None:
            from taps_cl.storage.layout import model_layout

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

    def _train_config(self, train: TrainConfig | None) -> TrainConfig:
        train = train or self.train_config
        if not isinstance(train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")
        if train.device == "auto":
            train = TrainConfig.from_dict({**train.to_dict(), "device": str(self.device)})
        return train

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
        name = validate_task_name(name or _default_name(dataset, self))
        train = self._train_config(train)
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
        train = self._train_config(train)
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
        from taps_cl.joint import fit_joint, init_distributed, new_base_label

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
        patches, new_base = finalize_run(model, list(data), self.base.module, train_base)
        # every task routable from v1 (every rank computes them: patches stay equal on all ranks)
        attach_route_stats(patches, route_stats(model, list(data), data, train))
        rec_config = {**self._record_config(config, train, model), **run_config(fit, sampling)}
        metrics = {
            n: task_metrics(fit, n, len(data[n]), len(evals[n]) if n in evals else 0) for n in data
        }
        label = new_base_label(self.base, self.fingerprint, list(data))
        versions = commit_run(
            self.store, patches, metrics=metrics, config=rec_config,
            new_base=(new_base, *label) if new_base is not None else None,
        )  # fmt: skip
        records = []
        track = bool(self.tracking) and world()[0] == 0
        with parent_run(self, list(data)) if track else contextlib.nullcontext() as parent:
            for patch, version in zip(patches, versions, strict=True):
                patch.version = version
                self.server.unload(patch.name)
                records.append(task_record(patch, fit.fits[patch.name], self.base.num_parameters))
                if track:
                    track_task(self, patch, fit, rec_config, metrics[patch.name], model, parent)
        return records

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

    def _record_config(
        self, config: TAPSConfig, train: TrainConfig, model: TAPSModel
    ) -> dict[str, Any]:
        """What each version records beside its tensors: configs, the input size ``predict``
        must use, and the gated layers in model order (the store keeps tensors by name)."""
        size = train.image_size or self.base.preprocessing.input_size
        return {
            "taps": config.to_dict(),
            "train": train.to_dict(),
            "image_size": size,
            "preprocessing": dataclasses.asdict(self.base.preprocessing),
            "layer_order": list(model.layer_names),
        }

    # -- serving ----------------------------------------------------------------------------

    def load_patch(self, name: str, version: int | None = None) -> TaskPatch:
        """The stored patch (verified against its sha256s and this engine's base)."""
        validate_version(version)
        return self.server.load_patch(name, version)

    def image_size(self, name: str, version: int | None = None) -> int:
        """The input side the task was trained at (what ``predict`` resizes to)."""
        validate_version(version)
        return self.server.served(name, version).image_size

    def preprocess(self, inputs: Any, name: str | None = None) -> torch.Tensor:
        """Raw images (tensors, arrays, PIL, paths) -> model input, exactly as training saw them."""
        if name is None:
            return preprocess(inputs, self.base.preprocessing, self.train_config.image_size)
        served = self.server.served(name)
        return preprocess(inputs, served.preprocessing, served.image_size)

    def model(self, name: str, version: int | None = None) -> nn.Module:
        """The task as a plain merged ``nn.Module`` (eval mode; expects preprocessed input);
        an independent copy: modifying it changes nothing the engine serves."""
        validate_version(version)
        return self.server.merged(name, version)

    def class_names(self, name: str, version: int | None = None) -> list[str] | None:
        validate_version(version)
        return self.server.served(name, version).class_names

    def predict(
        self, name: str, inputs: Any, logits: bool = False, version: int | None = None
    ) -> torch.Tensor:
        """Class indices (or logits with ``logits=True``) for raw ``inputs``. Safe to call
        from any number of threads (each task version is served by its own merged module)."""
        validate_version(version)
        out = self.server.predict(name, inputs, version)
        return out if logits else out.argmax(1)

    def evaluate(self, name: str, dataset: Any, version: int | None = None) -> dict[str, float]:
        """Accuracy and loss of the stored task on ``dataset``."""
        validate_version(version)
        return self.server.evaluate(name, dataset, version)

    def route(
        self, inputs: Any, tasks: list[str] | None = None, method: str | None = None
    ) -> Routed:
        """Task-free prediction: for each raw input, the task it belongs to, its class there
        and a confidence (router's task probability x the patch's class probability).

        Candidates are the routable current versions of this base's tasks (``tasks=`` restricts
        them). Cost: one base forward per distinct trained input size, the discriminant, then
        each chosen task's patch once on the inputs routed to it. ``method``: ``"lda"``
        (default: pooled-covariance discriminant on base features; on the offline suite it
        identified 100% of test images' tasks, as ``"combined"`` did at 1.7x the cost, see
        ``benchmarks/routing.py``), ``"ncm"`` (cosine to class means),
        ``"combined"`` (LDA shortlists 2 tasks, their patches' calibrated energy decides) or
        ``"energy"`` (every patch on every input; for comparison).
        """
        return self.routing.route(inputs, tasks, method)

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
        train = self._train_config(None)
        with self.server.task_model(name, version) as model:
            stats = route_stats(model, [name], {name: data}, train)[name]
        record = self.store.add_route_stats(
            name, stats, version, base=self.fingerprint, replace=replace
        )
        self.server.refresh()  # the version is routable now
        self.routing.clear()
        return record

    # -- files for other libraries (ecosystem) -----------------------------------------------

    def save_pretrained(
        self, name: str, directory: str | os.PathLike, version: int | None = None
    ) -> Path:
        """Write the merged task in timm's Hugging Face layout (``config.json`` +
        ``model.safetensors``): ``timm.create_model("local-dir:DIR", pretrained=True)`` loads
        it with the task's classes and preprocessing. Needs a timm base."""
        from taps_cl.export import save_pretrained

        validate_version(version)
        return save_pretrained(self, name, directory, version)

    # -- housekeeping -----------------------------------------------------------------------

    def refresh(self) -> None:
        """Read current task versions from the store on the next call (they are cached for
        ``version_ttl`` seconds; writes through this engine are seen at once anyway)."""
        self.server.refresh()

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


def _default_name(dataset: Any, engine: Engine) -> str:
    if isinstance(dataset, (str, Path)):
        stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(dataset).name)
        if stem and stem[0].isalpha():
            return stem[:64]
    existing = {r.name for r in engine.tasks()}
    i = len(existing) + 1
    while f"task{i}" in existing:
        i += 1
    return f"task{i}"
