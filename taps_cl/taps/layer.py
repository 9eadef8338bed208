"""Gated weights: per task a weight delta and a gate score, ``w = w_base + I_tau(s) * dw``.

:class:`GatedWeight` holds the per-task ``delta`` / ``score`` of one weight tensor and is one
"layer" of TAPS (one score, one entry of ``TAPSModel.layer_names``). :class:`TaskAdaptiveLayer`
is a gated weight that also wraps the layer owning the weight: it runs the wrapped layer's *own*
forward with the effective weight via ``torch.func.functional_call``, so subclasses that do their
own work in ``forward`` (timm's ``Conv2dSame`` with TF "same" padding, weight-standardised
convolutions, ...) keep behaving exactly as they do in the base. It is transparent: reading
``layer.weight`` gives the active task's effective weight (see :mod:`taps_cl.taps.wrap`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from taps_cl.taps.gate import gate_is_on, hard_gate
from taps_cl.taps.quant import decode, encode
from taps_cl.taps.task import TaskInfo, TaskModule, copy_checked
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


class GatedWeight(TaskModule):
    """Per-task delta and ``score`` of one weight tensor (one TAPS layer).

    The delta is dense (``delta``, the paper's) or, with ``rank``, low-rank as peft's LoRA does
    it: ``(lora_b @ lora_a).view(w.shape) * alpha / rank`` with ``lora_b`` zero (identity at
    start); a convolution's ``lora_a`` is ``rank x (in/groups * kh * kw)``. A layer whose factors
    would not be smaller than its weight (e.g. a depthwise 3x3 conv) keeps a dense delta.

    Subclasses say where the base weight lives (:attr:`base_weight`). Finalising *settles* a
    task: its delta is encoded as stored (``dtype``: float32, bfloat16 or int8, see
    :mod:`~taps_cl.taps.quant`) and from then on the task computes with the decoded stored
    value, held densely in ``delta`` (also for low-rank tasks), exactly as a task loaded from a
    store does. A frozen task's kept delta applies unconditionally (``w_base + dw``), so its
    outputs never depend on this model's tau.
    """

    def __init__(
        self,
        tau: float,
        score_init: float,
        rank: int | None = None,
        alpha: float | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.tau = tau
        self.score_init = score_init
        self.rank, self.alpha, self.delta_dtype = rank, alpha, dtype
        self.delta = nn.ParameterDict()  # dense deltas; settled tasks' decoded stored deltas
        self.lora_a = nn.ParameterDict()  # low-rank factors of tasks in training
        self.lora_b = nn.ParameterDict()
        self.score = nn.ParameterDict()  # every task keeps its score (0-d)
        self._stored: dict[str, dict[str, torch.Tensor]] = {}  # settled: local key -> stored

    @property
    def base_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def factorised(self) -> bool:
        """Whether new tasks get low-rank factors here (only where they are smaller)."""
        w = self.base_weight
        return self.rank is not None and self.rank * (w[0].numel() + w.shape[0]) < w.numel()

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def stored_size(self) -> int:
        """Numbers a new task stores for this layer if its gate stays on (factors or dense
        delta, plus per-output-channel scales for int8)."""
        w = self.base_weight
        if self.factorised:
            size, scales = self.rank * (w[0].numel() + w.shape[0]), self.rank + w.shape[0]
        else:
            size, scales = w.numel(), w.shape[0]
        return size + (scales if self.delta_dtype == "int8" else 0)

    def add_task(self, info: TaskInfo) -> None:
        super().add_task(info)
        w = self.base_weight
        if self.factorised:
            # peft's init (kaiming-uniform A, zero B), seeded so a task inits alike anywhere.
            gen = torch.Generator().manual_seed(info.seed * 1_000_003 + w.numel())
            bound = 1.0 / w[0].numel() ** 0.5
            a = torch.empty(self.rank, w[0].numel()).uniform_(-bound, bound, generator=gen)
            self.lora_a[info.name] = nn.Parameter(a.to(w))
            self.lora_b[info.name] = nn.Parameter(w.new_zeros(w.shape[0], self.rank))
        else:
            self.delta[info.name] = nn.Parameter(torch.zeros_like(w))
        self.score[info.name] = nn.Parameter(torch.tensor(float(self.score_init), device=w.device))

    def remove_task(self, name: str) -> None:
        super().remove_task(name)
        self._drop_delta(name)
        if name in self.score:
            del self.score[name]

    def _drop_delta(self, name: str) -> None:
        for store in (self.delta, self.lora_a, self.lora_b):
            if name in store:
                del store[name]
        self._stored.pop(name, None)

    def has_delta(self, name: str) -> bool:
        return name in self.delta or name in self.lora_a

    def trainable_deltas(self, name: str) -> list[nn.Parameter]:
        """The task's delta parameters an optimizer trains (dense delta or both factors)."""
        if name in self.lora_a:
            return [self.lora_a[name], self.lora_b[name]]
        return [self.delta[name]] if name in self.delta else []

    def delta_value(self, name: str) -> torch.Tensor:
        """The task's weight delta (dense; the settled stored value once settled)."""
        if name in self.delta:
            return self.delta[name]
        product = self.lora_b[name] @ self.lora_a[name]
        return product.view(self.base_weight.shape) * self.scaling

    def prune(self, name: str) -> bool:
        """Drop the task's delta if its gate is off; return whether the layer stays adapted."""
        if self.is_frozen(name):
            return name in self.delta
        on = gate_is_on(self.score[name], self.tau)
        if not on:
            self._drop_delta(name)
        return on and self.has_delta(name)

    def close(self, name: str) -> None:
        """Close the task's gate (score just below tau) and drop its delta (budget pruning)."""
        with torch.no_grad():
            self.score[name].clamp_(max=self.tau - 1e-3)
        self._drop_delta(name)

    def settle(self, name: str) -> None:
        """Prune a closed gate; encode a kept delta as stored and compute with its decoded
        value from now on (idempotent; :meth:`unsettle` undoes it for more training)."""
        if not self.prune(name) or name in self._stored:
            return
        stored = self._encode(name, self.delta_dtype)
        self._put(name, stored)

    def unsettle(self, name: str) -> None:
        if self._stored.pop(name, None) is not None and name in self.lora_a:
            del self.delta[name]  # back to training the factors

    def _encode(self, name: str, dtype: str) -> dict[str, torch.Tensor]:
        if name in self.lora_a and name not in self._stored:
            parts = {"lora_a": self.lora_a[name], "lora_b": self.lora_b[name] * self.scaling}
        else:
            parts = {"delta": self.delta[name]}
        out = {}
        for key, value in parts.items():
            for suffix, t in encode(value, dtype).items():
                out[f"{suffix}.{key}" if suffix else key] = t
        return out

    def _decode(self, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "delta" in stored:
            return decode(stored["delta"], stored.get("scale.delta"))
        a = decode(stored["lora_a"], stored.get("scale.lora_a"))
        b = decode(stored["lora_b"], stored.get("scale.lora_b"))
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"lora factors do not chain: {tuple(b.shape)} @ {tuple(a.shape)}")
        w = self.base_weight
        if (b.shape[0], a.shape[1]) != (w.shape[0], w[0].numel()):
            raise ValueError(f"lora factors {tuple(b.shape)} @ {tuple(a.shape)} != {w.shape}")
        return (b @ a).view(w.shape)

    def _put(self, name: str, stored: dict[str, torch.Tensor]) -> None:
        """Compute with the decoded ``stored`` delta from now on (settle and load alike)."""
        value = self._decode(stored)
        if name in self.delta:
            copy_checked(self.delta[name], value, "delta")
        else:
            w = self.base_weight
            if tuple(value.shape) != tuple(w.shape):
                raise ValueError(f"delta: patch shape {tuple(value.shape)} != model {w.shape}")
            self.delta[name] = nn.Parameter(value.to(w.device), requires_grad=False)
        self._stored[name] = stored

    def freeze(self, name: str) -> None:
        """Settle the task (unless it is already final, e.g. loaded) and stop its gradients."""
        if not self.is_frozen(name):
            self.settle(name)
        for store in (self.lora_a, self.lora_b):
            if name in store:
                del store[name]  # a frozen task computes with its decoded stored delta
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

    def export_task(self, name: str) -> dict[str, torch.Tensor]:
        out = {"score": self.score[name]}
        if self.is_active(name):
            out.update(self._stored.get(name) or self._encode(name, "float32"))
        return out

    def load_task(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        if "score" not in tensors:
            raise ValueError(f"no score for task {name!r}; a patch holds one for every layer")
        copy_checked(self.score[name], tensors["score"].reshape(()), "score")
        stored = {k: v for k, v in tensors.items() if k != "score"}
        if "delta" in stored or "lora_a" in stored:
            if name in self.lora_a:
                del self.lora_a[name], self.lora_b[name]
            self._put(name, stored)
        else:
            self._drop_delta(name)  # a pruned layer: the task uses the base weight here

    def task_keys(self, name: str) -> list[str]:
        return ["delta", "score", *STORED_KEYS]

    def patch_key(self, where: str, key: str) -> str:
        return f"{key}.{where}"  # delta.<layer>, score.<layer>, scale.delta.<layer>, ...

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank else ""
        return f"tau={self.tau}{rank}, tasks={list(self.score.keys())}"


# Stored tensor keys of a kept low-rank or quantised delta (beside "delta").
STORED_KEYS = ("lora_a", "lora_b", "scale.delta", "scale.lora_a", "scale.lora_b")


class TaskAdaptiveLayer(Transparent, GatedWeight):
    """Wraps one base layer; holds per-task ``delta`` and ``score`` keyed by task name."""

    def __init__(
        self, base_layer: nn.Module, tau: float, score_init: float = 0.15, **delta: object
    ) -> None:
        attr = gateable_weight_attr(base_layer)
        if attr is None:
            raise TypeError(f"{type(base_layer).__name__} is not a registered gateable layer")
        super().__init__(tau, score_init, **delta)  # delta: rank, alpha, dtype (GatedWeight)
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
