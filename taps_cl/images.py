"""Images -> model input: one function for training and prediction alike.

:func:`preprocess` accepts tensors/arrays in the usual layouts, PIL images, file paths and lists
of them; it converts integer images (0..255) and float images (0..1) to float, checks that every
pixel is finite and in range (already normalised images are refused, not normalised twice),
resizes (with the base's interpolation, antialiased) and centre-crops as timm's eval transform
does (``crop_pct``), and normalises with the base's mean/std. Grey images become
3-channel by broadcasting after the resize, which is 3x cheaper than resizing three copies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from taps_cl.bases import Preprocessing
from taps_cl.errors import TAPSError

CHUNK = 1024  # images per preprocessing chunk (bounds the temporary float copies)
_RANGE_TOL = 1e-3  # slack on the [0, 1] check for float images (rounding in user pipelines)


class DataError(TAPSError, ValueError):
    """The data a user passed is unusable (empty, bad labels, bad pixels, mixed layouts)."""


def as_tensor(x: Any) -> torch.Tensor:
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
        try:
            with Image.open(x) as img:
                return _pil_to_tensor(img)
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # incl. unidentified
            raise DataError(f"image file {str(x)!r} is not a readable image: {err}") from err
    if is_pil(x):
        return _pil_to_tensor(x)
    raise TypeError(
        f"images must be tensors, numpy arrays, PIL images or file paths, got {type(x).__name__}"
    )


def is_pil(x: Any) -> bool:
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
    if t.numel() == 0:
        raise DataError(f"got an empty image tensor of shape {tuple(t.shape)}: pass >= 1 image")
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


def unit_float(x: torch.Tensor, channels: int, offset: int = 0) -> torch.Tensor:
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
    """Resize to ``size / crop_pct`` (timm's scale), centre-crop ``size``, normalise."""
    scaled = size if prep.crop_mode == "squash" else math.floor(size / prep.crop_pct)
    if x.shape[-2:] != (scaled, scaled):
        mode = prep.interpolation
        smooth = mode in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(scaled, scaled), mode=mode, antialias=smooth)
        if mode == "bicubic":
            x = x.clamp(0, 1)  # bicubic overshoots; keep pixels in the range the base knows
    if scaled != size:
        top = (scaled - size) // 2
        x = x[..., top : top + size, top : top + size]
    mean = torch.tensor(prep.mean[: prep.channels], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(prep.std[: prep.channels], dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std  # a grey [N,1,S,S] broadcasts to [N,C,S,S]: a new, dense tensor


def preprocess_batch(
    t: torch.Tensor, prep: Preprocessing, size: int, offset: int = 0
) -> torch.Tensor:
    """``[N, C, H, W]`` raw -> float32 normalised ``[N, C', S, S]``, chunk by chunk.

    The output is allocated once, so peak memory is the output plus one chunk.
    """
    first = _resize_normalise(unit_float(t[:CHUNK], prep.channels, offset), prep, size)
    if t.shape[0] <= CHUNK:
        return first
    out = torch.empty((t.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:CHUNK] = first
    for i in range(CHUNK, t.shape[0], CHUNK):
        chunk = unit_float(t[i : i + CHUNK], prep.channels, offset + i)
        out[i : i + CHUNK] = _resize_normalise(chunk, prep, size)
    return out


def check_batch(t: torch.Tensor, channels: int) -> None:
    """Validate a raw ``[N, C, H, W]`` batch chunk by chunk, without keeping the floats."""
    for i in range(0, t.shape[0], CHUNK):
        unit_float(t[i : i + CHUNK], channels, i)


def preprocess(
    inputs: Any, preprocessing: Preprocessing, image_size: int | None = None
) -> torch.Tensor:
    """One image or a batch -> float32 ``[N, C, S, S]``, resized and normalised for the base.

    Accepts tensors/arrays (``[H,W]``, ``[C,H,W]``, ``[H,W,C]``, ``[N,H,W]``, ``[N,C,H,W]``;
    uint8 0..255 or float 0..1), PIL images, file paths, or a list of any of these (sizes may
    differ). Grey images become 3-channel; images are resized (the base's interpolation,
    antialiased) to ``(image_size or preprocessing.input_size) / crop_pct`` without keeping the
    aspect ratio, then centre-cropped to ``image_size``.
    """
    size = int(image_size or preprocessing.input_size)
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise DataError("preprocess() got an empty list of images")
        parts = [
            preprocess_batch(to_nchw(as_tensor(x), batched=False), preprocessing, size, i)
            for i, x in enumerate(inputs)
        ]
        return torch.cat(parts)
    return preprocess_batch(to_nchw(as_tensor(inputs)), preprocessing, size)
