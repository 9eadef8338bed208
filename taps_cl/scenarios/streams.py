"""Class-incremental Avalanche benchmarks from the offline suite: one global label space.

Every experience has task label 0 (nothing tells a model which experience a test image comes
from) and holds global class ids: each dataset of the suite gets its labels offset by the
number of classes before it. Built like :func:`taps_cl.scenarios.avalanche.as_avalanche_benchmark`,
with Avalanche 0.6's non-deprecated API and a classes timeline.

- :func:`split_fashion_mnist_ci`: Split Fashion-MNIST, 5 x 2 (default), 2 x 5 or 10 x 1 classes
  (ids 0..9).
- :func:`split_digits_ci`: split scikit-learn digits, 5 x 2 or 10 x 1 classes (ids 0..9).
- :func:`multi_domain_ci`: Fashion-MNIST (0..9), then digits (10..19), then faces (20..21).
- :func:`class_incremental_from_suite`: any list of ``TaskSpec`` in one label space, one
  experience per task or a fixed number of consecutive classes per experience.
- :func:`nc_benchmark_from_suite`: the same data through Avalanche's own generator
  (``nc_benchmark``), to check that nothing depends on how this module builds its streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.benchmarks.scenarios import CLScenario
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from torch.utils.data import ConcatDataset, Dataset, Subset

from taps_cl.bases import Preprocessing
from taps_cl.data import prepare
from taps_cl.scenarios.avalanche import _targets, classification_dataset


def class_incremental_from_suite(
    suite: Sequence[Any],
    preprocessing: Preprocessing,
    image_size: int | None = None,
    classes_per_experience: int | None = None,
) -> CLScenario:
    """Class-incremental benchmark over the union label space of ``suite`` (``TaskSpec`` list).

    Task ``i``'s labels are offset by the classes of tasks ``0..i-1``. With
    ``classes_per_experience=None`` each task is one experience; otherwise the union's classes
    are cut into consecutive groups of that size (the last may be smaller).
    """
    if not suite:
        raise ValueError("the suite holds no tasks")
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a Preprocessing, got {type(preprocessing)}")
    if classes_per_experience is not None and classes_per_experience < 1:
        raise ValueError(f"classes_per_experience must be >= 1, got {classes_per_experience}")
    parts: dict[str, list[tuple[Any, list[int]]]] = {"train": [], "test": []}
    offset = 0
    for spec in suite:
        for part in ("train", "test"):
            source = getattr(spec, part)
            data = prepare(
                source, preprocessing=preprocessing, image_size=image_size,
                class_names=list(spec.class_names),
            )  # fmt: skip
            targets = [offset + t for t in _targets(source, data.dataset)]
            parts[part].append((Relabelled(data.dataset, targets), targets))
        offset += spec.num_classes
    if classes_per_experience is not None:
        groups = [
            list(range(lo, min(lo + classes_per_experience, offset)))
            for lo in range(0, offset, classes_per_experience)
        ]
        parts = {part: _regroup(items, groups) for part, items in parts.items()}
    bm = benchmark_from_datasets(
        train=[classification_dataset(d, t, 0) for d, t in parts["train"]],
        test=[classification_dataset(d, t, 0) for d, t in parts["test"]],
    )
    return with_classes_timeline(with_task_labels(bm))


def _regroup(
    items: list[tuple[Any, list[int]]], groups: list[list[int]]
) -> list[tuple[Any, list[int]]]:
    """Per-dataset ``(dataset, global targets)`` -> one ``(subset, targets)`` per class group."""
    out = []
    for group in groups:
        wanted, pieces, targets = set(group), [], []
        for dataset, ts in items:
            idx = [i for i, t in enumerate(ts) if t in wanted]
            if idx:
                pieces.append(Subset(dataset, idx))
                targets += [ts[i] for i in idx]
        if not targets:
            raise ValueError(f"classes {group} have no samples")
        out.append((pieces[0] if len(pieces) == 1 else ConcatDataset(pieces), targets))
    return out


class Relabelled(Dataset):
    """Items ``(x, targets[i])`` of a dataset whose own labels are local to its task (Avalanche
    datasets yield the wrapped dataset's items; their ``targets`` attribute does not relabel)."""

    def __init__(self, dataset: Dataset, targets: Sequence[int]) -> None:
        if len(targets) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(targets)} targets for {len(dataset)} samples")  # type: ignore
        self.dataset, self.targets = dataset, [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset[i][0], self.targets[i]


def split_fashion_mnist_ci(
    preprocessing: Preprocessing,
    image_size: int | None = None,
    n_experiences: int = 5,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    root: str | None = None,
) -> CLScenario:
    """Split Fashion-MNIST, class-incremental: ``n_experiences`` (1, 2, 5 or 10) of ``10 / n``
    classes, global ids ``0..9`` (caps per experience, class-balanced).

    With 10 experiences each holds one class: the caps then apply to the whole dataset as
    ``10 x cap`` (Fashion-MNIST is balanced, so each experience gets ``cap`` samples)."""
    from taps_cl.scenarios.suite import fashion_mnist, split_fashion_mnist

    if n_experiences == 10:
        spec = fashion_mnist(root, max_train=_times(max_train, 10), max_test=_times(max_test, 10),
                             seed=seed)  # fmt: skip
        return class_incremental_from_suite([spec], preprocessing, image_size, 1)
    suite = split_fashion_mnist(
        n_experiences, max_train=max_train, max_test=max_test, seed=seed, root=root
    )
    return class_incremental_from_suite(suite, preprocessing, image_size)


def split_digits_ci(
    preprocessing: Preprocessing,
    image_size: int | None = None,
    n_experiences: int = 5,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> CLScenario:
    """Split scikit-learn digits (8x8), class-incremental: ``n_experiences`` (1, 2, 5 or 10) of
    ``10 / n`` consecutive classes, ids ``0..9``; caps per experience (class-balanced)."""
    from taps_cl.scenarios.suite import digits

    if n_experiences not in (1, 2, 5, 10):
        raise ValueError(f"n_experiences must be 1, 2, 5 or 10 (10 classes), got {n_experiences}")
    spec = digits(max_train=_times(max_train, n_experiences),
                  max_test=_times(max_test, n_experiences), seed=seed)  # fmt: skip
    return class_incremental_from_suite([spec], preprocessing, image_size, 10 // n_experiences)


def _times(cap: int | None, n: int) -> int | None:
    return None if cap is None else cap * n


def multi_domain_ci(
    preprocessing: Preprocessing,
    image_size: int | None = None,
    names: Sequence[str] = ("fashion_mnist", "digits", "lfw_faces"),
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> CLScenario:
    """One experience per dataset (default Fashion-MNIST, digits, faces) in one label space
    (ids ``0..9``, ``10..19``, ``20..21``); caps per dataset."""
    from taps_cl.scenarios.suite import offline_suite

    suite = offline_suite(names, max_train=max_train, max_test=max_test, seed=seed)
    return class_incremental_from_suite(suite, preprocessing, image_size)


def class_incremental_from_tensors(
    experiences: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> CLScenario:
    """Class-incremental benchmark from ``(x_train, y_train, x_test, y_test)`` per experience,
    labels already global; inputs used as given (e.g. tiny tensors in tests)."""
    from torch.utils.data import TensorDataset

    if not experiences:
        raise ValueError("need at least one experience")
    bm = benchmark_from_datasets(
        train=[classification_dataset(TensorDataset(xa, ya.long()), ya.tolist(), 0)
               for xa, ya, _, _ in experiences],
        test=[classification_dataset(TensorDataset(xb, yb.long()), yb.tolist(), 0)
              for _, _, xb, yb in experiences],
    )  # fmt: skip
    return with_classes_timeline(with_task_labels(bm))


def nc_benchmark_from_suite(
    suite: Sequence[Any],
    preprocessing: Preprocessing,
    image_size: int | None = None,
    n_experiences: int = 5,
    *,
    seed: int = 0,
    fixed_class_order: Sequence[int] | None = None,
    per_exp_classes: dict[int, int] | None = None,
) -> Any:
    """Avalanche's ``nc_benchmark(..., task_labels=False)`` over the union of ``suite``'s data,
    labels offset as in :func:`class_incremental_from_suite`.

    Avalanche draws the class order from ``seed`` unless ``fixed_class_order`` is given, so an
    experience may own any classes (not consecutive ones): a check that TAPS and its metrics
    read the classes of each experience and assume no order. ``per_exp_classes`` (experience
    -> number of classes) sets uneven experiences, as in ``nc_benchmark``."""
    from avalanche.benchmarks import nc_benchmark

    joined = class_incremental_from_suite(suite, preprocessing, image_size, None)
    data = {}
    for part in ("train", "test"):
        stream = getattr(joined, f"{part}_stream")
        pieces = [Relabelled(e.dataset, list(e.dataset.targets)) for e in stream]
        data[part] = Relabelled(ConcatDataset(pieces), [t for p in pieces for t in p.targets])
    return nc_benchmark(
        data["train"], data["test"], n_experiences, task_labels=False, seed=seed,
        fixed_class_order=None if fixed_class_order is None else list(fixed_class_order),
        per_exp_classes=per_exp_classes,
    )  # fmt: skip
