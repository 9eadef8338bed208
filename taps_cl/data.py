"""Turn what users pass into validated ``(x, y)`` data with the base's preprocessing.

Accepted inputs (:func:`prepare`):

- a map-style ``torch.utils.data.Dataset`` yielding ``(x, y)`` or Avalanche's ``(x, y, task)``;
  ``x`` a tensor, ndarray or PIL image, ``y`` an int or 0-d tensor;
- a pair ``(X, y)`` of tensors/arrays (``X`` may also be a list of images);
- a ``str``/``Path`` to an ImageFolder root, ``root/<class>/<image>``.

Everything is checked *before* training (a bad label found in epoch 3 wastes the first two):
non-empty, integer labels in ``[0, num_classes)``, one image layout, finite pixels in range.
A single class is refused unless declared (``num_classes=1``): labels that are all 0 or a folder
of one class are usually a slip, while a declared one-class task is kept for routing.

The one function :func:`preprocess` turns images into model input, for training (per item) and
for prediction alike, so a model always sees the same inputs. Pixel conventions: integer images
are 0..255, float images 0..1 (already normalised images are refused, not normalised twice).

Caching: in-memory tensors (a pair, a ``TensorDataset`` or anything with ``.tensors``) are
preprocessed once, in chunks, into one float32 tensor when that takes at most
:data:`MAX_CACHE_BYTES` (default 1.5 GB, e.g. 10k images at 224 px = 6 GB do not fit, 10k at
64 px = 0.5 GB do); otherwise they are kept raw and preprocessed per item, as datasets are.
float32 rather than float16 so cached and per-item inputs are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from taps_cl.bases import Preprocessing
from taps_cl.images import (
    DataError,
    as_tensor,
    check_batch,
    is_pil,
    preprocess,
    preprocess_batch,
    to_nchw,
    unit_float,
)

__all__ = ["DataError", "TaskData", "check_labels", "infer_num_classes", "prepare", "preprocess"]

MAX_CACHE_BYTES = int(1.5e9)  # cache preprocessed in-memory tensors up to this size
_ACCEPTED = (
    "a torch Dataset yielding (x, y) or (x, y, task_label), a pair (X, y) of tensors/arrays, "
    "or a path to an ImageFolder root (root/<class>/<image>)"
)


@dataclass
class TaskData:
    """Validated data of one task: items are ``(x float32 [C, S, S] normalised, y int64 0-d)``."""

    dataset: Dataset
    num_classes: int
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- labels


def _labels_tensor(values: Any) -> torch.Tensor:
    """Labels as a 1-D tensor of their own dtype (floats kept so they can be checked)."""
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu()
    else:
        arr = np.asarray(values if not isinstance(values, (list, tuple)) else list(values))
        if arr.dtype == object:
            arr = np.asarray([float(v) for v in values])
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError(f"labels must be integers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() != 1:
        raise DataError(
            f"labels must be a 1-D sequence of class indices, got shape {tuple(t.shape)}"
            + ("; for one-hot labels pass y.argmax(1)" if t.dim() == 2 else "")
        )
    return t


def _integer_labels(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != t.round())
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataError(
                f"label {float(t[i])} at index {i} is not an integer class index: "
                "labels must be 0..num_classes-1"
            )
    return t.long()


def infer_num_classes(labels: torch.Tensor) -> int:
    """``max + 1``, refusing label sets with gaps (a gap is usually unmapped labels)."""
    n = int(labels.max()) + 1
    present = torch.bincount(labels, minlength=n) > 0
    if n < 2:
        raise DataError(
            "all labels are 0: a task needs at least 2 classes, unless it is meant to hold one "
            "(a one-class task, e.g. for routing): then pass num_classes=1"
        )
    if not present.all():
        missing = (~present).nonzero().flatten().tolist()
        raise DataError(
            f"classes {missing[:10]} have no examples among labels 0..{n - 1}: remap the "
            "labels to 0..K-1, or pass num_classes= if the gaps are intended"
        )
    return n


def check_labels(
    labels: Any, num_classes: int | None = None, class_names: list[str] | None = None
) -> tuple[torch.Tensor, int]:
    """Validate labels; return them as int64 and the number of classes."""
    y = _integer_labels(_labels_tensor(labels))
    if y.numel() == 0:
        raise DataError(f"the data is empty; pass at least one example per class ({_ACCEPTED})")
    declared = num_classes is not None  # only a declared count may be 1 (a one-class task)
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if num_classes is not None:
        if int(num_classes) < (1 if declared else 2):
            raise DataError(
                f"num_classes must be >= 1, got {num_classes}" if declared else
                f"one class {list(class_names)} found: a task needs at least 2 classes, unless it "
                "is meant to hold one (e.g. for routing): then pass num_classes=1"
            )  # fmt: skip
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataError(
                f"label {int(y[i])} at index {i} is outside [0, {num_classes}): pass "
                f"num_classes={max(int(y.max()) + 1, num_classes)} or fix the labels"
            )
    else:
        if (y < 0).any():
            i = int((y < 0).nonzero()[0])
            raise DataError(f"label {int(y[i])} at index {i} is negative: labels are 0..K-1")
        num_classes = infer_num_classes(y)
    if class_names is not None and len(class_names) != num_classes:
        raise DataError(
            f"class_names has {len(class_names)} names but there are {num_classes} classes: "
            "give one name per class, in label order"
        )
    return y, int(num_classes)


def _item_label(y: Any, index: int) -> int | float:
    """One dataset label (int, numpy scalar, 0-d or 1-element tensor) as a Python number."""
    if isinstance(y, (torch.Tensor, np.ndarray, np.generic)):
        numel = y.numel() if isinstance(y, torch.Tensor) else np.size(y)
        if numel != 1:
            raise DataError(f"label at index {index} has shape {tuple(y.shape)}; expected a scalar")
        return y.item()
    if isinstance(y, (bool, int, float)):
        return y
    raise TypeError(f"label at index {index} is a {type(y).__name__}; expected an int")


# ----------------------------------------------------------------------------- datasets


class _CachedDataset(Dataset):
    """Preprocessed images held in memory (the fast path for in-memory tensors)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]


class _LazyTensorDataset(Dataset):
    """Raw in-memory images preprocessed per item (when the cache would be too large)."""

    def __init__(
        self, raw: torch.Tensor, targets: torch.Tensor, prep: Preprocessing, size: int
    ) -> None:
        self.raw, self.targets, self.prep, self.size = raw, targets, prep, size

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return preprocess_batch(self.raw[i : i + 1], self.prep, self.size, i)[0], self.targets[i]


class _MappedDataset(Dataset):
    """A user dataset with each item unpacked to ``(x, y)`` and ``x`` preprocessed."""

    def __init__(self, source: Any, targets: torch.Tensor, prep: Preprocessing, size: int) -> None:
        self.source, self.targets, self.prep, self.size = source, targets, prep, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            item = self.source[i]
        except OSError as err:  # unreadable/corrupt image file: say which item it is
            raise DataError(f"dataset item {i} could not be loaded: {err}") from err
        x, y = _unpack(item, i)
        t = to_nchw(as_tensor(x), batched=False)
        x = preprocess_batch(t, self.prep, self.size, i)[0]
        return x, torch.tensor(int(_item_label(y, i)), dtype=torch.int64)


class _PairList(Dataset):
    """``(list of images, labels)`` as a dataset, so images of different sizes work."""

    def __init__(self, images: Any, labels: Any) -> None:
        self.images, self.targets = list(images), labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.images[i], self.targets[i]


def _unpack(item: Any, index: int) -> tuple[Any, Any]:
    """``(x, y)`` or Avalanche's ``(x, y, task_label)`` -> ``(x, y)``."""
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1]
    kind = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else type(item).__name__
    raise TypeError(f"dataset item {index} is {kind}; expected (x, y) or (x, y, task_label)")


# ----------------------------------------------------------------------------- prepare


def _from_tensors(
    images: Any,
    labels: Any,
    prep: Preprocessing,
    size: int,
    num_classes: int | None,
    class_names: list[str] | None,
) -> TaskData:
    y, n = check_labels(labels, num_classes, class_names)
    x = to_nchw(as_tensor(images), batched=True)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x.shape[0]} images but {y.shape[0]} labels: pass one label per image")
    if x.shape[0] * prep.channels * size * size * 4 <= MAX_CACHE_BYTES:
        dataset: Dataset = _CachedDataset(preprocess_batch(x, prep, size), y)
    else:
        check_batch(x, prep.channels)  # validate every pixel now, not in epoch 3
        dataset = _LazyTensorDataset(x, y, prep, size)
    return TaskData(dataset, n, class_names)


def _check_image(x: Any, index: int, channels: int, ref: tuple | None) -> tuple | None:
    """Check one dataset image; ``ref`` is (rank, channels, index, shape) of the first one."""
    if is_pil(x):
        return ref  # PIL images are converted to one mode, so their layout always agrees
    t = as_tensor(x)
    nchw = to_nchw(t, batched=False) if t.dim() in (2, 3) else None
    if nchw is None:
        raise DataError(f"image at index {index} has shape {tuple(t.shape)}; use [C,H,W] or [H,W]")
    here = (t.dim(), nchw.shape[1], index, tuple(t.shape))
    if ref is not None and here[:2] != ref[:2]:
        raise DataError(
            f"image at index {index} has shape {here[3]} but image at index {ref[2]} has "
            f"shape {ref[3]}: all images need the same rank and channels"
        )
    unit_float(nchw, channels, index)
    return ref or here


def _from_dataset(
    ds: Any,
    prep: Preprocessing,
    size: int,
    num_classes: int | None,
    class_names: list[str] | None,
) -> TaskData:
    n = len(ds)
    if n == 0:
        raise DataError(f"the dataset is empty; pass at least one example per class ({_ACCEPTED})")
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == n:
        # cheap path (e.g. ImageFolder): labels from .targets, images checked when loaded
        y, k = check_labels(targets, num_classes, class_names)
        x, _ = _unpack(ds[0], 0)
        _check_image(x, 0, prep.channels, None)
    else:
        labels, ref = [], None
        for i in range(n):
            x, yi = _unpack(ds[i], i)
            labels.append(_item_label(yi, i))
            ref = _check_image(x, i, prep.channels, ref)
        y, k = check_labels(labels, num_classes, class_names)
    return TaskData(_MappedDataset(ds, y, prep, size), k, class_names)


def _image_folder(root: str | Path) -> Any:
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise DataError(f"ImageFolder root {str(root)!r} is not a directory")
    try:
        return ImageFolder(str(root))
    except FileNotFoundError as err:
        raise DataError(
            f"{str(root)!r} is not an ImageFolder root ({err}); expected root/<class>/<image>"
        ) from err


def _dataset_class_names(ds: Any) -> list[str] | None:
    names = getattr(ds, "classes", None)
    if isinstance(names, (list, tuple)) and names and all(isinstance(c, str) for c in names):
        return list(names)
    return None


def prepare(
    data: Any,
    *,
    preprocessing: Preprocessing,
    image_size: int | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> TaskData:
    """Validate ``data`` (see module docstring) and wrap it with the base's preprocessing.

    ``num_classes`` defaults to ``len(class_names)``, then to the dataset's ``.classes``, then
    to ``max(label) + 1`` (every class 0..max must then occur). Raises :class:`DataError`
    (a ``ValueError``) naming the offending index, or ``TypeError`` for unsupported inputs.

    Cost: tensors are checked whole (vectorised). A dataset with ``.targets`` (ImageFolder,
    Avalanche) has its labels checked from them and its first image loaded; its other images
    are checked as they load, so a corrupt file fails naming its index but only when reached.
    Any other dataset is iterated once here, checking every label and image.
    """
    size = int(image_size or preprocessing.input_size)
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
    if isinstance(data, TaskData):
        if num_classes is not None and num_classes != data.num_classes:
            raise DataError(f"TaskData has {data.num_classes} classes, not {num_classes}")
        return data
    if isinstance(data, (str, Path)):
        data = _image_folder(data)
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data, Dataset):
        images, labels = data
        if isinstance(images, (list, tuple)):
            data = _PairList(images, labels)
        elif isinstance(images, (torch.Tensor, np.ndarray)):
            return _from_tensors(images, labels, preprocessing, size, num_classes, class_names)
        else:
            raise TypeError(f"X in (X, y) must be a tensor, array or list, not {type(images)}")
    if isinstance(data, IterableDataset):
        raise TypeError(
            f"iterable-style datasets are not supported (need len and [i]); pass {_ACCEPTED}"
        )
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or isinstance(
        data, (torch.Tensor, np.ndarray, bytes, dict)
    ):
        raise TypeError(f"cannot use {type(data).__name__} as task data; pass {_ACCEPTED}")
    if class_names is None:
        names = _dataset_class_names(data)
        class_names = names if names and num_classes in (None, len(names)) else None
    tensors = getattr(data, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2 and torch.is_tensor(tensors[0]):
        return _from_tensors(tensors[0], tensors[1], preprocessing, size, num_classes, class_names)
    return _from_dataset(data, preprocessing, size, num_classes, class_names)
