"""TaskAdaptiveLayer: one frozen base layer plus, per task, a weight delta and a gate score.

The wrapped layer's *own* forward runs with the effective weight
``w = w_base + I_tau(s) * dw`` via ``torch.func.functional_call``, so subclasses that do their
own work in ``forward`` (timm's ``Conv2dSame`` with TF "same" padding, weight-standardised
convolutions, ...) keep behaving exactly as they do in the base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from taps_cl.taps.gate import gate_is_on, hard_gate

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
    """The name of the parameter TAPS would gate in ``module``, or None if it is not gateable."""
    for cls in type(module).__mro__:
        attr = _GATEABLE.get(cls)
        if attr is not None:
            return attr if isinstance(getattr(module, attr, None), nn.Parameter) else None
    return None


class TaskAdaptiveLayer(nn.Module):
    """Wraps one base layer; holds per-task ``delta`` and ``score`` keyed by task name."""

    def __init__(self, base_layer: nn.Module, tau: float) -> None:
        super().__init__()
        attr = gateable_weight_attr(base_layer)
        if attr is None:
            raise TypeError(f"{type(base_layer).__name__} is not a registered gateable layer")
        self.base_layer = base_layer
        self.weight_attr = attr
        self.tau = tau
        self.delta = nn.ParameterDict()  # only tasks whose gate is on keep a delta after pruning
        self.score = nn.ParameterDict()  # every task keeps its score (0-d)
        self.active_task: str | None = None
        # Finalised tasks: their kept deltas apply unconditionally (w = w_base + dw), so a
        # frozen task's outputs never depend on this model's tau.
        self.frozen: set[str] = set()

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(self.base_layer, self.weight_attr)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads ``layer.weight`` (e.g. init or shape checks)."""
        return self.base_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def add_task(self, name: str, score_init: float) -> None:
        w = self.base_weight
        self.delta[name] = nn.Parameter(torch.zeros_like(w))
        self.score[name] = nn.Parameter(torch.tensor(float(score_init), device=w.device))

    def remove_task(self, name: str) -> None:
        self.frozen.discard(name)
        for store in (self.delta, self.score):
            if name in store:
                del store[name]

    def prune(self, name: str) -> bool:
        """Drop the task's delta if its gate is off; return whether the layer stays adapted."""
        if name in self.frozen:
            return name in self.delta
        on = gate_is_on(self.score[name], self.tau)
        if not on and name in self.delta:
            del self.delta[name]
        return on

    def freeze(self, name: str) -> None:
        """Prune, then fix the task: its delta (if kept) now always applies."""
        self.prune(name)
        self.frozen.add(name)

    def is_active(self, name: str) -> bool:
        if name in self.frozen:
            return name in self.delta
        return name in self.delta and gate_is_on(self.score[name], self.tau)

    def effective_weight(self, name: str) -> torch.Tensor:
        """``w_base + I_tau(s) * dw`` with the straight-through gate (``w_base + dw`` once the
        task is frozen; bitwise the same value, since the gate of a kept layer is exactly 1)."""
        if name in self.frozen:
            return self.base_weight + self.delta[name]
        return self.base_weight + hard_gate(self.score[name], self.tau) * self.delta[name]

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        task = self.active_task
        if task is None or task not in self.delta:
            return self.base_layer(x, *args, **kwargs)
        weight = {self.weight_attr: self.effective_weight(task)}
        return functional_call(self.base_layer, weight, (x, *args), kwargs)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, tasks={list(self.score.keys())}"
