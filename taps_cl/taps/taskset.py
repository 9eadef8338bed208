"""Tasks over per-task modules: the bookkeeping half of :class:`~taps_cl.taps.model.TAPSModel`.

A :class:`TaskSet` keeps one :class:`~taps_cl.taps.task.TaskInfo` per task and the
:class:`~taps_cl.taps.task.TaskModule` s that hold the task's state (subclasses yield them from
:meth:`~TaskSet.task_modules`). Adding, removing and switching a task are loops over
those modules, as Avalanche's ``MultiTaskModule`` routes by task label. Nothing here knows what
the modules compute; the TAPS method (gates, deltas, patches) is the subclass's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from taps_cl.errors import DuplicateTaskError, UnknownTaskError
from taps_cl.taps.patch import validate_task_name
from taps_cl.taps.task import TaskInfo, TaskModule


class TaskSet(nn.Module):
    """Tasks by name, their state in :class:`TaskModule` s, one active task at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._tasks: dict[str, TaskInfo] = {}
        self._active: str | None = None

    def task_modules(self) -> Iterator[tuple[str, TaskModule]]:
        """Every module holding per-task state, with the name its patch tensors use."""
        raise NotImplementedError

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def task_info(self, name: str) -> TaskInfo:
        """The task's :class:`TaskInfo` (the one object every module of the task shares)."""
        if name not in self._tasks:
            raise UnknownTaskError(f"unknown task {name!r}; known tasks: {self.tasks or 'none'}")
        return self._tasks[name]

    def num_classes(self, name: str) -> int:
        return self.task_info(name).num_classes

    def class_names(self, name: str) -> list[str] | None:
        return self.task_info(name).class_names

    def is_frozen(self, name: str) -> bool:
        return self.task_info(name).frozen

    def add_task(
        self, name: str, num_classes: int, class_names: list[str] | None = None, seed: int = 0
    ) -> None:
        """Create the task's state in every task module (all or nothing)."""
        validate_task_name(name)
        if name in self._tasks:
            raise DuplicateTaskError(f"task {name!r} already exists; remove it or pick a new name")
        info = TaskInfo(name, num_classes, class_names, seed)
        try:
            for _, module in self.task_modules():
                module.add_task(info)
            self._check_new_task(name)
        except Exception:
            for _, module in self.task_modules():
                module.remove_task(name)
            raise
        self._tasks[name] = info

    def _check_new_task(self, name: str) -> None:
        """Raise to refuse a task whose state every module has just created."""

    def remove_task(self, name: str) -> None:
        self.task_info(name)
        for _, module in self.task_modules():
            module.remove_task(name)
        del self._tasks[name]

    def set_task(self, name: str | None) -> None:
        """Route every following forward through task ``name`` (None = the plain base)."""
        if name is not None:
            self.task_info(name)
        for _, module in self.task_modules():
            module.active_task = name
        self._active = name

    @property
    def active_task(self) -> str | None:
        return self._active

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        previous = self.active_task
        self.set_task(name)
        try:
            yield
        finally:
            self.set_task(previous)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``; a state_dict holding tasks this model lacks raises a
        ``ValueError`` that says which tasks to add first (tasks are structure, not state)."""
        missing = sorted(_state_tasks(self, state_dict) - set(self._tasks))
        if missing and strict:
            raise ValueError(
                f"the state_dict holds tasks {missing} that this model lacks: add them first "
                f"with model.add_task(name, num_classes) (same names and class counts), then "
                "load_state_dict; tasks finalized before saving are moved with their patch "
                "(export_patch/load_patch) instead"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _state_tasks(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """Task names in ``state_dict`` keys: what follows a per-task container (a dict keyed by
    task, such as ``<layer>.delta.`` or ``<norm>.tasks.``) of one of ``model``'s task modules."""
    containers = {
        f"{path}.{child}." if path else f"{child}."
        for path, module in model.named_modules()
        if isinstance(module, TaskModule)
        for child, sub in module.named_children()
        if isinstance(sub, (nn.ParameterDict, nn.ModuleDict))
    }
    tasks = set()
    for key in state_dict:
        for i, char in enumerate(key):
            if char == "." and key[: i + 1] in containers:
                tasks.add(key[i + 1 :].split(".", 1)[0])
                break
    return tasks
