"""The class-incremental streams of ``class_incremental.py``, built by taps_cl.scenarios or by
Avalanche's own generator (``nc_benchmark``, classes in their natural order) over the same data.

Caps are per experience (class-balanced); the multi-domain stream caps each dataset.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from taps_cl.scenarios.streams import (
    multi_domain_ci,
    nc_benchmark_from_suite,
    split_digits_ci,
    split_fashion_mnist_ci,
)
from taps_cl.scenarios.suite import digits, fashion_mnist, offline_suite

# name -> (dataset, experiences): old keys kept (split_fmnist, multi_domain)
STREAMS = {
    "split_fmnist": ("fashion_mnist", 5),
    "split_fmnist10": ("fashion_mnist", 10),
    "split_digits": ("digits", 5),
    "split_digits10": ("digits", 10),
    "multi_domain": ("multi", 3),
}
GENERATORS = ("taps_cl", "avalanche")


def make_stream(name: str, preprocessing: Any, args: argparse.Namespace) -> Any:
    """Stream ``name`` at ``args.image_size`` with ``args.max_train``/``max_test`` caps."""
    source, n = STREAMS[name]
    caps = dict(max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    size = args.image_size
    if args.generator == "avalanche":
        return _nc_stream(source, n, preprocessing, size, caps)
    builders: dict[str, Callable[[], Any]] = {
        "fashion_mnist": lambda: split_fashion_mnist_ci(preprocessing, size, n, **caps),
        "digits": lambda: split_digits_ci(preprocessing, size, n, **caps),
        "multi": lambda: multi_domain_ci(preprocessing, size, **caps),
    }
    return builders[source]()


def _nc_stream(source: str, n: int, preprocessing: Any, size: int, caps: dict) -> Any:
    seed = caps.pop("seed")
    if source == "multi":
        suite = offline_suite(max_train=caps["max_train"], max_test=caps["max_test"], seed=seed)
        sizes = [s.num_classes for s in suite]
        order = list(range(sum(sizes)))
        return nc_benchmark_from_suite(suite, preprocessing, size, len(sizes), seed=seed,
                                       fixed_class_order=order,
                                       per_exp_classes=dict(enumerate(sizes)))  # fmt: skip
    total = {k: None if v is None else v * n for k, v in caps.items()}
    spec = (
        fashion_mnist(**total, seed=seed)
        if source == "fashion_mnist"
        else digits(**total, seed=seed)
    )
    return nc_benchmark_from_suite([spec], preprocessing, size, n, seed=seed,
                                   fixed_class_order=list(range(10)))  # fmt: skip


def num_classes(bench: Any) -> int:
    return 1 + max(int(c) for e in bench.train_stream for c in e.classes_in_this_experience)


def batches(dataset: Any, size: int = 128):
    """``(x, y)`` minibatches of an Avalanche dataset, in order."""
    for x, y, *_ in DataLoader(dataset, batch_size=size, shuffle=False):
        yield x, y


def tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dataset as ``(x, y)`` tensors (capped streams are small)."""
    xs, ys = zip(*batches(dataset), strict=True)
    return torch.cat(xs), torch.cat(ys)


def owners(bench: Any) -> dict[int, int]:
    """Global class id -> the experience that introduces it."""
    return {int(c): j for j, e in enumerate(bench.train_stream)
            for c in e.classes_in_this_experience}  # fmt: skip
