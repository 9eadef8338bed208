"""After a joint run: the trained base, the patches, and committing them (rank 0 only)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from taps_cl.bases import Base, fingerprint
from taps_cl.data import DataError
from taps_cl.errors import BaseMismatchError, TAPSError
from taps_cl.joint.distributed import world
from taps_cl.joint.fit import JointResult
from taps_cl.joint.sampling import JointConfig
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch, validate_task_name


def trained_base(model: TAPSModel, template: nn.Module) -> nn.Module:
    """A plain copy of ``template`` (the original base architecture) holding ``model``'s
    current base weights: wrapped layers' base weights, the base norms and the original head
    (which training leaves alone), and every non-wrapped module. CPU, eval mode, frozen.
    The unwrapping is the model's own (``merged(None)``), not a guess from state_dict keys."""
    plain = model.merged(None).state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in plain.items()}
    new = copy.deepcopy(template).cpu()
    new.load_state_dict(state, strict=True)
    return new.requires_grad_(False).eval()


def export_joint(
    model: TAPSModel, names: Sequence[str], template: nn.Module, train_base: bool
) -> tuple[list[TaskPatch], nn.Module | None]:
    """Finalise every task; with ``train_base`` first build the new base and point the model
    (hence every patch) at its fingerprint, since deltas are relative to the trained weights."""
    new_base = None
    if train_base:
        new_base = trained_base(model, template)
        model.base_fingerprint = fingerprint(new_base)
    return [model.finalize_task(n) for n in names], new_base


def stored_base(store: Any, fp: str, like: Base) -> Base:
    """The base kept in ``store`` under fingerprint ``fp`` (e.g. by a ``train_base`` run),
    built on the architecture and preprocessing of ``like``."""
    state = store.load_base_weights(fp)
    module = copy.deepcopy(like.module).cpu()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BaseMismatchError(
            f"stored base {fp[:12]} does not fit the architecture of {like.name!r}: {err}"
        ) from err
    if fingerprint(module) != fp:
        raise BaseMismatchError(f"stored base {fp[:12]} changes when loaded into {like.name!r}")
    record = store.base(fp)
    return Base(module.requires_grad_(False).eval(), record.name, record.source, like.preprocessing)


def commit_joint(
    store: Any,
    patches: Sequence[TaskPatch],
    *,
    metrics: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
    new_base: tuple[nn.Module, str, str] | None = None,
) -> list[int]:
    """Rank 0 stores the new base's weights (if any), then commits every patch in one
    transaction; the version numbers (or the failure) reach every rank.

    ``new_base`` is ``(module, name, source)``; its weights are written in the same transaction
    as the patches, so the new base and its tasks appear together or not at all."""
    rank, world_size = world()
    versions, error = [0] * len(patches), None
    if rank == 0:
        try:
            base_weights = None
            if new_base is not None:
                module, name, source = new_base
                fp = patches[0].base_fingerprint
                base_weights = (fp, module.state_dict(), name, source)
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
            raise TAPSError("rank 0 failed to commit the joint tasks; nothing was stored")
        versions = [int(v) for v in status[1:]]
    if error is not None:
        raise error
    return versions


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


def run_config(result: JointResult, joint: JointConfig | None) -> dict[str, Any]:
    """What a joint run adds to each committed version's config (JSON)."""
    return {
        "joint": {
            "tasks": list(result.fits),
            "sampling": (joint or JointConfig()).to_dict(),
            "train_base": result.train_base,
            "world_size": result.world_size,
        }
    }


def run_metrics(result: JointResult) -> dict[str, Any]:
    """Run-wide metrics stored with every task of a joint run."""
    return {
        "joint_steps": result.steps,
        "joint_examples": result.examples,
        "joint_seconds": result.seconds,
        "joint_images_per_second": result.images_per_second,
    }


def new_base_label(base: Base, old_fingerprint: str, names: Sequence[str]) -> tuple[str, str]:
    """(name, source) recorded for the base a ``train_base`` run creates."""
    name = f"{base.name}+joint({','.join(names)})"
    if len(name) > 200:
        name = f"{base.name[:150]}+joint({len(names)} tasks)"
    return name, f"joint training of {list(names)} from base {old_fingerprint} ({base.source})"
