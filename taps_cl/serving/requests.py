"""Requests to a served store, decoded and checked before anything runs a model.

A request is a batch of rows; each row holds one image and, optionally, the task to ask (then
no routing for that row). An image arrives as encoded bytes (PNG, JPEG, WebP, BMP, GIF, TIFF;
raw ``bytes`` or a base64 ``str``) or as a numeric array (``[H, W]``, ``[H, W, C]`` or
``[C, H, W]``; uint8 0..255 or float 0..1). Rows come as a pandas DataFrame with columns
``image`` (and ``task``), a dict of such columns, or a plain list or array of images.

Why so strict: an HTTP endpoint is an attack surface the library alone does not have.

- A string is never a path: it is base64 or it is refused, so no request reads the server's
  disk (the library's ``route`` accepts paths; a request never reaches that branch).
- Every limit is checked before the expensive step it guards: the batch size before any
  decoding, the encoded bytes before base64 decoding, the pixel count from the image header
  before the pixels are decoded (a decompression bomb never expands).
- Every refusal is a :class:`RequestError` (a ``ValueError``) with a one-line message, which
  the HTTP layer turns into a 400 response.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from taps_cl.errors import TAPSError
from taps_cl.images import as_tensor
from taps_cl.taps.patch import validate_task_name

__all__ = ["IMAGE_FORMATS", "DecodedRows", "RequestError", "RequestLimits", "decode_rows"]

# Formats PIL may decode from a request (PIL's other plugins are never tried).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# What a path looks like (only to say why a string that is not base64 was refused).
_PATHLIKE = re.compile(r"^(file:|~|\.{0,2}/|[A-Za-z]:[\\/])|[\\/]|\.[A-Za-z]{2,5}$")


class RequestError(TAPSError, ValueError):
    """A request the server refuses (answered with a 4xx and this one-line message)."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; each limit is checked before the work it bounds."""

    max_batch: int = 256  # rows per request
    max_image_bytes: int = 8 * 2**20  # encoded bytes of one image (after base64 decoding)
    max_request_bytes: int = 64 * 2**20  # encoded bytes of all images of a request
    max_image_pixels: int = 4096 * 4096  # width x height of one decoded image (or array)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_image_bytes", "max_request_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RequestLimits.{name} must be an int >= 1, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RequestLimits:
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown request limits {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**values)


@dataclass(frozen=True)
class DecodedRows:
    """A checked request: one uint8/float ``[C, H, W]`` tensor and a task name (or None) per row."""

    images: list[torch.Tensor]
    tasks: list[str | None]

    def __len__(self) -> int:
        return len(self.images)


def decode_rows(data: Any, limits: RequestLimits | None = None) -> DecodedRows:
    """Decode and check a request's rows (see the module docstring); raise
    :class:`RequestError` with a one-line message for anything unusable."""
    limits = limits or RequestLimits()
    images, tasks = _columns(data)
    n = len(images)
    if n == 0:
        raise RequestError("empty batch: send at least one image")
    if n > limits.max_batch:
        raise RequestError(f"batch of {n} images is over the limit of {limits.max_batch}")
    if tasks is not None and len(tasks) != n:
        raise RequestError(f"got {len(tasks)} task names for {n} images; send one per image")
    names = [_task(t, i) for i, t in enumerate(tasks)] if tasks is not None else [None] * n
    budget = [limits.max_request_bytes]
    decoded = [_image(x, i, limits, budget) for i, x in enumerate(images)]
    return DecodedRows(decoded, names)


def _columns(data: Any) -> tuple[Sequence[Any], Sequence[Any] | None]:
    """(images, tasks or None) from a DataFrame, a dict of columns or a list/array of images."""
    if hasattr(data, "columns") and hasattr(data, "to_dict"):  # a pandas DataFrame
        data = {str(c): data[c].tolist() for c in data.columns}
        if _columns_in_one_row(data.get("image")):
            # MLflow's {"inputs": {"image": [b64, ...], "task": [...]}} arrives as ONE row whose
            # cells are the columns; an array image (a nested list) stays one row.
            data = {k: (v[0] if isinstance(v[0], list | tuple) else v) for k, v in data.items()}
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"image", "task"})
        if unknown or "image" not in data:
            raise RequestError(
                f"rows need an 'image' column and may have a 'task' column; got {sorted(data)}"
            )
        tasks = data.get("task")
        if tasks is not None and not isinstance(tasks, list | tuple | np.ndarray):
            tasks = [tasks]
        return _sequence(data["image"]), _sequence(tasks) if tasks is not None else None
    return _sequence(data), None


def _columns_in_one_row(cells: list | None) -> bool:
    if not cells or len(cells) != 1 or not isinstance(cells[0], list | tuple):
        return False
    return bool(cells[0]) and all(isinstance(c, str | bytes) for c in cells[0])


def _sequence(x: Any) -> Sequence[Any]:
    if isinstance(x, np.ndarray):
        if x.dtype == object or x.ndim == 1:
            return list(x)
        if x.ndim == 4:  # a batch of arrays
            return list(x)
        if x.ndim in (2, 3):
            return [x]
        raise RequestError(f"image arrays must have 2 to 4 dimensions, got shape {x.shape}")
    if isinstance(x, list | tuple):
        return x
    if isinstance(x, str | bytes):
        return [x]
    raise RequestError(f"images must be a list or an array, got {type(x).__name__}")


def _task(t: Any, i: int) -> str | None:
    if t is None or (isinstance(t, float) and math.isnan(t)) or t == "":
        return None
    if not isinstance(t, str):
        raise RequestError(f"row {i}: task must be a name (str) or null, got {type(t).__name__}")
    try:
        return validate_task_name(t)
    except (TypeError, ValueError) as err:
        raise RequestError(f"row {i}: {_one_line(err)}") from None


def _image(x: Any, i: int, limits: RequestLimits, budget: list[int]) -> torch.Tensor:
    if isinstance(x, str):
        x = _base64(x, i, limits)
    if isinstance(x, bytes | bytearray | memoryview):
        x = bytes(x)
        if len(x) > limits.max_image_bytes:
            raise RequestError(
                f"row {i}: image of {len(x)} bytes is over the limit of {limits.max_image_bytes}"
            )
        budget[0] -= len(x)
        if budget[0] < 0:
            raise RequestError(f"request images are over {limits.max_request_bytes} bytes in all")
        return _decode_image(x, i, limits)
    if isinstance(x, list | tuple | np.ndarray):
        return _array(x, i, limits)
    raise RequestError(
        f"row {i}: an image must be base64 bytes or a numeric array, got {type(x).__name__}"
    )


def _base64(s: str, i: int, limits: RequestLimits) -> bytes:
    if len(s) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(f"row {i}: image is over the limit of {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(s, validate=True)  # a string is decoded, never opened
    except (binascii.Error, ValueError):
        if _PATHLIKE.search(s.strip()):
            raise RequestError(
                f"row {i}: paths are not accepted; send the image bytes base64-encoded"
            ) from None
        raise RequestError(f"row {i}: image is not valid base64") from None


def _decode_image(data: bytes, i: int, limits: RequestLimits) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise RequestError(f"row {i}: not an image ({'/'.join(IMAGE_FORMATS)})") from None
    except (Image.DecompressionBombError, OSError, ValueError) as err:
        raise RequestError(f"row {i}: unreadable image: {_one_line(err)}") from None
    with img:
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise RequestError(
                f"row {i}: image of {w}x{h} pixels is over the limit of "
                f"{limits.max_image_pixels} pixels"
            )
        try:
            img.load()
            return as_tensor(img)
        except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
            raise RequestError(f"row {i}: truncated or corrupt image: {_one_line(err)}") from None


def _array(x: Any, i: int, limits: RequestLimits) -> torch.Tensor:
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError):
        raise RequestError(f"row {i}: image array is ragged") from None
    if arr.dtype.kind not in "uif" or arr.dtype.itemsize > 8:
        raise RequestError(f"row {i}: image array must be numeric, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise RequestError(f"row {i}: image array must be [H, W] or [H, W, C], got {arr.shape}")
    channels = 1 if arr.ndim == 2 else min(arr.shape[0], arr.shape[-1])
    if arr.size // channels > limits.max_image_pixels:
        raise RequestError(
            f"row {i}: image of {arr.size // channels} pixels is over the limit of "
            f"{limits.max_image_pixels} pixels"
        )
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise RequestError(f"row {i}: float pixels must be finite and in [0, 1]")
    elif arr.min() < 0 or arr.max() > 255:
        raise RequestError(f"row {i}: integer pixels must be in 0..255")
    else:
        arr = arr.astype(np.uint8)
    t = as_tensor(arr)
    if t.ndim == 3 and t.shape[0] not in (1, 3, 4):  # [H, W, C] -> [C, H, W]
        if t.shape[-1] not in (1, 3, 4):
            raise RequestError(f"row {i}: image array needs 1, 3 or 4 channels, got {arr.shape}")
        t = t.permute(2, 0, 1).contiguous()
    return t if t.ndim == 3 else t.unsqueeze(0)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
