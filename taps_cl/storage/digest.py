"""The row digest of a task version: sha256 over what decides how its tensors are rebuilt and
used (its tensor references; classes, layers and config). Blobs have their own sha256; this
covers the rows that point at them, so an edited ``dtype``, ``shape`` or ``image_size`` is an
integrity error instead of silently different outputs.

Two frozen formats. ``"v": 1`` (:func:`version_digest`) covers per-tensor rows (name, blob,
dtype, shape); migration ``0003`` computed it for the versions that existed then. ``"v": 2``
(:func:`packed_digest`) covers the parts of a packed version (part name, blob); the dtypes and
shapes live inside the part's blob, under its sha256 (:mod:`taps_cl.storage.packing`). A
change to either needs a new format number and a migration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

FORMAT = 1
PACKED_FORMAT = 2


def version_digest(
    *,
    num_classes: int,
    class_names: list[str] | None,
    num_layers: int,
    active_layers: list[str],
    config: dict[str, Any],
    tensors: Iterable[Sequence[Any]],
) -> str:
    """sha256 (hex) of a version's rows; ``tensors`` = (name, blob sha256, dtype, shape)."""
    refs = sorted([str(n), str(sha), str(dtype), list(shape)] for n, sha, dtype, shape in tensors)
    return _digest(FORMAT, "tensors", refs, num_classes, class_names, num_layers, active_layers,
                   config)  # fmt: skip


def packed_digest(
    *,
    num_classes: int,
    class_names: list[str] | None,
    num_layers: int,
    active_layers: list[str],
    config: dict[str, Any],
    parts: Iterable[Sequence[Any]],
) -> str:
    """sha256 (hex) of a packed version's rows; ``parts`` = (part name, blob sha256)."""
    refs = sorted([str(part), str(sha)] for part, sha in parts)
    return _digest(PACKED_FORMAT, "parts", refs, num_classes, class_names, num_layers,
                   active_layers, config)  # fmt: skip


def _digest(
    version: int,
    key: str,
    refs: list,
    num_classes: int,
    class_names: list[str] | None,
    num_layers: int,
    active_layers: list[str],
    config: dict[str, Any],
) -> str:
    payload = {
        "v": version,
        "num_classes": int(num_classes),
        "class_names": class_names,
        "num_layers": int(num_layers),
        "active_layers": list(active_layers),
        "config": config,
        key: refs,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
