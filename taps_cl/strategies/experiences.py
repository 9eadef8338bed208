"""What the Avalanche glue reads off experiences and streams (task labels, classes, mode), and
the padding logit every TAPS output uses: shared by the task-label router
(:mod:`~taps_cl.strategies.multitask`), class-incremental mode (:mod:`~taps_cl.strategies.classinc`)
and the baselines (:mod:`~taps_cl.strategies.multihead`)."""

from __future__ import annotations

from typing import Any

# Logit given to the padded columns of a task with fewer classes than the widest task. Finite (so
# that cross-entropy and KL stay finite in fp16) and far below any real logit (so argmax never
# picks a padded class; Avalanche pads with 0, which can beat an all-negative row).
PAD_LOGIT = -1e4


def experience_task_labels(experience: object) -> list[int]:
    """The task labels of an Avalanche experience (new and deprecated benchmark APIs)."""
    labels = getattr(experience, "task_labels", None)
    if labels is None:
        raise ValueError(
            "TAPS needs task labels: build a task-incremental benchmark "
            "(taps_cl.scenarios.as_avalanche_benchmark or avalanche task_incremental_benchmark)"
        )
    return sorted({int(t) for t in labels})


def experience_num_classes(experience: object) -> int:
    """Head size for an experience: its largest class label + 1 (classes start at zero)."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        classes = experience.dataset.targets.uniques  # type: ignore[attr-defined]
    if not classes:
        raise ValueError("experience has no class labels")
    return int(max(classes)) + 1


def detect_mode(experience: Any) -> str:
    """``"task"`` if every experience of the experience's stream holds one task label and the
    labels are distinct, else ``"class"``; without a stream, ``"task"`` (the historic default)."""
    try:
        stream = list(experience.origin_stream)
    except (AttributeError, TypeError):
        return "task"
    labels = [sorted({int(t) for t in getattr(e, "task_labels", None) or []}) for e in stream]
    single = all(len(ls) == 1 for ls in labels)
    distinct = len({ls[0] for ls in labels if ls}) == len(labels)
    return "task" if single and distinct else "class"


def stream_classes(experience: Any) -> list[int]:
    """Global class ids of every experience in the experience's stream (or just its own)."""
    try:
        stream = list(experience.origin_stream)
    except (AttributeError, TypeError):
        stream = [experience]
    return sorted({int(c) for e in stream for c in experience_classes(e)})


def experience_classes(experience: Any) -> list[int]:
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        classes = experience.dataset.targets.uniques
    return sorted(int(c) for c in classes)
