"""Task suites as task-incremental Avalanche benchmarks: structure, labels, preprocessing."""

from __future__ import annotations

import pytest
import torch

from taps_cl.bases import Preprocessing
from taps_cl.data import preprocess
from taps_cl.scenarios.avalanche import (
    as_avalanche_benchmark,
    benchmark_from_tensors,
    split_fashion_mnist_benchmark,
    task_classes,
    task_label_names,
)
from taps_cl.scenarios.suite import FASHION_MNIST_DIR, ImageTensorDataset, TaskSpec

PREP = Preprocessing(input_size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def spec(name: str, classes: int, channels: int, size: int, seed: int) -> TaskSpec:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in (10, 6):
        images = torch.rand(n, channels, size, size, generator=g)
        targets = torch.arange(n) % classes
        parts.append(ImageTensorDataset(images, targets, [f"c{i}" for i in range(classes)]))
    return TaskSpec(name, parts[0], parts[1], [f"c{i}" for i in range(classes)])


@pytest.fixture(scope="module")
def suite():
    # grey 12 px, RGB 20 px, grey 8 px: different sizes and channels, one base input
    return [spec("grey", 3, 1, 12, 0), spec("rgb", 2, 3, 20, 1), spec("tiny", 4, 1, 8, 2)]


def test_one_experience_per_task_with_task_labels_and_classes_from_zero(suite):
    bm = as_avalanche_benchmark(suite, PREP, image_size=16)
    assert len(bm.train_stream) == len(bm.test_stream) == 3
    for i, (train, test) in enumerate(zip(bm.train_stream, bm.test_stream, strict=True)):
        assert train.current_experience == test.current_experience == i
        assert train.task_label == test.task_label == i
        assert list(train.task_labels) == [i]
        assert set(train.classes_in_this_experience) == set(range(suite[i].num_classes))
        assert len(train.dataset) == 10 and len(test.dataset) == 6
    assert task_classes(bm) == {0: 3, 1: 2, 2: 4}
    assert task_label_names(suite) == {0: "grey", 1: "rgb", 2: "tiny"}


def test_images_reach_the_model_preprocessed_for_the_base(suite):
    bm = as_avalanche_benchmark(suite, PREP, image_size=16)
    for exp, task in zip(bm.test_stream, suite, strict=True):
        x, y, t = exp.dataset[3]
        raw, label = task.test[3]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert torch.allclose(x, preprocess(raw, PREP, 16)[0], atol=1e-6)
        assert int(y) == label and int(t) == exp.task_label
    # image_size=None uses the base's own input size
    bm = as_avalanche_benchmark(suite[:1], PREP)
    assert bm.train_stream[0].dataset[0][0].shape == (3, 24, 24)


def test_minibatches_carry_task_labels_for_multitask_models(suite):
    bm = as_avalanche_benchmark(suite, PREP, image_size=16)
    loader = torch.utils.data.DataLoader(bm.train_stream[2].dataset, batch_size=4)
    x, y, t = next(iter(loader))
    assert x.shape == (4, 3, 16, 16) and (t == 2).all() and y.max() < 4


def test_invalid_input_is_refused(suite):
    with pytest.raises(ValueError, match="no tasks"):
        as_avalanche_benchmark([], PREP)
    with pytest.raises(TypeError, match="Preprocessing"):
        as_avalanche_benchmark(suite, preprocessing="imagenet")
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="as many train as test"):
        from taps_cl.scenarios.avalanche import benchmark_from_task_datasets

        benchmark_from_task_datasets([(torch.utils.data.TensorDataset(x, y), y.tolist())], [])
    bm = benchmark_from_tensors([(x, y, x, y)])
    assert bm.train_stream[0].task_label == 0


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist absent")
def test_split_fashion_mnist_is_five_two_class_tasks():
    bm = split_fashion_mnist_benchmark(PREP, image_size=16, n_tasks=5, max_train=20, max_test=10)
    assert len(bm.train_stream) == 5
    for i, exp in enumerate(bm.train_stream):
        assert exp.task_label == i and set(exp.classes_in_this_experience) == {0, 1}
        assert exp.dataset[0][0].shape == (3, 16, 16)  # grey -> 3 channels
