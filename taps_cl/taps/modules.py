"""Per-task copies of the cheap parts of a network: normalisation layers and the classifier head.

Both dispatch on ``active_task`` and fall back to the frozen base module when no task (or a task
without its own copy) is active, so the wrapped model without a task is the base itself. Both are
transparent (:mod:`taps_cl.taps.wrap`): ``norm.weight``, ``norm.running_mean``, ``norm.eps``,
``head.out_features`` ... are those of the module the active task computes with.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from taps_cl.taps.task import TaskInfo, TaskModule
from taps_cl.taps.wrap import Transparent

NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def is_norm(module: nn.Module) -> bool:
    """A norm TAPS would copy per task (not one it already wrapped)."""
    return isinstance(module, NORM_TYPES) and not isinstance(module, Transparent)


class _PerTask(Transparent, TaskModule):
    """A frozen base module plus one trainable copy per task, chosen by ``active_task``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.tasks = nn.ModuleDict()

    def _make_copy(self, info: TaskInfo) -> nn.Module:
        raise NotImplementedError

    def add_task(self, info: TaskInfo) -> None:
        super().add_task(info)
        self.tasks[info.name] = self._make_copy(info)
        self.train(self.training)

    def remove_task(self, name: str) -> None:
        super().remove_task(name)
        if name in self.tasks:
            del self.tasks[name]

    def freeze(self, name: str) -> None:
        self.tasks[name].requires_grad_(False)
        self.tasks[name].eval()

    def export_task(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.tasks[name].state_dict())

    def load_task(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        try:
            self.tasks[name].load_state_dict(dict(tensors), strict=True)
        except RuntimeError as err:  # missing/unexpected keys or shapes: a patch for another model
            raise ValueError(f"patch does not fit {type(self).__name__}: {err}") from err

    def task_keys(self, name: str) -> list[str]:
        return list(self.tasks[name].state_dict())

    def train(self, mode: bool = True) -> _PerTask:
        # The base and frozen tasks never leave eval mode: a BatchNorm in train mode would
        # update its running statistics, which is forgetting by another name.
        self.training = mode
        self.base.eval()
        for name, module in self.tasks.items():
            module.train(mode and not self.is_frozen(name))
        return self

    def current(self) -> nn.Module:
        task = self.active_task
        return self.tasks[task] if task is not None and task in self.tasks else self.base

    def _passthrough_target(self) -> nn.Module:
        return self.current()

    def plain(self, name: str | None) -> nn.Module:
        return copy.deepcopy(self.base if name is None else self.tasks[name])

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.current()(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks.keys())}"


class TaskNorm(_PerTask):
    """A normalisation layer with a per-task copy (BN affine + running stats, LN/GN affine).

    ``reset_stats``: a new task's BatchNorm starts with empty running statistics and keeps their
    cumulative average (``momentum=None``) instead of moving the base's ImageNet statistics by
    the base's momentum, which a short run never finishes moving (``TAPSConfig.norm_stats``).
    """

    def __init__(self, base: nn.Module, reset_stats: bool = False) -> None:
        super().__init__(base)
        self.reset_stats = reset_stats

    def _make_copy(self, info: TaskInfo) -> nn.Module:
        norm = copy.deepcopy(self.base)
        norm.requires_grad_(True)
        if self.reset_stats and isinstance(norm, _BatchNorm) and norm.track_running_stats:
            norm.reset_running_stats()
            norm.momentum = None
        return norm

    def patch_key(self, where: str, key: str) -> str:
        return f"norm.{where}.{key}"


class TaskHeads(_PerTask):
    """The base classifier (kept for the no-task path) plus a new ``nn.Linear`` per task."""

    def _make_copy(self, info: TaskInfo) -> nn.Module:
        base = self.base
        head = nn.Linear(base.in_features, info.num_classes, bias=base.bias is not None)
        # Seeded init so the same task trains the same way in any process.
        gen = torch.Generator().manual_seed(info.seed)
        bound = 1.0 / base.in_features**0.5
        with torch.no_grad():
            head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
            if head.bias is not None:
                head.bias.zero_()
        return head.to(device=base.weight.device, dtype=base.weight.dtype)

    def set_linear(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Overwrite task ``name``'s head with ``weight [C, d]`` and ``bias [C]`` (e.g. a
        closed-form probe, so training starts where the probe ends). A finalised task's head
        never changes; a head without a bias takes ``bias=None`` only."""
        if name not in self.tasks:
            raise ValueError(f"no task {name!r}; tasks: {list(self.tasks)}")
        if self.is_frozen(name):
            raise ValueError(f"task {name!r} is finalised; its head cannot change")
        head = self.tasks[name]
        if tuple(weight.shape) != tuple(head.weight.shape):
            raise ValueError(
                f"head weight for task {name!r} must be {tuple(head.weight.shape)}, "
                f"got {tuple(weight.shape)}"
            )
        if (bias is None) != (head.bias is None):
            want = "no bias" if head.bias is None else f"a bias of shape {tuple(head.bias.shape)}"
            raise ValueError(f"task {name!r}'s head takes {want}")
        if bias is not None and tuple(bias.shape) != tuple(head.bias.shape):
            raise ValueError(
                f"head bias for task {name!r} must be {tuple(head.bias.shape)}, "
                f"got {tuple(bias.shape)}"
            )
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)

    def patch_key(self, where: str, key: str) -> str:
        return f"head.{key}"
