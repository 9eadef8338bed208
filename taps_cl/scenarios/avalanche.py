"""Task suites as task-incremental Avalanche benchmarks.

One experience per task, task labels ``0..N-1``, class labels from zero within each experience,
images preprocessed for the base (resize + normalise, grey -> 3 channels) by
:func:`taps_cl.data.prepare`. Built with Avalanche 0.6's non-deprecated API
(``benchmark_from_datasets`` + ``with_task_labels`` + ``with_classes_timeline``): the classes
timeline is what multi-head models (``MultiHeadClassifier``, ``MultiTaskModule.adaptation``)
read, and without it they fail on the new API. No deprecated generator is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.benchmarks.scenarios import CLScenario
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils import (
    ConstantSequence,
    DataAttribute,
    TaskAwareSupervisedClassificationDataset,
    TaskLabels,
)
from torch.utils.data import Dataset, TensorDataset

from taps_cl.bases import Preprocessing
from taps_cl.data import prepare


def classification_dataset(
    data: Dataset, targets: Sequence[int], task_label: int
) -> TaskAwareSupervisedClassificationDataset:
    """An Avalanche dataset yielding ``(x, y, task_label)`` with ``targets`` as its class labels."""
    targets = [int(t) for t in targets]
    if len(targets) != len(data):  # type: ignore[arg-type]
        raise ValueError(f"{len(targets)} targets for {len(data)} samples")  # type: ignore
    if not targets:
        raise ValueError("an experience needs at least one sample")
    # Task-aware (not plain ClassificationDataset): LwF and others read ``dataset.task_set``.
    return TaskAwareSupervisedClassificationDataset(
        [data],
        data_attributes=[
            DataAttribute(targets, "targets"),
            TaskLabels(ConstantSequence(int(task_label), len(targets))),
        ],
    )


def benchmark_from_task_datasets(
    train: Sequence[tuple[Dataset, Sequence[int]]],
    test: Sequence[tuple[Dataset, Sequence[int]]],
) -> CLScenario:
    """Task-incremental benchmark from per-task ``(dataset, targets)`` pairs (task i = label i)."""
    if len(train) != len(test) or not train:
        raise ValueError(
            f"need as many train as test tasks (at least one), got {len(train)} and {len(test)}"
        )
    bm = benchmark_from_datasets(
        train=[classification_dataset(d, t, i) for i, (d, t) in enumerate(train)],
        test=[classification_dataset(d, t, i) for i, (d, t) in enumerate(test)],
    )
    return with_classes_timeline(with_task_labels(bm))


def benchmark_from_tensors(
    tasks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> CLScenario:
    """Task-incremental benchmark from ``(x_train, y_train, x_test, y_test)`` per task; inputs
    are used as given (already preprocessed), e.g. for tests with tiny tensors."""
    train = [(TensorDataset(xa, ya.long()), ya.tolist()) for xa, ya, _, _ in tasks]
    test = [(TensorDataset(xb, yb.long()), yb.tolist()) for _, _, xb, yb in tasks]
    return benchmark_from_task_datasets(train, test)


def as_avalanche_benchmark(
    suite: Sequence[Any], preprocessing: Preprocessing, image_size: int | None = None
) -> CLScenario:
    """Task-incremental benchmark from a ``list[TaskSpec]`` (offline or ImageFolder suite).

    Every image is preprocessed for the base (``preprocessing``, at ``image_size`` or the base's
    own size). The task names stay with the suite: pass ``task_label_names(suite)`` to the strategy.
    """
    if not suite:
        raise ValueError("the suite holds no tasks")
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a Preprocessing, got {type(preprocessing)}")
    train, test = [], []
    for spec in suite:
        for part, out in ((spec.train, train), (spec.test, test)):
            data = prepare(
                part,
                preprocessing=preprocessing,
                image_size=image_size,
                class_names=list(spec.class_names),
            )
            out.append((data.dataset, _targets(part, data.dataset)))
    return benchmark_from_task_datasets(train, test)


def split_fashion_mnist_benchmark(
    preprocessing: Preprocessing, image_size: int | None = None, n_tasks: int = 5, **kw: Any
) -> CLScenario:
    """Fashion-MNIST split into ``n_tasks`` tasks of ``10 / n_tasks`` classes, task-incremental
    (``kw`` goes to :func:`taps_cl.scenarios.suite.split_fashion_mnist`: caps, seed, root)."""
    from taps_cl.scenarios.suite import split_fashion_mnist

    return as_avalanche_benchmark(split_fashion_mnist(n_tasks, **kw), preprocessing, image_size)


def task_label_names(suite: Sequence[Any]) -> dict[int, str]:
    """Task label -> task name, for ``TAPS(task_names=...)`` and the TaskStore."""
    return {i: spec.name for i, spec in enumerate(suite)}


def task_classes(benchmark: CLScenario) -> dict[int, int]:
    """Task label -> number of classes over the train stream (``TAPS(tasks=...)`` creates every
    task's parameters up front, e.g. before wrapping the model for distributed training)."""
    out: dict[int, int] = {}
    for exp in benchmark.train_stream:
        n = int(max(exp.classes_in_this_experience)) + 1
        for label in exp.task_labels:
            out[int(label)] = max(out.get(int(label), 0), n)
    return out


def _targets(source: Any, prepared: Dataset) -> list[int]:
    targets = getattr(source, "targets", None)
    if targets is None:
        targets = getattr(prepared, "targets", None)
    if targets is None:  # no label array: read the items (loads the images once)
        targets = [int(prepared[i][1]) for i in range(len(prepared))]  # type: ignore[arg-type]
    if isinstance(targets, torch.Tensor):
        return targets.long().tolist()
    return [int(t) for t in targets]
