"""Task suites (offline real data, ImageFolder trees) and, later, Avalanche benchmarks."""

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
from taps_cl.scenarios.avalanche import (  # noqa: E402, F401
    as_avalanche_benchmark,
    benchmark_from_tensors,
    split_fashion_mnist_benchmark,
    task_classes,
    task_label_names,
)
