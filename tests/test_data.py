"""taps_cl.data: every accepted input kind, the shared preprocessing, and every bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from taps_cl import data as D
from taps_cl import images as P
from taps_cl.bases import Preprocessing
from taps_cl.data import DataError, TaskData, prepare, preprocess

PREP = Preprocessing(input_size=12, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
N, K = 12, 3


def _images(n: int = N, c: int = 3, size: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


LABELS = torch.arange(N) % K


class ListDataset(Dataset):
    """A plain dataset without .targets (prepare iterates it once)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def _folder(tmp_path, x: torch.Tensor) -> str:
    names = ["cat", "dog", "eel"]  # sorted, so ImageFolder's labels equal LABELS
    for i, (img, y) in enumerate(zip(x, LABELS, strict=True)):
        (tmp_path / names[y]).mkdir(exist_ok=True)
        _pil(img).save(tmp_path / names[y] / f"{i:03d}.png")
    return str(tmp_path)


# each row: input kind -> (data to pass, raw images in label order matching LABELS' multiset)
KINDS = {
    "tensor_pair": lambda x, tmp: (x, LABELS),
    "numpy_pair_nhwc_uint8": lambda x, tmp: (_u8(x).permute(0, 2, 3, 1).numpy(), LABELS.numpy()),
    "list_labels": lambda x, tmp: (x, LABELS.tolist()),
    "list_of_images": lambda x, tmp: (list(x), LABELS),
    "tensor_dataset": lambda x, tmp: TensorDataset(x, LABELS),
    "dataset_of_tensors": lambda x, tmp: ListDataset(
        [(a, int(b)) for a, b in zip(x, LABELS, strict=True)]
    ),
    "dataset_of_pil": lambda x, tmp: ListDataset(
        [(_pil(a), b) for a, b in zip(x, LABELS, strict=True)]
    ),
    "dataset_of_ndarrays": lambda x, tmp: ListDataset(
        [(a.numpy(), np.int64(b)) for a, b in zip(x, LABELS, strict=True)]
    ),
    "avalanche_style_3_tuples": lambda x, tmp: ListDataset(
        [(a, b, 0) for a, b in zip(x, LABELS, strict=True)]
    ),
    "imagefolder_path": lambda x, tmp: _folder(tmp, x),
}


QUANTISED = {"numpy_pair_nhwc_uint8", "dataset_of_pil", "imagefolder_path"}  # stored as 8 bit


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_prepare_accepts(kind, tmp_path):
    x = _images()
    td = prepare(KINDS[kind](x, tmp_path), preprocessing=PREP)
    assert isinstance(td, TaskData) and len(td) == N and td.num_classes == K
    xs, ys = zip(*(td.dataset[i] for i in range(N)), strict=True)
    assert all(a.shape == (3, 12, 12) and a.dtype == torch.float32 for a in xs)
    assert all(b.dim() == 0 and b.dtype == torch.int64 for b in ys)
    assert sorted(int(b) for b in ys) == sorted(LABELS.tolist())
    if kind == "imagefolder_path":
        assert td.class_names == ["cat", "dog", "eel"]
        order = [int(Path(p).stem) for p, _ in td.dataset.source.samples]
        x = x[order]
    # every kind gives exactly what preprocess() gives for the same image
    expected = preprocess(_u8(x) if kind in QUANTISED else x, PREP)
    assert torch.allclose(torch.stack(xs), expected, atol=1e-5)


def test_real_avalanche_datasets_yield_xy():
    from avalanche.benchmarks.utils import (
        _make_taskaware_classification_dataset,
        as_taskaware_classification_dataset,
    )

    x = _images()
    for ds in (
        _make_taskaware_classification_dataset(TensorDataset(x, LABELS), task_labels=0),
        as_taskaware_classification_dataset(TensorDataset(x, LABELS)),
    ):
        td = prepare(ds, preprocessing=PREP)
        assert td.num_classes == K and len(td) == N
        assert int(td.dataset[4][1]) == int(LABELS[4])
        assert torch.allclose(td.dataset[4][0], preprocess(x[4], PREP)[0], atol=1e-6)


def test_class_names_from_argument_and_from_dataset_classes():
    td = prepare((_images(), LABELS), preprocessing=PREP, class_names=["a", "b", "c"])
    assert td.class_names == ["a", "b", "c"] and td.num_classes == 3
    ds = ListDataset([(a, int(b)) for a, b in zip(_images(), LABELS, strict=True)])
    ds.classes = ["x", "y", "z", "w"]
    td = prepare(ds, preprocessing=PREP)
    assert td.num_classes == 4 and td.class_names == ["x", "y", "z", "w"]


def test_num_classes_may_exceed_seen_labels():
    td = prepare((_images(), LABELS), preprocessing=PREP, num_classes=10)
    assert td.num_classes == 10


def test_integer_valued_float_labels_are_accepted():
    td = prepare((_images(), LABELS.double()), preprocessing=PREP)
    assert td.dataset[5][1].dtype == torch.int64 and int(td.dataset[5][1]) == 2


def test_grey_becomes_three_identical_channels():
    grey = _images(c=1)
    out = preprocess(grey, Preprocessing(input_size=12, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert out.shape == (N, 3, 12, 12)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    rgb = preprocess(grey.expand(-1, 3, -1, -1), PREP)
    assert torch.allclose(preprocess(grey, PREP), rgb, atol=1e-6)
    td = prepare((grey[:, 0], LABELS), preprocessing=PREP)  # [N, H, W] batch
    assert torch.allclose(td.dataset[0][0], rgb[0], atol=1e-6)


def test_uint8_and_float_give_the_same_input():
    u8 = torch.randint(0, 256, (4, 3, 9, 9), dtype=torch.uint8)
    assert torch.allclose(preprocess(u8, PREP), preprocess(u8.float() / 255, PREP), atol=1e-6)
    assert torch.allclose(preprocess(u8.numpy(), PREP), preprocess(u8, PREP))


def test_normalisation_values():
    prep = Preprocessing(input_size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(preprocess(torch.full((3, 8, 8), 0.5), prep), torch.zeros(1, 3, 4, 4))
    out = preprocess(torch.ones(3, 4, 4), Preprocessing(input_size=4))
    assert math.isclose(float(out[0, 0, 0, 0]), (1 - 0.485) / 0.229, rel_tol=1e-5)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: torch.rand(10, 9), (1, 3, 12, 12)),  # [H, W]
        (lambda: torch.rand(3, 10, 9), (1, 3, 12, 12)),  # [C, H, W]
        (lambda: torch.rand(1, 10, 9), (1, 3, 12, 12)),  # [1, H, W] grey
        (lambda: torch.rand(5, 10, 9), (5, 3, 12, 12)),  # [N, H, W]
        (lambda: torch.rand(2, 3, 30, 30), (2, 3, 12, 12)),  # [N, C, H, W]
        (lambda: np.random.rand(10, 9, 3), (1, 3, 12, 12)),  # numpy [H, W, C]
        (lambda: torch.rand(10, 9, 4), (1, 3, 12, 12)),  # RGBA channel-last: alpha dropped
        (lambda: _pil(torch.rand(3, 7, 7)), (1, 3, 12, 12)),
        (lambda: [torch.rand(3, 20, 20), np.random.rand(5, 5)], (2, 3, 12, 12)),
    ],
)
def test_preprocess_input_forms(make, shape):
    out = preprocess(make(), PREP)
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_preprocess_file_path_and_image_size(tmp_path):
    path = tmp_path / "a.png"
    _pil(torch.rand(3, 7, 7)).save(path)
    assert preprocess(str(path), PREP, image_size=20).shape == (1, 3, 20, 20)
    assert preprocess([path, path], PREP).shape == (2, 3, 12, 12)


def test_lazy_path_equals_cached_path(monkeypatch):
    x = _u8(_images(n=30))
    y = torch.arange(30) % 3
    cached = prepare((x, y), preprocessing=PREP)
    monkeypatch.setattr(D, "MAX_CACHE_BYTES", 0)
    monkeypatch.setattr(P, "CHUNK", 7)  # also exercises chunked validation offsets
    lazy = prepare((x, y), preprocessing=PREP)
    assert type(cached.dataset).__name__ == "_CachedDataset"
    assert type(lazy.dataset).__name__ == "_LazyTensorDataset"
    for i in (0, 13, 29):
        assert torch.equal(cached.dataset[i][0], lazy.dataset[i][0])
        assert torch.equal(cached.dataset[i][1], lazy.dataset[i][1])
    bad = x.float() / 255
    bad[23, 0, 1, 1] = float("nan")
    with pytest.raises(DataError, match="index 23 has NaN"):
        prepare((bad, y), preprocessing=PREP)


def test_chunked_cache_matches_single_batch(monkeypatch):
    x = _images(n=10)
    whole = preprocess(x, PREP)
    monkeypatch.setattr(P, "CHUNK", 3)
    assert torch.equal(prepare((x, torch.arange(10) % 2), preprocessing=PREP).dataset.images, whole)


def test_taskdata_passes_through():
    td = prepare((_images(), LABELS), preprocessing=PREP)
    assert prepare(td, preprocessing=PREP) is td


# ----------------------------------------------------------------------------- bad inputs


def _nan_images() -> torch.Tensor:
    x = _images()
    x[2, 1, 3, 3] = float("nan")
    return x


def _mixed_rank_dataset() -> ListDataset:
    items = [(a, int(b)) for a, b in zip(_images(), LABELS, strict=True)]
    items[5] = (items[5][0][0], items[5][1])  # [H, W] among [C, H, W]
    return ListDataset(items)


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.rand(3, 4, 4), 0


class WithTargets(ListDataset):
    def __init__(self) -> None:
        super().__init__([(a, int(b)) for a, b in zip(_images(), LABELS, strict=True)])
        self.targets = LABELS.clone()
        self.targets[7] = 12


BAD = [
    # id, data, kwargs, error, message regex
    ("empty_pair", lambda: (torch.rand(0, 3, 8, 8), torch.zeros(0)), {}, DataError, "empty"),
    ("empty_dataset", lambda: ListDataset([]), {}, DataError, "dataset is empty"),
    ("one_class", lambda: (_images(), torch.zeros(N)), {}, DataError, "at least 2 classes"),
    (
        "label_out_of_range",
        lambda: (_images(), torch.tensor([0, 1, 2, 12] + [0] * (N - 4))),
        {"num_classes": 10},
        DataError,
        r"label 12 at index 3 is outside \[0, 10\): pass num_classes=13 or fix the labels",
    ),
    (
        "label_out_of_range_via_targets",
        WithTargets,
        {"num_classes": 3},
        DataError,
        r"label 12 at index 7 is outside \[0, 3\)",
    ),
    (
        "float_labels",
        lambda: (_images(), LABELS.float() + 0.5 * (torch.arange(N) == 4)),
        {},
        DataError,
        r"label 1.5 at index 4 is not an integer",
    ),
    ("negative_label", lambda: (_images(), LABELS - 1), {}, DataError, "index 0 is negative"),
    ("gap_in_labels", lambda: (_images(), LABELS * 2), {}, DataError, r"classes \[1, 3\]"),
    ("one_hot_labels", lambda: (_images(), torch.eye(3)[LABELS]), {}, DataError, "argmax"),
    ("nan_pixel", lambda: (_nan_images(), LABELS), {}, DataError, "index 2 has NaN"),
    (
        "nan_pixel_in_dataset",
        lambda: ListDataset([(a, int(b)) for a, b in zip(_nan_images(), LABELS, strict=True)]),
        {},
        DataError,
        "index 2 has NaN",
    ),
    (
        "normalised_floats",
        lambda: (_images() * 2 - 1, LABELS),
        {},
        DataError,
        r"float images must be in \[0, 1\]",
    ),
    ("floats_0_255", lambda: (_images() * 255, LABELS), {}, DataError, "divide 0..255"),
    ("mixed_ranks", _mixed_rank_dataset, {}, DataError, "index 5 has shape .* same rank"),
    ("two_channels", lambda: (_images(c=2), LABELS), {}, DataError, "2 channels"),
    ("length_mismatch", lambda: (_images(), LABELS[:5]), {}, DataError, "12 images but 5"),
    (
        "class_names_mismatch",
        lambda: (_images(), LABELS),
        {"class_names": ["a", "b"], "num_classes": 3},
        DataError,
        "class_names has 2 names but there are 3 classes",
    ),
    ("no_such_folder", lambda: "/nonexistent/folder", {}, DataError, "not a directory"),
    ("int", lambda: 5, {}, TypeError, "pass a torch Dataset yielding"),
    ("bare_tensor", lambda: torch.rand(4, 3, 8, 8), {}, TypeError, "pass a torch Dataset"),
    ("iterable_dataset", Stream, {}, TypeError, "iterable-style"),
    ("bad_item", lambda: ListDataset([torch.rand(3, 4, 4)] * 4), {}, TypeError, r"\(x, y\)"),
    ("string_labels", lambda: (_images(), ["a"] * N), {}, (TypeError, ValueError), "integer"),
]


@pytest.mark.parametrize(
    "data, kwargs, error, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_prepare_rejects(data, kwargs, error, message):
    with pytest.raises(error, match=message):
        prepare(data(), preprocessing=PREP, **kwargs)


def test_data_errors_are_value_errors():
    assert issubclass(DataError, ValueError)
    with pytest.raises(ValueError):
        prepare((_images(), torch.zeros(N)), preprocessing=PREP)


def test_preprocess_rejects_bad_pixels_and_types():
    with pytest.raises(DataError, match="NaN"):
        preprocess(torch.full((3, 4, 4), float("inf")), PREP)
    with pytest.raises(TypeError, match="PIL images"):
        preprocess(object(), PREP)
    with pytest.raises(DataError, match="cannot read shape"):
        preprocess(torch.rand(2, 2, 3, 4, 4), PREP)


def test_prepared_datasets_expose_targets():
    ds = ListDataset([(a, int(b)) for a, b in zip(_images(), LABELS, strict=True)])
    for data in ((_images(), LABELS), ds):
        assert torch.equal(prepare(data, preprocessing=PREP).dataset.targets, LABELS)


def test_image_file_that_fails_later_names_its_index(tmp_path):
    _folder(tmp_path, _images())
    td = prepare(str(tmp_path), preprocessing=PREP)
    broken = td.dataset.source.samples[3][0]
    Path(broken).write_bytes(b"not a png")
    td.dataset[2]
    with pytest.raises(DataError, match="item 3 could not be loaded: cannot identify image"):
        td.dataset[3]
