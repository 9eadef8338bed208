"""Per-task copies of the cheap parts of a network: normalisation layers and the classifier head.

Both dispatch on ``active_task`` and fall back to the frozen base module when no task (or a task
without its own copy) is active, so the wrapped model without a task is the base itself.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


class _PerTask(nn.Module):
    """A frozen base module plus one trainable copy per task, chosen by ``active_task``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.tasks = nn.ModuleDict()
        self.active_task: str | None = None
        self.training_tasks: set[str] = set()  # tasks whose copy follows .train(); others stay eval

    def _make_copy(self, name: str) -> nn.Module:
        raise NotImplementedError

    def add_task(self, name: str) -> None:
        self.tasks[name] = self._make_copy(name)
        self.training_tasks.add(name)
        self.train(self.training)

    def freeze_task(self, name: str) -> None:
        self.training_tasks.discard(name)
        if name in self.tasks:
            self.tasks[name].requires_grad_(False)
            self.tasks[name].eval()

    def remove_task(self, name: str) -> None:
        self.training_tasks.discard(name)
        if name in self.tasks:
            del self.tasks[name]

    def train(self, mode: bool = True) -> _PerTask:
        # The base and frozen tasks never leave eval mode: a BatchNorm in train mode would
        # update its running statistics, which is forgetting by another name.
        self.training = mode
        self.base.eval()
        for name, module in self.tasks.items():
            module.train(mode and name in self.training_tasks)
        return self

    def current(self) -> nn.Module:
        task = self.active_task
        return self.tasks[task] if task is not None and task in self.tasks else self.base

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.current()(x, *args, **kwargs)


class TaskNorm(_PerTask):
    """A normalisation layer with a per-task copy (BN affine + running stats, LN/GN affine)."""

    def _make_copy(self, name: str) -> nn.Module:
        norm = copy.deepcopy(self.base)
        norm.requires_grad_(True)
        return norm


class TaskHeads(_PerTask):
    """The base classifier (kept for the no-task path) plus a new ``nn.Linear`` per task."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.in_features = base.in_features
        self._num_classes: dict[str, int] = {}
        self._seed = 0

    def add_head(self, name: str, num_classes: int, seed: int = 0) -> None:
        self._num_classes[name] = num_classes
        self._seed = seed
        self.add_task(name)

    def _make_copy(self, name: str) -> nn.Module:
        base = self.base
        head = nn.Linear(self.in_features, self._num_classes[name], bias=base.bias is not None)
        # Seeded init so the same task trains the same way in any process.
        gen = torch.Generator().manual_seed(self._seed)
        bound = 1.0 / self.in_features**0.5
        with torch.no_grad():
            head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
            if head.bias is not None:
                head.bias.zero_()
        return head.to(device=base.weight.device, dtype=base.weight.dtype)
