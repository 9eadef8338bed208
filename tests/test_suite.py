"""taps_cl.scenarios.suite: the offline real tasks load, are shaped right, and caps stratify."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from taps_cl.bases import Preprocessing
from taps_cl.data import prepare
from taps_cl.scenarios import (
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
from taps_cl.scenarios import suite as S


@pytest.fixture(scope="module")
def fmnist_installed() -> None:
    """The Debian files must exist on CI; elsewhere their absence skips (with the fix)."""
    if S._find_fmnist([S.FASHION_MNIST_DIR]) is None:
        reason = (
            f"Fashion-MNIST not in {S.FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _check_raw(ds, channels: int, side: int, classes: int) -> None:
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (channels, side, side)
    assert isinstance(y, int) and 0 <= y < classes
    images, targets = ds.tensors
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    assert float(images.min()) >= 0 and float(images.max()) / scale <= 1.0
    assert float(images.max()) / scale > 0.5  # not accidentally divided twice
    assert targets.dtype == torch.int64 and targets.shape == (len(ds),)


def test_fashion_mnist_full(fmnist_installed):
    spec = fashion_mnist()
    assert (len(spec.train), len(spec.test)) == (60000, 10000)
    assert spec.num_classes == 10 and spec.class_names[0] == "T-shirt/top"
    assert spec.class_names[9] == "Ankle boot"
    _check_raw(spec.train, 1, 28, 10)
    assert spec.train.targets.bincount().tolist() == [6000] * 10
    assert spec.test.targets.bincount().tolist() == [1000] * 10


def test_fashion_mnist_caps_are_stratified_and_seeded(fmnist_installed):
    a = fashion_mnist(max_train=50, max_test=20, seed=1)
    assert a.train.targets.bincount().tolist() == [5] * 10
    assert a.test.targets.bincount().tolist() == [2] * 10
    b = fashion_mnist(max_train=50, max_test=20, seed=1)
    c = fashion_mnist(max_train=50, max_test=20, seed=2)
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)


def test_split_fashion_mnist_remaps_labels(fmnist_installed):
    tasks = split_fashion_mnist(5, max_train=40, max_test=10)
    assert [t.name for t in tasks] == [f"fashion_mnist_{i}" for i in range(5)]
    assert tasks[1].class_names == ["Pullover", "Dress"]
    full = fashion_mnist()
    pullovers = full.train.images[full.train.targets == 2]
    for t in tasks:
        assert t.num_classes == 2 and t.train.targets.bincount().tolist() == [20, 20]
        assert set(t.test.targets.tolist()) == {0, 1}
    # label 0 of task 1 really is a pullover (class 2 of the original)
    first = tasks[1].train.images[tasks[1].train.targets == 0][0]
    assert (pullovers == first).flatten(1).all(1).any()
    assert len(split_fashion_mnist(2, max_train=10)[0].class_names) == 5
    with pytest.raises(ValueError, match="n_tasks must be 1, 2 or 5"):
        split_fashion_mnist(3)


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_fashion_mnist_from_root_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, n, gz in (("train", 30, False), ("t10k", 20, True)):
        _write_idx(raw / f"{stem}-images-idx3-ubyte{'.gz' if gz else ''}",
                   rng.integers(0, 256, (n, 28, 28)), gz)  # fmt: skip
        _write_idx(raw / f"{stem}-labels-idx1-ubyte{'.gz' if gz else ''}", np.arange(n) % 10, gz)
    spec = fashion_mnist(str(tmp_path))
    assert (len(spec.train), len(spec.test)) == (30, 20)
    assert spec.train.targets[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    _check_raw(spec.test, 1, 28, 10)


def test_fashion_mnist_missing_root_says_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path))


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(ValueError, match="not an unsigned-byte idx"):
        S.read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="header says"):
        S.read_idx(tmp_path / "y")


def test_digits():
    spec = digits()
    assert (len(spec.train), len(spec.test)) == (1347, 450)
    assert spec.class_names == [str(i) for i in range(10)]
    _check_raw(spec.train, 1, 8, 10)
    counts = spec.test.targets.bincount()
    assert counts.min() >= 43 and counts.max() <= 46  # stratified 25 %
    capped = digits(max_train=30, max_test=10)
    assert capped.train.targets.bincount().tolist() == [3] * 10
    assert len(capped.test) == 10 and capped.test.targets.unique().numel() == 10


def test_lfw_faces_labels_match_skimage_order():
    from skimage.data import lfw_subset

    raw = torch.from_numpy(np.asarray(lfw_subset())).float()
    spec = lfw_faces()
    assert spec.class_names == ["non-face", "face"] and (len(spec.train), len(spec.test)) == (
        150,
        50,
    )
    _check_raw(spec.train, 1, 25, 2)
    assert spec.train.targets.bincount().tolist() == [75, 75]
    faces = raw[:100].flatten(1)
    for x, y in (spec.train[i] for i in range(0, 150, 7)):
        is_face = bool((faces == x.flatten()).all(1).any())
        assert is_face == (y == 1)
    assert lfw_faces(max_train=4).train.targets.bincount().tolist() == [2, 2]


def test_offline_suite_and_registry(fmnist_installed):
    tasks = offline_suite(max_train=20, max_test=10)
    assert [t.name for t in tasks] == ["fashion_mnist", "digits", "lfw_faces"]
    assert all(len(t.train) == 20 and len(t.test) == 10 for t in tasks)
    assert {"fashion_mnist", "digits", "lfw_faces"} <= set(task_names())
    assert get_task("digits", max_train=10).train.targets.unique().numel() == 10
    with pytest.raises(ValueError, match="unknown task 'cifar'.*digits"):
        get_task("cifar")
    with pytest.raises(ValueError, match="already registered"):
        S.register_task("digits")(digits)


def test_suite_tasks_feed_prepare_fast_path():
    spec = digits(max_train=40)
    td = prepare(spec.train, preprocessing=Preprocessing(input_size=16))
    assert type(td.dataset).__name__ == "_CachedDataset"
    assert td.class_names == spec.class_names and td.num_classes == 10
    assert td.dataset[0][0].shape == (3, 16, 16)


def test_stratified_indices():
    y = np.array([0] * 90 + [1] * 10)
    idx = S.stratified_indices(y, 20, seed=0)
    assert len(idx) == 20 and np.bincount(y[idx]).tolist() == [18, 2]
    assert np.array_equal(idx, np.sort(idx)) and len(set(idx)) == 20
    assert np.bincount(y[S.stratified_indices(y, 2, seed=0)]).tolist() == [1, 1]
    with pytest.raises(ValueError, match="smaller than the 2 classes"):
        S.stratified_indices(y, 1, seed=0)


def _tree(root, task: str, classes: list[str], n: int = 4) -> None:
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            d = root / task / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.full((6 + i, 7, 3), 40 * c + i, dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")


def test_imagefolder_suite(tmp_path):
    _tree(tmp_path, "birds", ["crow", "owl", "wren"])
    _tree(tmp_path, "cars", ["bus", "van"])
    tasks = imagefolder_suite(tmp_path, max_train=6)
    assert [t.name for t in tasks] == ["birds", "cars"]
    assert tasks[0].class_names == ["crow", "owl", "wren"]
    assert tasks[0].train.targets.bincount().tolist() == [2, 2, 2]
    assert len(tasks[0].test) == 12
    x, y = tasks[1].test[5]
    assert x.dtype == torch.float32 and x.shape[0] == 3 and 0 <= x.min() <= x.max() <= 1
    assert y == 1 and abs(float(x.max()) * 255 - 41) < 0.5  # class 1, image 1 of "van"
    td = prepare(tasks[0].train, preprocessing=Preprocessing(input_size=8))
    assert td.num_classes == 3 and td.dataset[0][0].shape == (3, 8, 8)


def test_imagefolder_suite_errors(tmp_path):
    with pytest.raises(ValueError, match="no task folders"):
        imagefolder_suite(tmp_path)
    _tree(tmp_path, "a", ["x", "y"])
    for f in (tmp_path / "a" / "test" / "y").iterdir():
        f.unlink()
    (tmp_path / "a" / "test" / "y").rmdir()
    (tmp_path / "a" / "test" / "z").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a" / "test" / "z" / "0.png")
    with pytest.raises(ValueError, match="test classes .* differ"):
        imagefolder_suite(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        imagefolder_suite(tmp_path / "nope")


def test_taskspec_validates_name():
    ds = digits(max_train=10).train
    with pytest.raises(ValueError, match="letters, digits"):
        TaskSpec("bad name!", ds, ds, ["a", "b"])
    assert TaskSpec("ok_name-1", ds, ds, ["a", "b"]).num_classes == 2


def test_fashion_mnist_found_in_torchvision_layout_under_taps_cl_data(tmp_path, monkeypatch):
    from taps_cl.scenarios import suite

    if not suite.FASHION_MNIST_DIR.is_dir():
        pytest.skip("needs the Debian dataset-fashion-mnist files to copy")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in suite.FASHION_MNIST_DIR.iterdir():
        (raw / f.name).symlink_to(f)
    monkeypatch.setenv("TAPS_CL_DATA", str(tmp_path))
    monkeypatch.setattr(suite, "FASHION_MNIST_DIR", tmp_path / "no-debian-files")
    spec = suite.fashion_mnist(max_train=20, max_test=10)
    assert len(spec.train) == 20 and spec.num_classes == 10
    monkeypatch.setenv("TAPS_CL_DATA", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="TAPS_CL_DATA"):
        suite.fashion_mnist()  # download=False: one message saying how to get the data
