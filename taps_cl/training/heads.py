"""Closed-form task heads in training: start where a linear probe ends, end on the trained features.

A short run (a few dozen steps) trains a random head far below what a ridge probe on the same
frozen features reaches before any step (the linear-probe-then-fine-tune observation, Kumar et
al. 2022). So, with ``TAPSConfig.head_init="ridge"``, a task's head is first set to the ridge
solution on its own training features (the head's inputs with the task active, eval mode), at
logit scale 1: the raw ridge outputs, whose near-uniform softmax keeps the first gradients
small (a calibrated, confident start measurably hurts). With ``TAPSConfig.head_refit`` the head
is fitted again the same way after training, on the trained task's features: its norms' running
statistics and deltas move during training, and the head a short run ends with has not caught
up with them.

Every loop that trains a task uses these: :func:`~taps_cl.training.loop.fit_tasks` (``add_task``,
joint and budget mode) through :func:`fit_heads`, the Avalanche strategy through
:func:`fit_head` on its own batches. Under DDP every rank fits on the full task data and rank 0's
head is broadcast, so all ranks end with the same head.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from taps_cl.config import TrainConfig
from taps_cl.errors import TrainingDivergedError
from taps_cl.routing.closedform import LinearHead, one_hot, ridge_from_moments, ridge_head
from taps_cl.taps.model import TAPSModel
from taps_cl.training.batching import make_loader
from taps_cl.training.runtime import Runtime, world

__all__ = [
    "broadcast_heads",
    "closed_form_head",
    "fit_head",
    "fit_heads",
    "head_inputs",
    "set_head",
]


@torch.no_grad()
def head_inputs(
    model: TAPSModel, name: str, batches: Iterable[tuple[torch.Tensor, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features ``[n, d]`` float32 on CPU, labels ``[n]`` int64): what task ``name``'s head
    receives for every input of ``batches`` (labelled ``(x, y)``, task-local labels), with the
    task active, eval mode and no gradient. A forward pre-hook on the heads reads them, so any
    architecture ``TAPSModel`` wraps gives its own pooled features."""
    model.task_info(name)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def keep(_module: Any, args: tuple[Any, ...]) -> None:
        feats.append(args[0].detach().float().cpu())

    was_training = model.training
    model.eval()
    hook = model.heads.register_forward_pre_hook(keep)
    try:
        for x, y in batches:
            model(x, task=name)
            labels.append(torch.as_tensor(y).detach().to("cpu", torch.int64).reshape(-1))
    finally:
        hook.remove()
        model.train(was_training)
    if not feats:
        raise ValueError(f"no data to fit task {name!r}'s head on")
    z = torch.cat(feats)
    if z.ndim != 2:
        raise ValueError(
            f"task {name!r}'s head receives inputs of shape {tuple(z.shape)}; a closed-form "
            "head needs [n, d] (pooled features): use TAPSConfig(head_init='random', "
            "head_refit=False) for this architecture"
        )
    return z, torch.cat(labels)


def closed_form_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, bias: bool = True
) -> LinearHead:
    """The ridge head at logit scale 1 (``lambda`` by exact leave-one-out error; without a
    ``bias``, through the origin with ``lambda`` by GCV). Fewer than 2 samples or one class:
    the constant head (zero weight, class frequencies as bias), which is also what ridge gives
    for one class: a one-class task has nothing to separate, its router decides."""
    z = features.detach().to("cpu", torch.float64)
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"need features [n, d] and labels [n], got {z.shape}, {labels.shape}")
    n = z.shape[0]
    if n == 0:
        raise ValueError("a closed-form head needs at least one sample")
    if n < 2 or num_classes == 1:
        freq = one_hot(labels, num_classes).mean(0)
        weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64)
        return LinearHead(weight, freq if bias else torch.zeros_like(freq), 1.0, "ridge", 0.0)
    if bias:
        return ridge_head(z, labels, num_classes, temperature=False)
    y = one_hot(labels, num_classes)
    weight, reg = ridge_from_moments(z.T @ z, z.T @ y, n, float(n))
    zeros = torch.zeros(num_classes, dtype=torch.float64)
    return LinearHead(weight.T.contiguous(), zeros, 1.0, "ridge", reg)


def set_head(model: TAPSModel, name: str, head: LinearHead) -> None:
    """Task ``name``'s head computes ``head.logits`` from now on (scale folded in)."""
    linear = model.heads.tasks[name]
    weight, bias = head.scaled()
    if linear.bias is None:
        if bool(bias.abs().max() > 0):
            raise ValueError(f"task {name!r}'s head has no bias; fit it with bias=False")
        bias = None
    dtype = linear.weight.dtype
    model.heads.set_linear(
        name,
        weight.to(linear.weight.device, dtype),
        None if bias is None else bias.to(linear.weight.device, dtype),
    )


def fit_head(
    model: TAPSModel, name: str, batches: Iterable[tuple[torch.Tensor, Any]]
) -> LinearHead:
    """Set task ``name``'s head to the closed-form head on its inputs over ``batches``
    (:func:`head_inputs`, :func:`closed_form_head`); return that head. A finalised task is
    refused (its head never changes)."""
    if model.is_frozen(name):
        raise ValueError(f"task {name!r} is finalised; its head cannot change")
    z, y = head_inputs(model, name, batches)
    if not bool(torch.isfinite(z).all()):  # what training would meet as a NaN loss
        raise TrainingDivergedError(
            f"task {name!r}: its head's inputs contain NaN or inf, so no head can be fitted; "
            "check the data for non-finite values; earlier tasks are unchanged."
        )
    has_bias = model.heads.tasks[name].bias is not None
    head = closed_form_head(z, y, model.num_classes(name), bias=has_bias)
    set_head(model, name, head)
    return head


def fit_heads(
    model: TAPSModel,
    tasks: Mapping[str, Any],
    config: TrainConfig,
    *,
    after_training: bool = False,
) -> None:
    """:func:`fit_head` for every task of ``tasks`` (name -> preprocessed ``(x, y)`` data), one
    ordered pass over each task's full data. Under DDP, ``after_training`` first averages the
    tasks' norm statistics over the ranks (each rank's moved on its own shard), and rank 0's
    heads are broadcast, so every rank ends with the same head."""
    names = list(tasks)
    size = world()[1]
    if after_training and size > 1:
        _average_task_buffers(model, names, size)
    loader_config = TrainConfig.from_dict(
        {**config.to_dict(), "batch_size": max(config.batch_size, 64)}
    )
    runtime = Runtime.of(loader_config)
    for name, data in tasks.items():
        batches = ((runtime.to_device(x), y) for x, y in make_loader(data, loader_config, runtime))
        fit_head(model, name, batches)
    broadcast_heads(model, names)


def broadcast_heads(model: TAPSModel, names: Sequence[str]) -> None:
    """Copy rank 0's heads of ``names`` to every rank (a no-op in a single process)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for name in names:
            for p in model.heads.tasks[name].parameters():
                dist.broadcast(p.data, 0)


def _average_task_buffers(model: TAPSModel, names: Sequence[str], size: int) -> None:
    """Mean over the ranks of the floating buffers (BN running statistics) of ``names``' norms."""
    with torch.no_grad():
        for _, norm in model.norms():
            for name in names:
                for buf in norm.tasks[name].buffers():
                    if buf.is_floating_point():
                        dist.all_reduce(buf)
                        buf.div_(size)
