"""Task suites (offline real data, ImageFolder trees) and Avalanche benchmarks built from them.

An integration (offline data, Avalanche benchmarks). May import the foundation and Avalanche;
nothing in the library below the CLI imports it.
"""

from taps_cl.scenarios.suite import (
    FolderImages,
    ImageTensorDataset,
    TaskSpec,
    digits,
    fashion_mnist,
    get_task,
    imagefolder_suite,
    lfw_faces,
    offline_suite,
    split_fashion_mnist,
    task_names,
)

__all__ = [
    "FolderImages",
    "ImageTensorDataset",
    "TaskSpec",
    "digits",
    "fashion_mnist",
    "get_task",
    "imagefolder_suite",
    "lfw_faces",
    "offline_suite",
    "split_fashion_mnist",
    "task_names",
]

_AVALANCHE = (
    "as_avalanche_benchmark",
    "benchmark_from_tensors",
    "split_fashion_mnist_benchmark",
    "task_classes",
    "task_label_names",
)
_CLASS_INCREMENTAL = (
    "class_incremental_from_suite",
    "class_incremental_from_tensors",
    "multi_domain_ci",
    "nc_benchmark_from_suite",
    "split_digits_ci",
    "split_fashion_mnist_ci",
)
__all__ += list(_AVALANCHE) + list(_CLASS_INCREMENTAL)


def __getattr__(name: str):
    # Avalanche takes seconds to import; load it only when its benchmarks are asked for.
    if name in _AVALANCHE:
        from taps_cl.scenarios import avalanche

        return getattr(avalanche, name)
    if name in _CLASS_INCREMENTAL:
        from taps_cl.scenarios import streams

        return getattr(streams, name)
    raise AttributeError(f"module 'taps_cl.scenarios' has no attribute {name!r}")
