"""The per-task contract: one typed record per task and one base class for per-task state.

Every module that owns something of a task (gated weights, task norms, task heads) derives from
:class:`TaskModule` and answers the same six calls, so :class:`~taps_cl.taps.model.TAPSModel`
adds, freezes, exports and loads a task with one loop over its modules instead of one code path
per kind of module.

Whether a task is frozen lives in ONE place: :attr:`TaskInfo.frozen`. The model creates one
``TaskInfo`` per task and hands the same object to every module's ``add_task``; modules read
``info.frozen`` and never keep a frozen flag of their own, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from taps_cl.taps.patch import validate_task_name


@dataclass
class TaskInfo:
    """What every per-task module needs to know about a task (shared, one object per task)."""

    name: str  # task name (see validate_task_name)
    num_classes: int  # size of the task's head
    class_names: list[str] | None = None  # optional human names of the classes
    seed: int = 0  # seed of the head's initialisation (same task, same init in any process)
    frozen: bool = False  # finalised: set only by the TaskInfo's owner (TAPSModel)

    def __post_init__(self) -> None:
        validate_task_name(self.name)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.class_names is not None:
            self.class_names = list(self.class_names)
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"{len(self.class_names)} class names given for {self.num_classes} classes"
                )


class TaskModule(nn.Module):
    """Base class of everything that holds per-task state.

    Contract (all keyed by task name, ``info`` is the model's shared :class:`TaskInfo`):

    - ``add_task(info)``: create the task's state (zero delta, norm copy, new head, ...)
    - ``remove_task(name)``: drop it
    - ``freeze(name)``: fix it so the task's outputs never change again (no grad, eval mode)
    - ``export_task(name) -> {key: tensor}``: the task's tensors under module-local keys
    - ``load_task(name, tensors)``: the inverse of ``export_task``
    - ``task_keys(name)`` / ``patch_key(where, key)``: which local keys a task may have and the
      :class:`~taps_cl.taps.patch.TaskPatch` name of a local key for the module at ``where``
    """

    def __init__(self) -> None:
        # Not super().__init__(): in a transparent subclass the next class in the MRO is the
        # wrapped type (e.g. nn.Linear), whose __init__ would build a second set of weights.
        nn.Module.__init__(self)
        self.task_infos: dict[str, TaskInfo] = {}
        self.active_task: str | None = None

    def add_task(self, info: TaskInfo) -> None:
        if info.name in self.task_infos:
            raise ValueError(f"task {info.name!r} already exists in {type(self).__name__}")
        self.task_infos[info.name] = info

    def remove_task(self, name: str) -> None:
        self.task_infos.pop(name, None)

    def is_frozen(self, name: str) -> bool:
        return self.task_infos[name].frozen

    def freeze(self, name: str) -> None:
        raise NotImplementedError

    def export_task(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_task(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def task_keys(self, name: str) -> list[str]:
        raise NotImplementedError

    def patch_key(self, where: str, key: str) -> str:
        raise NotImplementedError


def copy_checked(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    """``dst.copy_(src)`` that refuses a shape mismatch with a message naming the tensor."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{key}: patch shape {tuple(src.shape)} != model {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)
