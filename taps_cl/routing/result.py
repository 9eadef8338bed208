"""What a router returns per input, and the checks and helpers every routing method shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RouteResult:
    """Per-input routing decisions; ``scores`` columns follow ``tasks``."""

    tasks: tuple[str, ...]  # candidate task names (column order of ``scores``)
    task_index: torch.Tensor  # int64 [n]: chosen column of ``tasks``
    class_index: torch.Tensor  # int64 [n]: class within the chosen task
    confidence: torch.Tensor  # float64 [n]: softmax probability of the chosen task's score
    scores: torch.Tensor  # float64 [n, T]: task scores (-inf where a task was not evaluated)

    @property
    def task_names(self) -> list[str]:
        return [self.tasks[i] for i in self.task_index.tolist()]

    def groups(self) -> dict[str, torch.Tensor]:
        """Task name -> indices of the inputs routed to it (only tasks that got inputs)."""
        return {
            self.tasks[t]: (self.task_index == t).nonzero().flatten()
            for t in self.task_index.unique().tolist()
        }


def route_result(
    tasks: tuple[str, ...], scores: torch.Tensor, within: torch.Tensor, scale: float
) -> RouteResult:
    chosen = scores.argmax(1)
    probs = torch.softmax(scores * scale, dim=1)
    confidence = probs.gather(1, chosen[:, None]).squeeze(1)
    return RouteResult(tasks, chosen, within, confidence, scores)


def checked_features(features: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``features`` as float64 CPU ``[n, dim]``, or a ``ValueError`` saying what is wrong."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(
            f"features must be a [n, d] tensor, got {getattr(features, 'shape', features)}"
        )
    if features.shape[0] == 0:
        raise ValueError("no inputs to route (features has 0 rows)")
    if features.shape[1] != dim:
        raise ValueError(f"features have d={features.shape[1]}, the tasks' statistics d={dim}")
    z = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(z).all():
        raise ValueError("features contain NaN or inf")
    return z
