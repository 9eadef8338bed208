"""Base features of a :class:`TAPSModel`: the pooled input of its classifier on the no-task path.

Routing compares every task on one feature per input, so the feature must come from the frozen
base alone. It is read with a forward pre-hook on ``model.heads`` (the :class:`TaskHeads` that
replaced the base's classifier), registered once per model and writing into a
``threading.local``: threads that extract features at the same time each see their own input,
and forwards that do not ask for features pay one attribute lookup.

Caveat: the active task of a ``TAPSModel`` is model-wide state (``set_task``), so the no-task path
is only the base while no other thread has a task set on the same model.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from taps_cl.taps.model import TAPSModel
from taps_cl.taps.routestats import (
    CalibrationAccumulator,
    RouteStats,
    RouteStatsAccumulator,
)

_REGISTRY_LOCK = threading.Lock()
_CAPTURES: weakref.WeakKeyDictionary[nn.Module, _HeadInputs] = weakref.WeakKeyDictionary()


class _HeadInputs:
    """The pre-hook on one ``TaskHeads``; each thread has its own capture slot."""

    def __init__(self, heads: nn.Module) -> None:
        self.local = threading.local()
        self.handle = heads.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        slot = getattr(self.local, "slot", None)
        if slot is not None:
            slot.append(args[0].detach())


def _capture_for(model: TAPSModel) -> _HeadInputs:
    with _REGISTRY_LOCK:
        capture = _CAPTURES.get(model.heads)
        if capture is None:
            capture = _CAPTURES[model.heads] = _HeadInputs(model.heads)
        return capture


def base_features(model: TAPSModel, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-classifier features ``[n, d]`` of the frozen base for inputs ``x``.

    Runs ``model(x, task=None)`` without gradients and returns the input its classifier got
    (timm's ``forward_head(x, pre_logits=True)``, for any architecture ``TAPSModel`` wraps).
    """
    if not isinstance(model, TAPSModel):
        raise TypeError(f"base_features needs a TAPSModel, got {type(model).__name__}")
    if model.active_task is not None:
        raise ValueError(
            f"task {model.active_task!r} is active; base features need the no-task path "
            "(model.set_task(None))"
        )
    capture = _capture_for(model)
    capture.local.slot = slot = []
    try:
        with torch.no_grad():
            model(x, task=None)
    finally:
        capture.local.slot = None
    if len(slot) != 1:
        raise ValueError(f"the classifier ran {len(slot)} times in one forward; expected once")
    feats = slot[0]
    if feats.ndim != 2:
        raise ValueError(f"classifier input has shape {tuple(feats.shape)}, expected [n, d]")
    return feats


def collect_route_stats(
    model: TAPSModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    task: str,
    *,
    temperature: float = 1.0,
    calibrate: bool = True,
) -> RouteStats:
    """Statistics of ``task`` from its labelled training batches ``(x, y)``: base features per
    class and (if ``calibrate``) the energy of its own patch on them. Two forwards per batch."""
    acc = RouteStatsAccumulator(model.num_classes(task))
    calib = CalibrationAccumulator(temperature) if calibrate else None
    for x, y in batches:
        acc.update(base_features(model, x), y)
        if calib is not None:
            with torch.no_grad():
                calib.update(model(x, task=task))
    return acc.result(calib.result() if calib is not None else None)
