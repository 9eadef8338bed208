"""Per-task deltas of one weight tensor, of a registered kind (:mod:`taps_cl.taps.deltas`).

:class:`TaskDeltas` keeps, per task, the trainable tensors of the layer's delta kind (one
``nn.ParameterDict`` per param name: ``delta``, or ``lora_a`` and ``lora_b``, ...) and, once the
task is *settled*, its stored form (encoded as ``delta_dtype``) and the decoded dense value in
``delta``, which the task computes with from then on, exactly as a task loaded from a store
does. Nothing here names a kind except dense, which every kind falls back to where it does not
apply and which every settled task computes with. :class:`~taps_cl.taps.layer.GatedWeight`
adds the gate.
"""

from __future__ import annotations

import torch
from torch import nn

from taps_cl.taps.deltas import (
    DeltaKind,
    Dense,
    decode_delta,
    encode_delta,
    stored_nbytes,
    stored_numbers,
)
from taps_cl.taps.task import TaskInfo, TaskModule, copy_checked

_DENSE = Dense()


class TaskDeltas(TaskModule):
    """Per-task deltas of one weight, of kind ``kind`` (default dense), stored as ``dtype``.

    Subclasses say where the base weight lives (:attr:`base_weight`).
    """

    def __init__(self, kind: DeltaKind | None = None, dtype: str = "float32") -> None:
        super().__init__()
        self.delta_kind = kind if kind is not None else _DENSE
        self.delta_dtype = dtype
        self.delta = nn.ParameterDict()  # dense deltas; settled tasks' decoded stored deltas
        self._extra = tuple(k for k in self.delta_kind.params if k != "delta")
        for key in self._extra:  # the kind's own trainable tensors, e.g. lora_a and lora_b
            if hasattr(type(self), key) or key in vars(self):
                raise ValueError(f"delta kind {self.delta_kind.name!r}: {key!r} is taken")
            setattr(self, key, nn.ParameterDict())
        self._stored: dict[str, dict[str, torch.Tensor]] = {}  # settled: local key -> stored

    @property
    def base_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def new_task_kind(self) -> DeltaKind:
        """The kind new tasks get here: the configured one where it applies, else dense."""
        return self.delta_kind if self.delta_kind.applies(self.base_weight.shape) else _DENSE

    @property
    def factorised(self) -> bool:
        """Whether new tasks here train a kind of their own (e.g. low-rank factors), not a
        dense delta."""
        return bool(self._extra) and self.new_task_kind is self.delta_kind

    def stored_size(self) -> int:
        """Numbers a new task stores for this weight if its gate stays on (its kind's stored
        tensors, plus per-row scales for int8)."""
        return stored_numbers(self.new_task_kind.shapes(self.base_weight.shape), self.delta_dtype)

    def stored_nbytes(self) -> int:
        """Bytes a new task stores for this weight if its gate stays on (the byte budget's
        unit)."""
        return stored_nbytes(self.new_task_kind.shapes(self.base_weight.shape), self.delta_dtype)

    def add_task(self, info: TaskInfo) -> None:
        super().add_task(info)
        for key, value in self.new_task_kind.init(self.base_weight, info.seed).items():
            getattr(self, key)[info.name] = nn.Parameter(value)

    def remove_task(self, name: str) -> None:
        super().remove_task(name)
        self._drop_delta(name)

    def _drop_delta(self, name: str) -> None:
        self._drop_trainable(name)
        if name in self.delta:
            del self.delta[name]
        self._stored.pop(name, None)

    def _drop_trainable(self, name: str) -> None:
        """Drop the task's tensors of a kind of its own (it computes with ``delta`` then)."""
        for key in self._extra:
            store = getattr(self, key)
            if name in store:
                del store[name]

    def has_delta(self, name: str) -> bool:
        return name in self.delta or any(name in getattr(self, k) for k in self._extra)

    def _trainable(self, name: str) -> tuple[DeltaKind, dict[str, nn.Parameter]]:
        """The kind of the task's delta here and its trainable tensors (none once pruned)."""
        own = {k: getattr(self, k)[name] for k in self._extra if name in getattr(self, k)}
        if own:
            return self.delta_kind, own
        return _DENSE, ({"delta": self.delta[name]} if name in self.delta else {})

    def trainable_deltas(self, name: str) -> list[nn.Parameter]:
        """The task's delta tensors an optimizer trains (a dense delta, both factors, ...)."""
        return list(self._trainable(name)[1].values())

    def delta_value(self, name: str) -> torch.Tensor:
        """The task's weight delta (dense; the settled stored value once settled)."""
        if name in self.delta:
            return self.delta[name]
        kind, params = self._trainable(name)
        return kind.value(params, self.base_weight)

    def _encoded(self, name: str, dtype: str) -> dict[str, torch.Tensor]:
        """The task's delta as stored: its stored form once settled, else encoded as
        ``dtype`` from its trainable tensors."""
        if name in self._stored:
            return self._stored[name]
        kind, params = self._trainable(name)
        return encode_delta(kind.to_stored(params, self.base_weight), dtype)

    def _put(self, name: str, stored: dict[str, torch.Tensor]) -> None:
        """Compute with the decoded ``stored`` delta from now on (settle and load alike)."""
        value = decode_delta(stored, self.base_weight)
        if name in self.delta:
            copy_checked(self.delta[name], value, "delta")
        else:
            device = self.base_weight.device
            self.delta[name] = nn.Parameter(value.to(device), requires_grad=False)
        self._stored[name] = stored

    def unsettle(self, name: str) -> None:
        """Undo settling for more training: back to the task's trainable tensors."""
        settled = self._stored.pop(name, None) is not None
        if settled and any(name in getattr(self, k) for k in self._extra):
            del self.delta[name]  # back to training the kind's own tensors
