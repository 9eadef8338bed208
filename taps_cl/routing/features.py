"""Base features of a :class:`TAPSModel`: the pooled input of its classifier on the no-task path.

Routing compares every task on one feature per input, so the feature must come from the frozen
base alone. There is one way to compute it, :func:`base_feature_extractor`: the model's base as
a plain module (the tensors are the model's own, nothing is copied, as in
:func:`~taps_cl.taps.merge.shared_merged`) with its classifier replaced by ``nn.Identity``, in
eval mode. It reads and writes no task state, so any number of threads may run it while other
code uses the model. Training (:func:`collect_route_stats`, the class-incremental strategy)
and serving (:class:`~taps_cl.serving.TaskServer`) both go through it; serving keeps one
extractor, training builds one per pass (cheap: new module objects, no tensor copies), so it
always sees the base weights the model holds right now.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from taps_cl.routing.calibration import CalibrationAccumulator
from taps_cl.routing.stats import RouteStats, RouteStatsAccumulator
from taps_cl.taps.merge import shared_merged
from taps_cl.taps.model import TAPSModel, set_child


def base_feature_extractor(model: TAPSModel) -> nn.Module:
    """The frozen base of ``model`` with its classifier replaced by ``nn.Identity`` (tensors
    shared with ``model``, eval mode, no task state): its output is the classifier's input
    (timm's ``forward_head(x, pre_logits=True)``, for any architecture ``TAPSModel`` wraps)."""
    if not isinstance(model, TAPSModel):
        raise TypeError(f"base features need a TAPSModel, got {type(model).__name__}")
    out = shared_merged(model, None)
    set_child(out, model.head_name, nn.Identity())
    return out


@torch.no_grad()
def extract(extractor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``extractor``'s features ``[n, d]`` for inputs ``x`` (no gradients)."""
    feats = extractor(x)
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2:
        shape = tuple(getattr(feats, "shape", ()))
        raise ValueError(f"classifier input has shape {shape}, expected [n, d]")
    return feats


def base_features(model: TAPSModel, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-classifier features ``[n, d]`` of the frozen base for inputs ``x``.

    Refuses a model with an active task: the caller meant that task's features, which these
    are not. For many batches build :func:`base_feature_extractor` once.
    """
    if not isinstance(model, TAPSModel):
        raise TypeError(f"base_features needs a TAPSModel, got {type(model).__name__}")
    if model.active_task is not None:
        raise ValueError(
            f"task {model.active_task!r} is active; base features need the no-task path "
            "(model.set_task(None))"
        )
    return extract(base_feature_extractor(model), x)


def collect_route_stats(
    model: TAPSModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    task: str,
    *,
    temperature: float = 1.0,
    calibrate: bool = True,
) -> RouteStats:
    """Statistics of ``task`` from its labelled training batches ``(x, y)``: base features per
    class and (if ``calibrate``) the energy of its own patch on them. Two forwards per batch.
    The statistics come back in full (float64); :meth:`RouteStats.compress` makes them compact."""
    acc = RouteStatsAccumulator(model.num_classes(task))
    calib = CalibrationAccumulator(temperature) if calibrate else None
    extractor = base_feature_extractor(model)
    for x, y in batches:
        acc.update(extract(extractor, x), y)
        if calib is not None:
            with torch.no_grad():
                calib.update(model(x, task=task))
    return acc.result(calib.result() if calib is not None else None)
