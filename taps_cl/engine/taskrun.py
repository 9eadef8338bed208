"""What one training run of the engine produces and how it is kept, for one task or several.

``Engine.add_task`` and ``Engine.add_tasks`` both train through :func:`taps_cl.joint.fit_joint`
and hand the fitted model to a :class:`TaskRun`, which takes it the rest of the way:
``finalize()`` (patches, the new base of a ``train_base`` run, route statistics) ->
``commit(store)`` (one transaction, rank 0 only; every rank learns the versions) ->
``records()`` (the :class:`TaskRecord` the user gets back) -> ``track(uri, experiment)``
(with tracking on, one MLflow run per task). The run receives the model, the data and the
base it ran on; the store and the tracking URI are handed to the step that uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from taps_cl.bases import Base, fingerprint
from taps_cl.config import JointConfig, TAPSConfig, TrainConfig
from taps_cl.data import DataError, TaskData
from taps_cl.errors import TAPSError
from taps_cl.joint.shared_base import new_base_label, trained_base
from taps_cl.storage import TaskStoreAPI
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch, validate_task_name
from taps_cl.training.loop import FitResult, RunResult
from taps_cl.training.route_stats import route_stats
from taps_cl.training.runtime import world


@dataclass
class TaskRecord:
    """What ``add_task``/``add_tasks`` produced: one committed version of one task."""

    name: str
    version: int
    accuracy: float | None  # on eval_dataset (None without one)
    active_layers: list[str]  # layers the task adapts
    num_layers: int  # gated layers in the base
    task_parameters: int  # task-specific parameters stored (deltas, scores, norms, head)
    parameter_share: float  # task_parameters / base parameters
    nbytes: int  # bytes the version stores: patch plus routing statistics
    train_seconds: float
    num_classes: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    base_fingerprint: str | None = None  # the base the task belongs to (new one after train_base)
    route_bytes: int = 0  # of nbytes: the routing statistics (task-free routing)

    @property
    def patch_bytes(self) -> int:
        """Bytes of the patch itself (deltas, scores, norms, head): nbytes without routing
        statistics."""
        return self.nbytes - self.route_bytes

    @property
    def layers_adapted(self) -> str:
        return f"{len(self.active_layers)}/{self.num_layers}"


class TaskRun:
    """One fitted run on its way to the store: ``finalize()`` -> ``commit(store)`` ->
    ``records()`` -> ``track(uri, experiment)``, in that order (see the module docstring).

    ``model`` holds the run's tasks, trained on ``base`` (``fit`` is what the loop returned);
    ``data``/``evals`` are the prepared training and eval sets by task name.
    """

    def __init__(
        self,
        model: TAPSModel,
        fit: RunResult,
        data: Mapping[str, TaskData],
        evals: Mapping[str, TaskData],
        *,
        base: Base,
        config: TAPSConfig,
        train: TrainConfig,
        sampling: JointConfig | None = None,
    ) -> None:
        self.model, self.fit, self.data, self.base, self.train = model, fit, data, base, train
        self.names = list(data)
        self.base_fingerprint = model.base_fingerprint  # what the run started from
        self.config = {**version_config(config, train, model, base), **run_config(fit, sampling)}
        self.metrics = {
            n: task_metrics(fit, n, len(data[n]), len(evals[n]) if n in evals else 0)
            for n in self.names
        }
        self.patches: list[TaskPatch] = []
        self.new_base: nn.Module | None = None  # the trained base of a train_base run
        self.committed = False

    def finalize(self) -> list[TaskPatch]:
        """Every task's patch, with its route statistics as ``route.*`` tensors so they commit
        in the same transaction (routable from v1; every rank computes them, so patches stay
        equal on all ranks)."""
        self.patches, self.new_base = finalize_run(
            self.model, self.names, self.base.module, self.fit.train_base
        )
        stats = route_stats(self.model, self.names, self.data, self.train)
        for patch in self.patches:
            patch.tensors.update(stats[patch.name].to_tensors())
        return self.patches

    def commit(self, store: TaskStoreAPI) -> list[int]:
        """Commit every patch (and the new base) in one transaction; set their versions."""
        if not self.patches:
            raise RuntimeError("finalize() the run before commit()")
        new_base = None
        if self.new_base is not None:
            label = new_base_label(self.base, self.base_fingerprint, self.names)
            new_base = (self.new_base, *label)
        versions = _commit_everywhere(
            store, self.patches, metrics=self.metrics, config=self.config, new_base=new_base
        )
        for patch, version in zip(self.patches, versions, strict=True):
            patch.version = version
        self.committed = True
        return versions

    def records(self) -> list[TaskRecord]:
        """What the user gets back: one record per committed version."""
        self._require_commit("records()")
        n = self.base.num_parameters
        return [task_record(p, self.fit.fits[p.name], n) for p in self.patches]

    def track(self, uri: str | None, experiment: str) -> None:
        """One MLflow run per committed task (under one parent run when there are several);
        its merged model is logged and registered under the task's name."""
        from taps_cl.tracking.runs import parent_run, track_task

        self._require_commit("track()")
        several = len(self.names) > 1
        name = "joint:" + "+".join(self.names)
        with parent_run(uri, experiment, name) if several else contextlib.nullcontext() as parent:
            for patch in self.patches:
                track_task(
                    uri, experiment, patch=patch, model=self.model, config=self.config,
                    history=self.fit.fits[patch.name].history, metrics=self.metrics[patch.name],
                    base_name=self.base.name, channels=self.base.preprocessing.channels,
                    parent=parent,
                )  # fmt: skip

    def _require_commit(self, what: str) -> None:
        if not self.committed:
            raise RuntimeError(f"commit() the run before {what}")


def prepare_all(
    datasets: Mapping[str, Any],
    eval_datasets: Mapping[str, Any] | None,
    prepare: Callable[..., Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate every task name and dataset (and eval dataset) before anything trains; an
    error names the task it is about."""
    if not isinstance(datasets, Mapping) or not datasets:
        raise TypeError("datasets must be a non-empty dict: task name -> dataset")
    eval_datasets = dict(eval_datasets or {})
    unknown = sorted(set(eval_datasets) - set(datasets))
    if unknown:
        raise ValueError(f"eval_datasets names tasks not being trained: {unknown}")
    data, evals = {}, {}
    for name, dataset in datasets.items():
        validate_task_name(name)
        try:
            data[name] = prepare(dataset)
            if eval_datasets.get(name) is not None:
                d = data[name]
                evals[name] = prepare(
                    eval_datasets[name], num_classes=d.num_classes, class_names=d.class_names
                )
        except DataError as err:
            raise DataError(f"task {name!r}: {err}") from err
        except (ValueError, TypeError) as err:
            raise type(err)(f"task {name!r}: {err}") from err
    return data, evals


def finalize_run(
    model: TAPSModel, names: Sequence[str], template: nn.Module, train_base: bool
) -> tuple[list[TaskPatch], nn.Module | None]:
    """Finalise every task; with ``train_base`` first build the new base and point the model
    (hence every patch) at its fingerprint, since deltas are relative to the trained weights."""
    new_base = None
    if train_base:
        new_base = trained_base(model, template)
        model.base_fingerprint = fingerprint(new_base)
    return [model.finalize_task(n) for n in names], new_base


def version_config(
    config: TAPSConfig, train: TrainConfig, model: TAPSModel, base: Base
) -> dict[str, Any]:
    """What each version records beside its tensors: configs, the input size ``predict``
    must use, and the gated layers in model order (the store keeps tensors by name)."""
    size = train.image_size or base.preprocessing.input_size
    return {
        "taps": config.to_dict(),
        "train": train.to_dict(),
        "image_size": size,
        "preprocessing": dataclasses.asdict(base.preprocessing),
        "layer_order": list(model.layer_names),
    }


def run_config(result: RunResult, sampling: JointConfig | None) -> dict[str, Any]:
    """What a run adds to each committed version's config (JSON)."""
    return {
        "joint": {
            "tasks": list(result.fits),
            "sampling": (sampling or JointConfig()).to_dict(),
            "train_base": result.train_base,
            "world_size": result.world_size,
        }
    }


def task_metrics(result: RunResult, name: str, n_train: int, n_eval: int) -> dict[str, Any]:
    """The metrics stored with one task's version (its own, and the run's totals)."""
    fit = result.fits[name]
    return {
        "accuracy": fit.accuracy,
        "train_seconds": fit.seconds,
        "steps": fit.steps,
        "score_lr": fit.score_lr,
        "parameter_share": fit.parameter_share,
        "train_size": n_train,
        "eval_size": n_eval,
        "history": fit.history,
        "joint_steps": result.steps,
        "joint_examples": result.examples,
        "joint_seconds": result.seconds,
        "joint_images_per_second": result.images_per_second,
    }


def _commit_everywhere(
    store: TaskStoreAPI,
    patches: Sequence[TaskPatch],
    *,
    metrics: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
    new_base: tuple[nn.Module, str, str] | None = None,
) -> list[int]:
    """Rank 0 commits every patch (and the new base's weights, if any) in ONE transaction; the
    version numbers (or the failure) reach every rank. ``new_base`` is ``(module, name,
    source)``: the new base and its tasks appear together or not at all."""
    rank, world_size = world()
    versions, error = [0] * len(patches), None
    if rank == 0:
        try:
            base_weights = None
            if new_base is not None:
                module, name, source = new_base
                base_weights = (patches[0].base_fingerprint, module.state_dict(), name, source)
            versions = store.commit_many(
                patches, metrics=metrics, config=config, base_weights=base_weights
            )
        except Exception as err:  # re-raised below, after the other ranks heard of it
            error = err
    if world_size > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        status = torch.tensor([0 if error else 1, *versions], dtype=torch.long, device=device)
        dist.broadcast(status, 0)
        if rank != 0 and not status[0]:
            raise TAPSError("rank 0 failed to commit the tasks; nothing was stored")
        versions = [int(v) for v in status[1:]]
    if error is not None:
        raise error
    return versions


def task_record(patch: TaskPatch, fit: FitResult, base_params: int) -> TaskRecord:
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
        route_bytes=patch.route_nbytes,
    )
