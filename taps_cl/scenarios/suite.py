"""Real image-classification tasks that load offline, for tests, demos and benchmarks.

- ``fashion_mnist``: the original idx files from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/``), a given ``root``, or a torchvision download.
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images).
- ``lfw_faces``: scikit-image's bundled LFW subset (100 faces, then 100 non-faces, 25x25).

Tasks hold raw images (float in [0, 1], not normalised) as in-memory tensors, exposed as
``.tensors`` so :func:`taps_cl.data.prepare` preprocesses them in one vectorised pass.
Caps (``max_train``/``max_test``) take seeded, class-balanced subsets, so small caps keep
every class.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ImageTensorDataset(Dataset):
    """In-memory images and labels; items are ``(float32 [C,H,W] in [0, 1], int)``.

    ``images`` keep their source dtype (uint8 0..255 for 8-bit sources, 4x smaller than float;
    float32 0..1 otherwise); ``tensors`` is ``(images, targets)`` as in ``TensorDataset``.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> None:
        if images.dim() != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(f"need images [N,C,H,W] and N labels, got {tuple(images.shape)}")
        self.images, self.targets, self.classes = images, targets.long(), list(classes)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x, int(self.targets[i])

    def subset(self, index: np.ndarray | torch.Tensor) -> ImageTensorDataset:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageTensorDataset(self.images[index], self.targets[index], self.classes)


@dataclass
class TaskSpec:
    """One task: a name, raw train/test images (see :class:`ImageTensorDataset`), class names."""

    name: str  # task name (letters, digits, _ or -)
    train: Dataset  # yields (x float32 [C,H,W] in [0,1], y int)
    test: Dataset  # same layout as train
    class_names: list[str]  # one name per label, in label order

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"task name {self.name!r} may only use letters, digits, _ or -")
        if len(self.class_names) < 2:
            raise ValueError(f"task {self.name!r} needs >= 2 classes, got {self.class_names}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- subsets


def stratified_indices(
    targets: torch.Tensor | np.ndarray, cap: int | None, seed: int
) -> np.ndarray:
    """A seeded subset of at most ``cap`` indices with class proportions kept (sorted).

    Each class present gets at least one example, so ``cap`` must be >= the number of classes.
    """
    y = np.asarray(targets)
    if cap is None or cap >= len(y):
        return np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    if cap < len(classes):
        raise ValueError(f"cap {cap} is smaller than the {len(classes)} classes; use >= that")
    take = _allocate(cap, counts)
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(np.flatnonzero(y == c), k, replace=False)
        for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def _allocate(cap: int, counts: np.ndarray) -> np.ndarray:
    """Largest-remainder split of ``cap`` in proportion to ``counts``, at least 1 per class."""
    quota = cap * counts / counts.sum()
    take = np.minimum(np.maximum(1, np.floor(quota).astype(int)), counts)
    while take.sum() < cap:  # give the rest to the largest remainders that still have room
        room = np.where(take < counts, quota - take, -np.inf)
        take[int(np.argmax(room))] += 1
    while take.sum() > cap:  # the 1-per-class floor overshot: trim the most over-served
        over = np.where(take > 1, take - quota, -np.inf)
        take[int(np.argmax(over))] -= 1
    return take


def _capped(ds: ImageTensorDataset, cap: int | None, seed: int) -> ImageTensorDataset:
    if cap is None or cap >= len(ds):
        return ds
    return ds.subset(stratified_indices(ds.targets, cap, seed))


def _split(
    images: torch.Tensor, y: np.ndarray, classes: list[str], test_fraction: float, seed: int
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y
    )
    targets = torch.as_tensor(y, dtype=torch.long)
    full = ImageTensorDataset(images, targets, classes)
    return full.subset(np.sort(idx_train)), full.subset(np.sort(idx_test))


# ----------------------------------------------------------------------------- registry

_TASKS: dict[str, Callable[..., TaskSpec]] = {}


def register_task(name: str) -> Callable[[Callable[..., TaskSpec]], Callable[..., TaskSpec]]:
    """Decorator adding a task factory under ``name``; a name can be registered once."""

    def add(fn: Callable[..., TaskSpec]) -> Callable[..., TaskSpec]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = fn
        return fn

    return add


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **kw: object) -> TaskSpec:
    """Build the registered task ``name`` (keyword arguments go to its factory)."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {task_names()}")
    return _TASKS[name](**kw)


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (gzipped or not): 2 zero bytes, dtype code, rank, big-endian dims."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)}, file holds {data.size} bytes")
    return data.reshape(tuple(dims))


_FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_fmnist(dirs: Sequence[Path]) -> dict[str, Path] | None:
    for d in dirs:
        found = {}
        for key, stem in _FMNIST_FILES.items():
            hits = [d / (stem + ext) for ext in ("", ".gz") if (d / (stem + ext)).is_file()]
            if hits:
                found[key] = hits[0]
        if len(found) == len(_FMNIST_FILES):
            return found
    return None


@lru_cache(maxsize=2)
def _load_fmnist(files: tuple[tuple[str, Path], ...]) -> dict[str, np.ndarray]:
    """Parsed arrays, cached per file set (parsing 60k images takes ~0.5 s); read-only."""
    arrays = {key: read_idx(path) for key, path in files}
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def data_root() -> Path:
    """Where taps_cl keeps downloaded data: ``$TAPS_CL_DATA``, else ``~/.cache/taps_cl``."""
    return Path(os.environ.get("TAPS_CL_DATA") or Path.home() / ".cache" / "taps_cl")


def _fmnist_dirs(root: Path) -> list[Path]:
    """The layouts a Fashion-MNIST folder may have: the idx files themselves, torchvision's
    ``FashionMNIST(root)`` layout, or a ``fashion-mnist`` folder."""
    return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]


def _fmnist_arrays(root: str | None, download: bool) -> dict[str, np.ndarray]:
    """The idx files from ``root``, else the Debian package's folder, else the torchvision
    layout under :func:`data_root`, else (``download=True``) a torchvision download there."""
    if root is None:
        target = data_root()
        dirs = [FASHION_MNIST_DIR, *_fmnist_dirs(target)]
    else:
        target = Path(root)
        dirs = _fmnist_dirs(target)
    files = _find_fmnist(dirs)
    if files is None and download:
        files = _download_fmnist(target)
    if files is None:
        where = ", ".join(str(d) for d in dirs)
        raise ValueError(
            f"Fashion-MNIST not found (looked in {where}): `apt-get install "
            "dataset-fashion-mnist`, or put torchvision's FashionMNIST files under "
            f"{target} ($TAPS_CL_DATA), or pass download=True when online"
        )
    return _load_fmnist(tuple(sorted(files.items())))


def _download_fmnist(target: Path) -> dict[str, Path] | None:
    """torchvision's download into ``target``; ``None`` when offline (the caller explains)."""
    from torchvision.datasets import FashionMNIST

    log.info("downloading Fashion-MNIST into %s", target)
    try:
        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        log.warning(
            "Fashion-MNIST download failed: %s", str(err).splitlines()[0] if str(err) else err
        )
        return None
    return _find_fmnist([target / "FashionMNIST" / "raw"])


def _fmnist_split(arrays: dict[str, np.ndarray], part: str) -> ImageTensorDataset:
    x = torch.from_numpy(arrays[f"{part}_x"].copy()).unsqueeze(1)  # uint8 [N, 1, 28, 28]
    y = torch.from_numpy(arrays[f"{part}_y"].astype(np.int64))
    return ImageTensorDataset(x, y, FASHION_MNIST_CLASSES)


@register_task("fashion_mnist")
def fashion_mnist(
    root: str | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> TaskSpec:
    """Fashion-MNIST: 60k train / 10k test grey 28x28 images of 10 clothing classes."""
    arrays = _fmnist_arrays(root, download)
    train = _capped(_fmnist_split(arrays, "train"), max_train, seed)
    test = _capped(_fmnist_split(arrays, "test"), max_test, seed)
    return TaskSpec("fashion_mnist", train, test, list(FASHION_MNIST_CLASSES))


def split_fashion_mnist(
    n_tasks: int = 5,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    root: str | None = None,
) -> list[TaskSpec]:
    """Split Fashion-MNIST: task i holds consecutive classes, e.g. (0,1), (2,3), ... for 5 tasks.

    Labels are remapped to 0..k-1 within each task; caps apply per task.
    """
    if n_tasks < 1 or 10 % n_tasks or 10 // n_tasks < 2:
        raise ValueError(f"n_tasks must be 1, 2 or 5 (10 classes, >= 2 per task), got {n_tasks}")
    k = 10 // n_tasks
    arrays = _fmnist_arrays(root, download=False)
    full = {part: _fmnist_split(arrays, part) for part in ("train", "test")}
    tasks = []
    for t in range(n_tasks):
        names = FASHION_MNIST_CLASSES[t * k : (t + 1) * k]
        parts = []
        for part, cap in (("train", max_train), ("test", max_test)):
            ds = full[part]
            keep = torch.nonzero((ds.targets >= t * k) & (ds.targets < (t + 1) * k)).flatten()
            sub = ImageTensorDataset(ds.images[keep], ds.targets[keep] - t * k, names)
            parts.append(_capped(sub, cap, seed + t))
        tasks.append(TaskSpec(f"fashion_mnist_{t}", parts[0], parts[1], list(names)))
    return tasks


# ----------------------------------------------------------------------------- bundled sets


@register_task("digits")
def digits(
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> TaskSpec:
    """scikit-learn's 8x8 handwritten digits (values 0..16, scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)
    names = [str(c) for c in bunch.target_names]
    train, test = _split(images, bunch.target, names, test_fraction, seed)
    return TaskSpec("digits", _capped(train, max_train, seed), _capped(test, max_test, seed), names)


@register_task("lfw_faces")
def lfw_faces(
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> TaskSpec:
    """scikit-image's LFW subset: face (label 1, the first 100) vs non-face (label 0), 25x25."""
    from skimage.data import lfw_subset

    raw = np.asarray(lfw_subset())
    scale = 255.0 if raw.dtype == np.uint8 else 1.0  # documented uint8, float in [0,1] in practice
    images = torch.from_numpy(raw / scale).float().unsqueeze(1)
    y = np.r_[np.ones(100, dtype=np.int64), np.zeros(len(raw) - 100, dtype=np.int64)]
    names = ["non-face", "face"]
    train, test = _split(images, y, names, test_fraction, seed)
    return TaskSpec(
        "lfw_faces", _capped(train, max_train, seed), _capped(test, max_test, seed), names
    )


def offline_suite(
    names: Sequence[str] = ("fashion_mnist", "digits", "lfw_faces"),
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> list[TaskSpec]:
    """The named registered tasks, in order, with the same caps and seed."""
    return [get_task(n, max_train=max_train, max_test=max_test, seed=seed) for n in names]


# ----------------------------------------------------------------------------- folders


class FolderImages(Dataset):
    """Images of a torchvision ``ImageFolder`` (optionally a subset), loaded lazily per item.

    Items are ``(float32 [3,H,W] in [0, 1], int)``; folders can be large and their image
    sizes may differ, so they are not held in memory.
    """

    def __init__(self, folder: object, index: np.ndarray | None = None) -> None:
        self.folder = folder
        all_targets = np.asarray(folder.targets, dtype=np.int64)  # type: ignore[attr-defined]
        self.index = np.arange(len(all_targets)) if index is None else np.asarray(index)
        self.targets = torch.from_numpy(all_targets[self.index])
        self.classes = list(folder.classes)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.functional import pil_to_tensor

        image, label = self.folder[int(self.index[i])]  # type: ignore[index]
        return pil_to_tensor(image).float() / 255.0, int(label)


def _folder_split(path: Path, cap: int | None, seed: int) -> FolderImages:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise ValueError(f"missing {path}: each task needs <task>/train/<class>/ and test/")
    try:
        full = FolderImages(ImageFolder(str(path)))
    except FileNotFoundError as err:
        raise ValueError(f"{path} holds no <class>/<image> folders: {err}") from err
    if cap is None or cap >= len(full):
        return full
    return FolderImages(full.folder, stratified_indices(full.targets, cap, seed))


def imagefolder_suite(
    root: str | Path,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> list[TaskSpec]:
    """One task per folder of ``root/<task>/{train,test}/<class>/<image>``, in name order."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"task suite root {str(root)!r} is not a directory")
    tasks = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        train = _folder_split(task_dir / "train", max_train, seed)
        test = _folder_split(task_dir / "test", max_test, seed)
        if test.classes != train.classes:
            raise ValueError(
                f"{task_dir.name}: test classes {test.classes} differ from train classes "
                f"{train.classes}; give both splits the same class folders"
            )
        tasks.append(TaskSpec(task_dir.name, train, test, train.classes))
    if not tasks:
        raise ValueError(f"no task folders in {root}; expected root/<task>/train/<class>/<image>")
    return tasks
