"""TAPSRouter: a :class:`TAPSModel` seen through Avalanche's ``MultiTaskModule`` contract.

Avalanche calls ``model(x, task_labels)`` with one integer task label per sample, possibly mixed
within a minibatch (replay, joint evaluation). The router maps each label to a TAPS task name and
runs that task's patch on its samples, padding the logits of tasks with fewer classes (as
``MultiTaskModule.forward`` does). Unlike Avalanche's ``MultiHeadClassifier`` it never invents an
untrained head: a label whose experience was never trained raises :class:`UnknownTaskError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from avalanche.models import MultiTaskModule

from taps_cl.errors import UnknownTaskError
from taps_cl.strategies.experiences import (
    PAD_LOGIT,
    experience_classes,
    experience_num_classes,
    experience_task_labels,
)
from taps_cl.taps.model import TAPSModel


class ClassSpace(Protocol):
    """What the router needs of class-incremental mode (the global class space and its
    forward; :class:`~taps_cl.strategies.classinc.ClassIncremental` is the implementation)."""

    width: int

    def begin(self, name: str, classes: Iterable[int]) -> None: ...

    def see(self, classes: Iterable[int]) -> None: ...

    def forward(self, taps: TAPSModel, x: torch.Tensor, training_task: str | None) -> Any: ...


class TAPSRouter(MultiTaskModule):
    """Routes Avalanche task labels to the tasks of a :class:`TAPSModel`."""

    def __init__(self, taps: TAPSModel, task_names: Mapping[int, str] | None = None) -> None:
        super().__init__()
        if not isinstance(taps, TAPSModel):
            raise TypeError(f"TAPSRouter wraps a TAPSModel, got {type(taps).__name__}")
        self.taps = taps
        self.task_names: dict[int, str] = {int(k): v for k, v in (task_names or {}).items()}
        self.started: set[int] = set()  # labels whose training began (or loaded from patches)
        self.training_label: int | None = None  # the label of the experience being trained
        self.training_task: str | None = None  # the TAPS task being trained (both modes)
        # Class-incremental state (global class ids per task, route statistics, task router);
        # None in task-incremental mode, where task labels pick the task.
        self.classinc: ClassSpace | None = None

    # -- labels and tasks --------------------------------------------------------------------

    def task_name(self, label: int) -> str:
        """The TAPS task name of an Avalanche task label (``task<label>`` unless named)."""
        return self.task_names.get(int(label), f"task{int(label)}")

    def has_task(self, label: int) -> bool:
        return self.task_name(label) in self.taps.tasks

    def add_task(
        self, label: int, num_classes: int, class_names: list[str] | None = None, seed: int = 0
    ) -> None:
        """Create the task's per-task parameters now (e.g. all tasks before DDP wrapping)."""
        self.taps.add_task(self.task_name(label), num_classes, class_names, seed=seed)
        self.max_class_label = max(self.max_class_label, num_classes)

    def mark_trained(self, labels: Iterable[int]) -> None:
        """Declare tasks usable for evaluation (e.g. after loading their patches)."""
        for label in labels:
            if not self.has_task(label):
                raise UnknownTaskError(f"task label {label} has no TAPS task to mark as trained")
            self.started.add(int(label))
            self.known_train_tasks_labels.add(int(label))

    def begin_training(self, label: int, num_classes: int, seed: int = 0) -> str:
        """Create (or reuse a pre-created, untrained) task for ``label``; return its name."""
        name = self.task_name(label)
        if label in self.started:
            raise ValueError(
                f"task label {label} ({name!r}) was already trained; TAPS learns each task once "
                "and never changes it afterwards. Give the new data a new task label."
            )
        if not self.has_task(label):
            self.add_task(label, num_classes, seed=seed)
        elif self.taps.num_classes(name) < num_classes:
            raise ValueError(
                f"task {name!r} was created with {self.taps.num_classes(name)} classes but its "
                f"experience has labels up to {num_classes - 1}"
            )
        self.started.add(int(label))
        self.known_train_tasks_labels.add(int(label))
        self.training_label = int(label)
        self.training_task = name
        return name

    def begin_class_task(self, name: str, classes: Iterable[int], seed: int = 0) -> str:
        """Class-incremental: create task ``name`` owning the global ``classes``."""
        if self.classinc is None:
            raise ValueError("begin_class_task needs class-incremental mode (router.classinc)")
        if name in self.taps.tasks:
            raise ValueError(f"task {name!r} was already trained; TAPS learns each experience once")
        classes = sorted({int(c) for c in classes})
        self.taps.add_task(name, len(classes), seed=seed)
        self.classinc.begin(name, classes)
        self.max_class_label = max(self.max_class_label, self.classinc.width)
        self.training_task = name
        return name

    def check_trained(self, labels: Iterable[int]) -> None:
        missing = sorted({int(t) for t in labels} - self.started)
        if missing:
            raise UnknownTaskError(
                f"task label(s) {missing} were never trained by this TAPS model (trained: "
                f"{sorted(self.started) or 'none'}); evaluate only experiences seen so far, e.g. "
                "strategy.eval(test_stream[: i + 1])"
            )

    # -- Avalanche hooks ---------------------------------------------------------------------

    def adaptation(self, experience: object) -> None:
        """Avalanche calls this before each train/eval experience: only check in eval; the
        strategy creates tasks itself (so that it, not Avalanche, owns when parameters appear)."""
        if self.classinc is not None:  # task labels carry nothing: widen to its classes
            self.classinc.see(experience_classes(experience))
        elif not self.training:
            self.check_trained(experience_task_labels(experience))

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None) -> torch.Tensor:
        if self.classinc is not None:  # class-incremental: global logits, task labels ignored
            task = self.training_task if self.training else None
            return self.classinc.forward(self.taps, x, task)
        if task_labels is None:
            return self.forward_all_tasks(x)
        if isinstance(task_labels, int):
            return self.forward_single_task(x, task_labels)
        labels = task_labels.to(x.device).long()
        unique = torch.unique(labels).tolist()
        if len(unique) == 1:
            return self.forward_single_task(x, unique[0])
        self.check_trained(unique)
        width = max(self.taps.num_classes(self.task_name(t)) for t in unique)
        out: torch.Tensor | None = None
        for task in unique:
            mask = labels == task
            logits = self.forward_single_task(x[mask], task)
            if out is None:
                out = x.new_full((x.shape[0], width), PAD_LOGIT, dtype=logits.dtype)
            out[mask, : logits.shape[1]] = logits
        return out

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        self.check_trained([task_label])
        return self.taps(x, task=self.task_name(task_label))

    def forward_all_tasks(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {t: self.forward_single_task(x, t) for t in sorted(self.started)}


__all__ = [
    "PAD_LOGIT",
    "ClassSpace",
    "TAPSRouter",
    "experience_num_classes",
    "experience_task_labels",
]
