"""Gated weights: per task a weight delta and a gate score, ``w = w_base + I_tau(s) * dw``.

:class:`GatedWeight` holds the per-task delta (of a registered kind) and ``score`` of one
weight tensor and is one "layer" of TAPS (one score, one entry of ``TAPSModel.layer_names``).
:class:`TaskAdaptiveLayer` is a gated weight that also wraps the layer owning the weight: it
runs the wrapped layer's *own* forward with the effective weight via
``torch.func.functional_call``, so subclasses that do their own work in ``forward`` (timm's
``Conv2dSame`` with TF "same" padding, weight-standardised convolutions, ...) keep behaving
exactly as they do in the base. It is transparent: reading ``layer.weight`` gives the active
task's effective weight (see :mod:`taps_cl.taps.wrap`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from taps_cl.taps.deltas import DeltaKind, decode_parts, kind_of, stored_keys
from taps_cl.taps.gate import gate_is_on, hard_gate
from taps_cl.taps.task import TaskInfo, TaskModule, copy_checked
from taps_cl.taps.taskdeltas import TaskDeltas
from taps_cl.taps.wrap import Transparent

# Module types whose ``weight`` TAPS may specialise (subclasses included). Extend with
# ``register_gateable``. Values name the parameter that gets a delta.
_GATEABLE: dict[type[nn.Module], str] = {
    nn.Conv1d: "weight",
    nn.Conv2d: "weight",
    nn.Conv3d: "weight",
    nn.Linear: "weight",
}


def register_gateable(
    weight_attr: str = "weight",
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator declaring a module type gateable; refuses a type registered twice.

    The module must keep its weight as a parameter named ``weight_attr`` and read it in
    ``forward`` through ``self.<weight_attr>`` (so that ``functional_call`` can substitute it).
    """

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_gateable needs an nn.Module subclass, got {cls!r}")
        if cls in _GATEABLE:
            raise ValueError(f"{cls.__name__} is already registered as gateable")
        _GATEABLE[cls] = weight_attr
        return cls

    return decorator


def gateable_weight_attr(module: nn.Module) -> str | None:
    """The name of the parameter TAPS would gate in ``module``, or None if it is not gateable
    (or is already a TAPS wrapper, which also passes ``isinstance`` checks of its base type)."""
    if isinstance(module, (TaskModule, Transparent)):
        return None
    for cls in type(module).__mro__:
        attr = _GATEABLE.get(cls)
        if attr is not None:
            return attr if isinstance(getattr(module, attr, None), nn.Parameter) else None
    return None


class GatedWeight(TaskDeltas):
    """Per-task delta and ``score`` of one weight tensor (one TAPS layer).

    The delta is of a registered kind (:mod:`taps_cl.taps.deltas`: dense, the paper's, or
    low-rank as peft's LoRA, ...), kept per task by :class:`~taps_cl.taps.taskdeltas.TaskDeltas`;
    this class adds the gate. Subclasses say where the base weight lives (:attr:`base_weight`).
    Finalising *settles* a task: a closed gate drops its delta, a kept delta is encoded as
    stored (``dtype``: float32, bfloat16 or int8, see :mod:`~taps_cl.taps.quant`) and from then
    on the task computes with the decoded stored value, exactly as a task loaded from a store
    does. A frozen task's kept delta applies unconditionally (``w_base + dw``), so its outputs
    never depend on this model's tau.
    """

    def __init__(
        self,
        tau: float,
        score_init: float,
        kind: DeltaKind | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__(kind, dtype)
        self.tau = tau
        self.score_init = score_init
        self.score = nn.ParameterDict()  # every task keeps its score (0-d)

    def add_task(self, info: TaskInfo) -> None:
        super().add_task(info)
        device = self.base_weight.device
        self.score[info.name] = nn.Parameter(torch.tensor(float(self.score_init), device=device))

    def remove_task(self, name: str) -> None:
        super().remove_task(name)
        if name in self.score:
            del self.score[name]

    def close(self, name: str) -> None:
        """Close the task's gate (score just below tau) and drop its delta (budget pruning)."""
        with torch.no_grad():
            self.score[name].clamp_(max=self.tau - 1e-3)
        self._drop_delta(name)

    def settle(self, name: str) -> None:
        """Prune a closed gate; encode a kept delta as stored and compute with its decoded
        value from now on (idempotent; :meth:`unsettle` undoes it for more training)."""
        if self.is_frozen(name):
            return
        if not gate_is_on(self.score[name], self.tau):
            self._drop_delta(name)
        elif self.has_delta(name) and name not in self._stored:
            self._put(name, self._encoded(name, self.delta_dtype))

    def freeze(self, name: str) -> None:
        """Settle the task (unless it is already final, e.g. loaded) and stop its gradients."""
        if not self.is_frozen(name):
            self.settle(name)
        self._drop_trainable(name)  # a frozen task computes with its decoded stored delta
        for store in (self.delta, self.score):
            if name in store:
                store[name].requires_grad_(False)

    def is_active(self, name: str) -> bool:
        if self.is_frozen(name):
            return name in self.delta
        return self.has_delta(name) and gate_is_on(self.score[name], self.tau)

    def effective_weight(self, name: str) -> torch.Tensor:
        """``w_base + I_tau(s) * dw`` with the straight-through gate (``w_base + dw`` once the
        task is frozen; bitwise the same value, since the gate of a kept layer is exactly 1)."""
        if self.is_frozen(name):
            return self.base_weight + self.delta[name]
        return self.base_weight + hard_gate(self.score[name], self.tau) * self.delta_value(name)

    def applies(self) -> bool:
        """Whether the active task has a delta here (else the base weight is used as it is)."""
        return self.active_task is not None and self.has_delta(self.active_task)

    def active_weight(self) -> torch.Tensor:
        """The weight the active task computes with (the base weight without a task)."""
        return self.effective_weight(self.active_task) if self.applies() else self.base_weight

    def row_delta(self, name: str) -> tuple[type[DeltaKind], dict[str, torch.Tensor]] | None:
        """The frozen task's kept delta as its kind applies it to rows of a mixed-task batch
        (``kind.apply_rows(layer, x, parts)``), on the weight's device; None where the task
        keeps no delta (it computes with the base weight here)."""
        if not self.is_frozen(name):
            raise ValueError(f"task {name!r} is not frozen: finalize or load it first")
        if name not in self.delta:
            return None
        w = self.base_weight
        kind, values = decode_parts(self._stored[name], w)
        parts = kind.row_parts(values, self.delta[name])
        return kind, {k: v.detach().to(w.device, w.dtype) for k, v in parts.items()}

    def export_task(self, name: str) -> dict[str, torch.Tensor]:
        out = {"score": self.score[name]}
        if self.is_active(name):
            out.update(self._encoded(name, "float32"))
        return out

    def load_task(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        if "score" not in tensors:
            raise ValueError(f"no score for task {name!r}; a patch holds one for every layer")
        copy_checked(self.score[name], tensors["score"].reshape(()), "score")
        stored = {k: v for k, v in tensors.items() if k != "score"}
        if kind_of(stored) is not None:
            self._drop_trainable(name)
            self._put(name, stored)
        else:
            self._drop_delta(name)  # a pruned layer: the task uses the base weight here

    def task_keys(self, name: str) -> list[str]:
        return ["score", *stored_keys()]

    def patch_key(self, where: str, key: str) -> str:
        return f"{key}.{where}"  # delta.<layer>, score.<layer>, scale.delta.<layer>, ...

    def extra_repr(self) -> str:
        kind = f", kind={self.delta_kind!r}" if self._extra else ""
        return f"tau={self.tau}{kind}, tasks={list(self.score.keys())}"


class TaskAdaptiveLayer(Transparent, GatedWeight):
    """Wraps one base layer; holds per-task ``delta`` and ``score`` keyed by task name."""

    def __init__(
        self, base_layer: nn.Module, tau: float, score_init: float = 0.15, **delta: object
    ) -> None:
        attr = gateable_weight_attr(base_layer)
        if attr is None:
            raise TypeError(f"{type(base_layer).__name__} is not a registered gateable layer")
        super().__init__(tau, score_init, **delta)  # delta: kind, dtype (GatedWeight)
        self.base_layer = base_layer
        self.weight_attr = attr

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(self.base_layer, self.weight_attr)

    def _passthrough_target(self) -> nn.Module:
        return self._modules["base_layer"]

    def _passthrough(self, name: str) -> object:
        if name == self.__dict__.get("weight_attr"):
            return self.active_weight()
        return getattr(self._passthrough_target(), name)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if not self.applies():
            return self.base_layer(x, *args, **kwargs)
        weight = {self.weight_attr: self.effective_weight(self.active_task)}
        return functional_call(self.base_layer, weight, (x, *args), kwargs)

    def plain(self, name: str | None) -> nn.Module:
        plain = copy.deepcopy(self.base_layer)
        if name is not None and self.is_active(name):
            with torch.no_grad():
                weight = self.effective_weight(name).detach().clone()
            setattr(plain, self.weight_attr, nn.Parameter(weight))
        return plain
