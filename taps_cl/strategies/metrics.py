"""Task identification as an Avalanche metric, and the calibration error of routed confidences.

In class-incremental mode the TAPS strategy routes every evaluation input to one trained task
(:class:`~taps_cl.strategies.classinc.ClassIncremental`). Accuracy mixes two errors: the wrong
task, and the wrong class within the right task. Task identification isolates the first: the
share of evaluation samples routed to the task that owns their class. Reporting it beside
accuracy says whether a loss is the router's or the patches'.

    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from taps_cl.strategies.metrics import task_id_metrics

    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        task_id_metrics(experience=True, stream=True),
        loggers=[InteractiveLogger()],
    )

Names, as Avalanche's accuracy (and with the same ``Task000`` / ``Exp000`` parts):
``TaskIdentification_Exp/eval_phase/test_stream/Task000/Exp000`` and
``TaskIdentification_Stream/eval_phase/test_stream/Task000``.

Only samples whose class some trained task owns count: an experience whose classes were not
trained yet has no right answer, so it emits no value (its accuracy is 0 by construction). In
task-incremental mode the task label chooses the task, nothing is identified, and the metric
emits nothing. With any strategy other than TAPS it raises ``TypeError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.evaluation import GenericPluginMetric, Metric, PluginMetric

EXP_NAME = "TaskIdentification_Exp"
STREAM_NAME = "TaskIdentification_Stream"


class TaskIdentification(Metric[float | None]):
    """Running share of samples whose routed task is the task that owns their class."""

    def __init__(self) -> None:
        self.right = 0
        self.total = 0

    def update(self, routed: Sequence[str], owners: Sequence[str | None]) -> None:
        """Count one minibatch: ``routed[i]`` the chosen task of sample ``i``, ``owners[i]`` the
        task owning its class (``None``: no trained task owns it; the sample is not counted)."""
        if len(routed) != len(owners):
            raise ValueError(f"{len(routed)} routed tasks for {len(owners)} samples")
        pairs = [(r, o) for r, o in zip(routed, owners, strict=True) if o is not None]
        self.right += sum(r == o for r, o in pairs)
        self.total += len(pairs)

    def result(self) -> float | None:
        return self.right / self.total if self.total else None

    def reset(self) -> None:
        self.right = self.total = 0


def _class_space(strategy: Any) -> Any:
    """The strategy's class-incremental state (``None`` in task-incremental mode)."""
    router = getattr(strategy, "router", None)
    if router is None or not hasattr(router, "classinc"):
        raise TypeError(
            "task identification reads the routing of the TAPS strategy "
            f"(taps_cl.strategies.TAPS); {type(strategy).__name__} does not route"
        )
    return router.classinc


def owners_of(classes: dict[str, torch.Tensor], targets: torch.Tensor) -> list[str | None]:
    """The task owning each global class id of ``targets`` (``None`` if no task owns it)."""
    owner = {int(c): name for name, ids in classes.items() for c in ids.tolist()}
    return [owner.get(int(t)) for t in targets.tolist()]


class TaskIdentificationPluginMetric(GenericPluginMetric[float | None, TaskIdentification]):
    """Task identification over the evaluation minibatches between a reset and an emission.

    The routing of a minibatch is the strategy's ``router.classinc.last_route``, set by the
    evaluation forward. A minibatch whose forward did not route (a periodic evaluation while a
    task trains: the training task answers) is not counted."""

    def __init__(self, reset_at: str, emit_at: str) -> None:
        super().__init__(TaskIdentification(), reset_at=reset_at, emit_at=emit_at, mode="eval")
        self._before: Any = None

    def before_eval_iteration(self, strategy: Any) -> Any:
        space = _class_space(strategy)
        self._before = None if space is None else space.last_route
        return super().before_eval_iteration(strategy)

    def update(self, strategy: Any) -> None:
        space = _class_space(strategy)
        route = None if space is None else space.last_route
        if route is None or route is self._before:
            return
        targets = strategy.mb_y
        if len(route.task_index) != len(targets):
            raise ValueError(
                f"the last routing covers {len(route.task_index)} inputs, the minibatch "
                f"{len(targets)}: was the model called outside the strategy's evaluation?"
            )
        self._metric.update(route.task_names, owners_of(space.classes, targets))

    def _package_result(self, strategy: Any) -> Any:
        if self.result() is None:  # nothing this metric can score was evaluated
            return None
        return super()._package_result(strategy)


class ExperienceTaskIdentification(TaskIdentificationPluginMetric):
    """Task identification of each evaluated experience."""

    def __init__(self) -> None:
        super().__init__(reset_at="experience", emit_at="experience")

    def __str__(self) -> str:
        return EXP_NAME


class StreamTaskIdentification(TaskIdentificationPluginMetric):
    """Task identification over the whole evaluated stream."""

    def __init__(self) -> None:
        super().__init__(reset_at="stream", emit_at="stream")

    def __str__(self) -> str:
        return STREAM_NAME


def task_id_metrics(*, experience: bool = False, stream: bool = False) -> list[PluginMetric]:
    """Task-identification plugin metrics, as Avalanche's ``accuracy_metrics``: per evaluated
    experience and/or over the evaluated stream. Pass the list to ``EvaluationPlugin``."""
    out: list[PluginMetric] = []
    if experience:
        out.append(ExperienceTaskIdentification())
    if stream:
        out.append(StreamTaskIdentification())
    if not out:
        raise ValueError("task_id_metrics needs experience=True and/or stream=True")
    return out


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15
) -> float:
    """Expected calibration error: the sample-weighted mean, over ``bins`` equal-width
    confidence bins, of |accuracy - mean confidence| (Guo et al. 2017). A router whose
    confidence says 0.9 should be right 9 times in 10; this is how far it is from that."""
    conf = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    hit = torch.as_tensor(correct).flatten().to(torch.float64)
    if conf.numel() == 0 or conf.shape != hit.shape:
        raise ValueError(f"need as many confidences as outcomes (> 0), got {conf.shape}, "
                         f"{hit.shape}")  # fmt: skip
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidences must lie in [0, 1]")
    which = (conf * bins).ceil().clamp(1, bins).long() - 1  # (0, 1/b] -> bin 0, as Guo et al.
    total = 0.0
    for b in which.unique().tolist():
        sel = which == b
        total += float(sel.sum()) * abs(float(hit[sel].mean()) - float(conf[sel].mean()))
    return total / conf.numel()
