"""Turn what users pass into validated ``(x, y)`` data with the base's preprocessing.

Accepted inputs (:func:`prepare`):

- a map-style ``torch.utils.data.Dataset`` yielding ``(x, y)`` or Avalanche's ``(x, y, task)``;
  ``x`` a tensor, ndarray or PIL image, ``y`` an int or 0-d tensor;
- a pair ``(X, y)`` of tensors/arrays (``X`` may also be a list of images);
- a ``str``/``Path`` to an ImageFolder root, ``root/<class>/<image>``.

Everything is checked *before* training (a bad label found in epoch 3 wastes the first two):
non-empty, integer labels in ``[0, num_classes)``, one image layout, finite pixels in range.

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
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset

from taps_cl.bases import Preprocessing
from taps_cl.errors import TAPSError

MAX_CACHE_BYTES = int(1.5e9)  # cache preprocessed in-memory tensors up to this size
CHUNK = 1024  # images per preprocessing chunk (bounds the temporary float copies)
_RANGE_TOL = 1e-3  # slack on the [0, 1] check for float images (rounding in user pipelines)
_ACCEPTED = (
    "a torch Dataset yielding (x, y) or (x, y, task_label), a pair (X, y) of tensors/arrays, "
    "or a path to an ImageFolder root (root/<class>/<image>)"
)


class DataError(TAPSError, ValueError):
    """The data a user passed is unusable (empty, bad labels, bad pixels, mixed layouts)."""


@dataclass
class TaskData:
    """Validated data of one task: items are ``(x float32 [C, S, S] normalised, y int64 0-d)``."""

    dataset: Dataset
    num_classes: int
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- preprocessing


def _as_tensor(x: Any) -> torch.Tensor:
    """Tensor view of a tensor, ndarray, PIL image or image file path (PIL -> uint8 [C,H,W])."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError("image arrays must be numeric, got dtype=object")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (str, Path)):
        from PIL import Image

        if not Path(x).is_file():
            raise DataError(f"image file {str(x)!r} does not exist")
        with Image.open(x) as img:
            return _pil_to_tensor(img)
    if _is_pil(x):
        return _pil_to_tensor(x)
    raise TypeError(
        f"images must be tensors, numpy arrays, PIL images or file paths, got {type(x).__name__}"
    )


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "getbands")


def _pil_to_tensor(img: Any) -> torch.Tensor:
    mode = "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    arr = np.asarray(img.convert(mode), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).unsqueeze(0) if arr.ndim == 2 else _hwc(arr)


def _hwc(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _channel_dim_ok(c: int) -> bool:
    return c in (1, 3, 4)


def to_nchw(t: torch.Tensor, batched: bool | None = None) -> torch.Tensor:
    """Read a tensor as ``[N, C, H, W]``; ``batched`` says whether dim 0 indexes images.

    ``[H, W]`` is one grey image; 3-D is ``[C, H, W]`` when dim 0 is 1/3/4, else ``[H, W, C]``
    when the last dim is, else ``[N, H, W]`` (with ``batched=True`` it is always ``[N, H, W]``);
    4-D is ``[N, C, H, W]`` or channel-last ``[N, H, W, C]``.
    """
    nd = t.dim()
    if nd == 2 and not batched:
        return t[None, None]
    if nd == 3 and batched:
        return t[:, None]
    if nd == 3:
        if _channel_dim_ok(t.shape[0]):
            return t[None]
        if _channel_dim_ok(t.shape[-1]):
            return t.permute(2, 0, 1)[None]
        if batched is None:
            return t[:, None]
    if nd == 4 and batched is not False:
        if not _channel_dim_ok(t.shape[1]) and _channel_dim_ok(t.shape[-1]):
            return t.permute(0, 3, 1, 2)
        return t
    kind = {True: "a batch", False: "one image", None: "images"}[batched]
    raise DataError(
        f"cannot read shape {tuple(t.shape)} as {kind}: use [H, W] or [C, H, W] per image, "
        "[N, C, H, W] or [N, H, W] per batch"
    )


def _unit_float(x: torch.Tensor, channels: int, offset: int = 0) -> torch.Tensor:
    """uint8/int -> /255, float -> as is; fix channels; check finite and in [0, 1].

    Grey images stay 1-channel here: they become 3-channel by broadcasting in the
    normalisation *after* resizing, 3x less resize work than expanding first.
    """
    if x.dtype == torch.bool:
        x = x.float()
    elif not x.is_floating_point():
        x = x.float() / 255.0
    else:
        x = x.float()
    x = _match_channels(x, channels)
    _check_pixels(x, offset)
    return x


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if c == 4:  # RGBA: the alpha channel carries no class information
        x, c = x[:, :3], 3
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x  # expanded by broadcasting in _resize_normalise
    if c == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise DataError(f"images have {c} channels; the base expects {channels} (or 1/3/4)")


def _check_pixels(x: torch.Tensor, offset: int) -> None:
    """Raise naming the first image that is not finite or not in [0, 1]."""
    flat = x.reshape(x.shape[0], -1)
    bad = ~torch.isfinite(flat).all(1)
    if bad.any():
        i = int(bad.nonzero()[0]) + offset
        raise DataError(f"image at index {i} has NaN or infinite pixels: fix or drop it")
    lo, hi = flat.amin(1), flat.amax(1)
    bad = (lo < -_RANGE_TOL) | (hi > 1 + _RANGE_TOL)
    if bad.any():
        j = int(bad.nonzero()[0])
        raise DataError(
            f"image at index {j + offset} has pixels in [{float(lo[j]):.3g}, {float(hi[j]):.3g}]; "
            "float images must be in [0, 1] and integer images in 0..255: pass raw images "
            "(taps_cl normalises them for the base), e.g. divide 0..255 floats by 255"
        )


def _resize_normalise(x: torch.Tensor, prep: Preprocessing, size: int) -> torch.Tensor:
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(prep.mean[: prep.channels], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(prep.std[: prep.channels], dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std  # a grey [N,1,S,S] broadcasts to [N,C,S,S]: a new, dense tensor


def _preprocess_batch(
    t: torch.Tensor, prep: Preprocessing, size: int, offset: int = 0
) -> torch.Tensor:
    """``[N, C, H, W]`` raw -> float32 normalised ``[N, C', S, S]``, chunk by chunk.

    The output is allocated once, so peak memory is the output plus one chunk.
    """
    first = _resize_normalise(_unit_float(t[:CHUNK], prep.channels, offset), prep, size)
    if t.shape[0] <= CHUNK:
        return first
    out = torch.empty((t.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:CHUNK] = first
    for i in range(CHUNK, t.shape[0], CHUNK):
        chunk = _unit_float(t[i : i + CHUNK], prep.channels, offset + i)
        out[i : i + CHUNK] = _resize_normalise(chunk, prep, size)
    return out


def preprocess(
    inputs: Any, preprocessing: Preprocessing, image_size: int | None = None
) -> torch.Tensor:
    """One image or a batch -> float32 ``[N, C, S, S]``, resized and normalised for the base.

    Accepts tensors/arrays (``[H,W]``, ``[C,H,W]``, ``[H,W,C]``, ``[N,H,W]``, ``[N,C,H,W]``;
    uint8 0..255 or float 0..1), PIL images, file paths, or a list of any of these (sizes may
    differ). Grey images become 3-channel; images are resized (bilinear, antialiased) to
    ``image_size or preprocessing.input_size`` without keeping the aspect ratio.
    """
    size = int(image_size or preprocessing.input_size)
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise DataError("preprocess() got an empty list of images")
        parts = [
            _preprocess_batch(to_nchw(_as_tensor(x), batched=False), preprocessing, size, i)
            for i, x in enumerate(inputs)
        ]
        return torch.cat(parts)
    return _preprocess_batch(to_nchw(_as_tensor(inputs)), preprocessing, size)


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
        raise DataError("all labels are 0: a task needs at least 2 classes")
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
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if num_classes is not None:
        if int(num_classes) < 2:
            raise DataError(f"num_classes must be >= 2, got {num_classes}")
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
        return _preprocess_batch(self.raw[i : i + 1], self.prep, self.size, i)[0], self.targets[i]


class _MappedDataset(Dataset):
    """A user dataset with each item unpacked to ``(x, y)`` and ``x`` preprocessed."""

    def __init__(self, source: Any, prep: Preprocessing, size: int) -> None:
        self.source, self.prep, self.size = source, prep, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _unpack(self.source[i], i)
        t = to_nchw(_as_tensor(x), batched=False)
        x = _preprocess_batch(t, self.prep, self.size, i)[0]
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
    x = to_nchw(_as_tensor(images), batched=True)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x.shape[0]} images but {y.shape[0]} labels: pass one label per image")
    if x.shape[0] * prep.channels * size * size * 4 <= MAX_CACHE_BYTES:
        dataset: Dataset = _CachedDataset(_preprocess_batch(x, prep, size), y)
    else:
        for i in range(0, x.shape[0], CHUNK):  # validate every pixel now, not in epoch 3
            _unit_float(x[i : i + CHUNK], prep.channels, i)
        dataset = _LazyTensorDataset(x, y, prep, size)
    return TaskData(dataset, n, class_names)


def _check_image(x: Any, index: int, channels: int, ref: tuple | None) -> tuple | None:
    """Check one dataset image; ``ref`` is (rank, channels, index, shape) of the first one."""
    if _is_pil(x):
        return ref  # PIL images are converted to one mode, so their layout always agrees
    t = _as_tensor(x)
    nchw = to_nchw(t, batched=False) if t.dim() in (2, 3) else None
    if nchw is None:
        raise DataError(f"image at index {index} has shape {tuple(t.shape)}; use [C,H,W] or [H,W]")
    here = (t.dim(), nchw.shape[1], index, tuple(t.shape))
    if ref is not None and here[:2] != ref[:2]:
        raise DataError(
            f"image at index {index} has shape {here[3]} but image at index {ref[2]} has "
            f"shape {ref[3]}: all images need the same rank and channels"
        )
    _unit_float(nchw, channels, index)
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
    return TaskData(_MappedDataset(ds, prep, size), k, class_names)


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
    """
    size = int(image_size or preprocessing.input_size)
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
    if class_names is None and num_classes is None:
        class_names = _dataset_class_names(data)
    tensors = getattr(data, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2 and torch.is_tensor(tensors[0]):
        return _from_tensors(tensors[0], tensors[1], preprocessing, size, num_classes, class_names)
    return _from_dataset(data, preprocessing, size, num_classes, class_names)
