"""What one training run of the engine produces and how it is kept, for one task or several.

``Engine.add_task`` and ``Engine.add_tasks`` both train through :func:`taps_cl.joint.fit_joint`
and then come here: finalise the patches, build each version's config and metrics, commit them
in one transaction (:meth:`TaskStore.commit_many`, rank 0 only), build the :class:`TaskRecord`
the user gets back and, with tracking on, one MLflow run per task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from taps_cl.bases import fingerprint
from taps_cl.config import JointConfig
from taps_cl.data import DataError
from taps_cl.errors import TAPSError
from taps_cl.joint.base import trained_base
from taps_cl.runtime import world
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch, validate_task_name
from taps_cl.train import FitResult, RunResult


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
    nbytes: int  # bytes of the stored patch
    train_seconds: float
    num_classes: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    base_fingerprint: str | None = None  # the base the task belongs to (new one after train_base)

    @property
    def layers_adapted(self) -> str:
        return f"{len(self.active_layers)}/{self.num_layers}"


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


def attach_route_stats(patches: Sequence[TaskPatch], stats: Mapping[str, Any]) -> None:
    """Put each task's :class:`~taps_cl.routing.RouteStats` on its patch as ``route.*``
    tensors, so they commit in the same transaction as the patch (routable from v1)."""
    for patch in patches:
        patch.tensors.update(stats[patch.name].to_tensors())


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


def commit_run(
    store: Any,
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
    )


def patch_summary(patch: TaskPatch) -> dict[str, Any]:
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


def parent_run(engine: Any, names: list[str]) -> Any:
    """Several tasks trained in one run: an MLflow parent run, one child run per task."""
    if len(names) < 2:
        return contextlib.nullcontext()
    from taps_cl.tracking.runs import parent_run as start_parent

    return start_parent(engine.tracking, engine.experiment, "joint:" + "+".join(names))


def track_task(
    engine: Any,
    patch: TaskPatch,
    fit: RunResult,
    record_config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    model: TAPSModel,
    parent: Any = None,
) -> None:
    """The task's MLflow run; its merged model is logged and registered under the task's name,
    the registry version tagged with the store version it is."""
    from taps_cl.tracking import log_task_run

    prep, size = engine.base.preprocessing, int(record_config["image_size"])
    log_task_run(
        engine.tracking,
        engine.experiment,
        task=patch.name,
        config=record_config,
        base=engine.base.name,
        dataset_sizes={"train": metrics["train_size"], "eval": metrics["eval_size"]},
        history=fit.fits[patch.name].history,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        gates=model.gates(patch.name),
        scores=model.scores(patch.name),
        patch_summary=patch_summary(patch),
        parent=parent,
        model=model.merged(patch.name).cpu(),
        input_shape=(prep.channels, size, size),
        registry_tags={
            "taps_cl.task": patch.name,
            "taps_cl.store_version": str(patch.version),
            "taps_cl.base_fingerprint": patch.base_fingerprint,
        },
    )
