"""Engine = one frozen base + a task store (+ optional MLflow tracking).

``add_task(dataset)`` validates the data, trains the task's gates and deltas on a private copy
of the base, evaluates, and commits the pruned patch as a new version. Only then is the task
loaded into the serving model, so a failed or interrupted training changes nothing anywhere.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taps_cl.bases import Base, fingerprint, load_base
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.data import TaskData, prepare, preprocess
from taps_cl.errors import BaseMismatchError, UnknownBaseError, UnknownTaskError
from taps_cl.runtime import resolve_device
from taps_cl.storage import TaskStore, read_patch_file
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch, validate_task_name
from taps_cl.train import FitResult, evaluate, fit_task

DEFAULT_BASE = "efficientnet_lite0"


@dataclass
class TaskRecord:
    """What ``add_task`` produced: one committed version of one task."""

    name: str
    version: int
    accuracy: float | None  # on eval_dataset (None without one)
    active_layers: list[str]  # layers the task adapts
    num_layers: int  # gated layers in the base
    task_parameters: int  # task-specific parameters stored (deltas, scores, norms, head)
    parameter_share: float  # task_parameters / base parameters
    nbytes: int  # bytes of the stored patch
    train_seconds: float
    num_classes: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    base_fingerprint: str | None = None  # the base the task belongs to (new one after train_base)

    @property
    def layers_adapted(self) -> str:
        return f"{len(self.active_layers)}/{self.num_layers}"


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
    ) -> None:
        self.base = load_base(base if base is not None else DEFAULT_BASE)
        self.base.module.requires_grad_(False).eval()
        self.fingerprint = fingerprint(self.base.module)
        self.store = store if isinstance(store, TaskStore) else TaskStore(store)
        self._register_base()
        self.tracking = tracking
        self.experiment = experiment
        self.device = resolve_device(device)
        self.head = head
        self.config = config or TAPSConfig()
        self.train_config = train or TrainConfig()
        self._serving: TAPSModel | None = None
        # task -> (version loaded into the serving model, input size it was trained at)
        self._loaded: dict[str, tuple[int, int]] = {}

    def _register_base(self) -> None:
        """Name the base in the store once; opening an engine on a known base writes nothing
        (no write lock per CLI call, and read-only database users can still predict)."""
        try:
            known = self.store.base(self.fingerprint)
        except UnknownBaseError:
            known = None
        if known is None or known.name == f"base-{self.fingerprint[:12]}":  # placeholder name
            self.store.register_base(
                self.fingerprint, self.base.name, self.base.source, self.base.num_parameters
            )

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
        ``TypeError`` and nothing is trained or stored.
        """
        name = validate_task_name(name or _default_name(dataset, self))
        config = config or self.config
        if not isinstance(config, TAPSConfig):
            raise TypeError(f"config must be a TAPSConfig, got {type(config).__name__}")
        train = self._train_config(train)
        data = self.prepare(dataset, train, num_classes=num_classes, class_names=class_names)
        eval_data = None
        if eval_dataset is not None:
            eval_data = self.prepare(
                eval_dataset, train, num_classes=data.num_classes, class_names=data.class_names
            )
        model = self._new_model(config)
        model.add_task(name, data.num_classes, data.class_names, seed=train.seed)
        fit = fit_task(model, name, data, eval_data, train, quiet=quiet)
        patch = model.finalize_task(name)
        record_config = self._record_config(config, train, model)
        metrics = _metrics(fit, len(data), len(eval_data) if eval_data is not None else 0)
        version = self.store.commit(patch, metrics=metrics, config=record_config)
        patch.version = version
        self._unload(name)
        record = _record(patch, fit, self.base.num_parameters)
        if self.tracking:
            self._track(patch, fit, record_config, metrics, model)
        return record

    def add_tasks(
        self,
        datasets: dict[str, Any],
        *,
        joint: bool = True,
        train_base: bool = False,
        config: TAPSConfig | None = None,
        train: TrainConfig | None = None,
        eval_datasets: dict[str, Any] | None = None,
        sampling: Any = None,
        quiet: bool = False,
    ) -> list[TaskRecord]:
        """Train several tasks (name -> dataset). ``joint=True`` trains them together (see
        :mod:`taps_cl.joint`; ``sampling`` is a ``JointConfig``) and commits them in ONE
        transaction: all become visible or none. ``train_base=True`` also trains the shared
        weights into a NEW base, stored with its own fingerprint (open it with
        :meth:`open_stored_base`); this engine's base and tasks stay untouched. Every dataset
        is validated before anything trains. Under torchrun only rank 0 writes."""
        from taps_cl import joint as jm

        config, train = config or self.config, self._train_config(train)
        data, evals = jm.prepare_all(
            datasets, eval_datasets, lambda d, **kw: self.prepare(d, train, **kw)
        )
        if not joint:
            if train_base:
                raise ValueError("train_base=True needs joint=True")
            kw = dict(config=config, train=train, quiet=quiet)
            return [
                self.add_task(d, name=n, eval_dataset=evals.get(n), **kw) for n, d in data.items()
            ]
        jm.init_distributed()
        model = self._new_model(config)
        for name, d in data.items():
            model.add_task(name, d.num_classes, d.class_names, seed=train.seed)
        fit = jm.fit_joint(
            model, data, train, joint=sampling, train_base=train_base, eval_data=evals, quiet=quiet
        )
        patches, new_base = jm.export_joint(model, list(data), self.base.module, train_base)
        rec_config = {**self._record_config(config, train, model), **jm.run_config(fit, sampling)}
        metrics = {
            n: {**_metrics(f, len(data[n]), len(evals.get(n) or ())), **jm.run_metrics(fit)}
            for n, f in fit.fits.items()
        }
        label = jm.new_base_label(self.base, self.fingerprint, list(data))
        versions = jm.commit_joint(
            self.store, patches, metrics=metrics, config=rec_config,
            new_base=(new_base, *label) if new_base is not None else None,
        )  # fmt: skip
        records = []
        for patch, version in zip(patches, versions, strict=True):
            patch.version = version
            self._unload(patch.name)
            records.append(_record(patch, fit.fits[patch.name], self.base.num_parameters))
            if self.tracking and jm.world()[0] == 0:
                self._track(patch, fit.fits[patch.name], rec_config, metrics[patch.name], model)
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
            "layer_order": list(model.layer_names),
        }

    def _track(self, patch, fit, record_config, metrics, model) -> None:
        from taps_cl.tracking import log_task_run

        log_task_run(
            self.tracking,
            self.experiment,
            task=patch.name,
            config=record_config,
            base=self.base.name,
            dataset_sizes={"train": metrics["train_size"], "eval": metrics["eval_size"]},
            history=fit.history,
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            gates=model.gates(patch.name),
            scores=model.scores(patch.name),
            patch_summary=_summary(patch),
        )

    # -- serving ----------------------------------------------------------------------------

    def _serving_model(self) -> TAPSModel:
        if self._serving is None:
            self._serving = self._new_model(self.config).to(self.device).eval()
        return self._serving

    def _unload(self, name: str) -> None:
        if self._serving is not None and name in self._serving.tasks:
            self._serving.remove_task(name)
        self._loaded.pop(name, None)

    def load_patch(self, name: str, version: int | None = None) -> TaskPatch:
        """The stored patch (verified against its sha256s and this engine's base)."""
        patch = self.store.load(name, version, base=self.fingerprint)
        if patch.base_fingerprint != self.fingerprint:
            raise BaseMismatchError(f"task {name!r} belongs to another base")
        return patch

    def _ensure(self, name: str, version: int | None = None) -> tuple[TAPSModel, int]:
        """The serving model with ``name`` at ``version`` (default: current) loaded, and the
        input size that version was trained at; both come from the same stored version."""
        model = self._serving_model()
        want = version or self._current_version(name)
        loaded = self._loaded.get(name)
        if loaded is None or loaded[0] != want:
            patch = self.load_patch(name, want)
            self._unload(name)
            model.load_patch(patch)
            model.to(self.device).eval()
            size = int(patch.config.get("image_size") or self.base.preprocessing.input_size)
            loaded = self._loaded[name] = (want, size)
        return model, loaded[1]

    def _current_version(self, name: str) -> int:
        validate_task_name(name)
        records = self.tasks()
        for rec in records:
            if rec.name == name:
                return rec.current_version
        known = [r.name for r in records]
        raise UnknownTaskError(f"no task {name!r} in {self.store.url}; known: {known or 'none'}")

    def image_size(self, name: str, version: int | None = None) -> int:
        """The input side the task was trained at (what ``predict`` resizes to)."""
        return self._ensure(name, version)[1]

    def preprocess(self, inputs: Any, name: str | None = None) -> torch.Tensor:
        """Raw images (tensors, arrays, PIL, paths) -> model input, exactly as training saw them."""
        size = self.image_size(name) if name else self.train_config.image_size
        return preprocess(inputs, self.base.preprocessing, size)

    def model(self, name: str, version: int | None = None) -> nn.Module:
        """The task as a plain merged ``nn.Module`` (eval mode; expects preprocessed input)."""
        return self._ensure(name, version)[0].merged(name)

    def class_names(self, name: str, version: int | None = None) -> list[str] | None:
        return self._ensure(name, version)[0].class_names(name)

    @torch.no_grad()
    def predict(
        self, name: str, inputs: Any, logits: bool = False, version: int | None = None
    ) -> torch.Tensor:
        """Class indices (or logits with ``logits=True``) for raw ``inputs``."""
        model, size = self._ensure(name, version)
        x = preprocess(inputs, self.base.preprocessing, size)
        outs = [model(chunk.to(self.device), task=name).float().cpu() for chunk in x.split(256)]
        out = torch.cat(outs)
        return out if logits else out.argmax(1)

    def evaluate(self, name: str, dataset: Any, version: int | None = None) -> dict[str, float]:
        """Accuracy and loss of the stored task on ``dataset``."""
        model, size = self._ensure(name, version)
        data = prepare(
            dataset,
            preprocessing=self.base.preprocessing,
            image_size=size,
            num_classes=model.num_classes(name),
        )
        return evaluate(model, name, data, TrainConfig(device=str(self.device)))

    # -- housekeeping -----------------------------------------------------------------------

    def remove_task(self, name: str, version: int | None = None) -> list[int]:
        self._current_version(name)
        self._unload(name)
        return self.store.delete(name, version, base=self.fingerprint)

    def export_task(self, name: str, path: str | os.PathLike, version: int | None = None) -> Path:
        self._current_version(name)
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
        record = self.store.import_file(path)
        self._unload(patch.name)
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


def _metrics(fit: FitResult, n_train: int, n_eval: int) -> dict[str, Any]:
    return {
        "accuracy": fit.accuracy,
        "train_seconds": fit.seconds,
        "steps": fit.steps,
        "score_lr": fit.score_lr,
        "train_size": n_train,
        "eval_size": n_eval,
        "history": fit.history,
    }


def _record(patch: TaskPatch, fit: FitResult, base_params: int) -> TaskRecord:
    return TaskRecord(
        name=patch.name,
        version=int(patch.version or 0),
        accuracy=fit.accuracy,
        active_layers=list(patch.active_layers),
        num_layers=patch.num_layers,
        task_parameters=patch.num_parameters,
        parameter_share=patch.num_parameters / max(1, base_params),
        nbytes=patch.nbytes,
        train_seconds=fit.seconds,
        num_classes=patch.num_classes,
        history=fit.history,
        base_fingerprint=patch.base_fingerprint,
    )


def _summary(patch: TaskPatch) -> dict[str, Any]:
    return {
        "name": patch.name,
        "version": patch.version,
        "num_classes": patch.num_classes,
        "class_names": patch.class_names,
        "active_layers": patch.active_layers,
        "num_layers": patch.num_layers,
        "num_parameters": patch.num_parameters,
        "nbytes": patch.nbytes,
        "base_fingerprint": patch.base_fingerprint,
    }
