"""Task scores from class scores, shared by every task-free router.

A router scores every class of every task on one base feature; a task's score is a reduction of
its classes' scores (``max`` or ``logsumexp``, optionally at a temperature), and the likelihood-
ratio form of TPL (Lin et al., ICLR 2024) compares a task against all the others:
``log p(z | t) - log p(z | not t)``. With one shared covariance the likelihood ratio is a monotone
function of the task's posterior, so it chooses the same task as ``logsumexp`` and differs only
in its confidence (measured; see ``benchmarks/research/FINDINGS.md``).
"""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("max", "logsumexp", "ratio")


def task_index(classes_per_task: list[int]) -> torch.Tensor:
    """Task of each class column, for tasks holding ``classes_per_task[i]`` consecutive columns."""
    if not classes_per_task or any(int(c) < 1 for c in classes_per_task):
        raise ValueError(f"every task needs >= 1 class, got {classes_per_task}")
    return torch.repeat_interleave(
        torch.arange(len(classes_per_task)), torch.tensor(classes_per_task)
    )


def reduce_scores(
    class_scores: torch.Tensor,
    task_of: torch.Tensor,
    reduce: str = "logsumexp",
    scale: float = 1.0,
) -> torch.Tensor:
    """Task scores ``[n, T]`` from class scores ``[n, K]`` and the task of each column ``[K]``.

    ``"max"``: best class; ``"logsumexp"``: ``log sum exp(scale * s) / scale`` over the task's
    classes; ``"ratio"``: ``logsumexp`` over the task minus ``logsumexp`` over all other tasks'
    classes (TPL's likelihood ratio when the scores are log-likelihoods)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if class_scores.ndim != 2 or task_of.shape != (class_scores.shape[1],):
        raise ValueError(f"class scores [n, K] and task_of [K] needed: {class_scores.shape}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    s = class_scores.to(torch.float64) * scale
    n, num_tasks = s.shape[0], int(task_of.max()) + 1
    index = task_of.to(torch.int64).expand(n, -1)
    empty = torch.full((n, num_tasks), -math.inf, dtype=torch.float64)
    peak = empty.scatter_reduce(1, index, s, "amax")
    if reduce == "max":
        return peak / scale
    summed = torch.zeros_like(empty).scatter_add(1, index, (s - peak.gather(1, index)).exp())
    inside = peak + summed.log()
    if reduce == "logsumexp":
        return inside / scale
    total = torch.logsumexp(s, dim=1, keepdim=True)
    outside = total + torch.log1p(-torch.exp(inside - total).clamp(max=1 - 1e-15))
    return (inside - outside) / scale


def task_accuracy(task_scores: torch.Tensor, true_task: torch.Tensor) -> float:
    """Share of rows whose highest-scoring task is ``true_task``."""
    if task_scores.shape[0] != true_task.shape[0]:
        raise ValueError("one true task per row is needed")
    return float((task_scores.argmax(1) == true_task.to(torch.int64)).double().mean())
