"""The row digest of a task version: sha256 over what decides how its tensors are rebuilt and
used (tensor names, blobs, dtypes, shapes; classes, layers and config). Blobs have their own
sha256; this covers the rows that point at them, so an edited ``dtype``, ``shape`` or
``image_size`` is an integrity error instead of silently different outputs.

The format is frozen (``"v": 1``): migration ``0003`` computes it for existing versions, so a
change needs a new format number and a migration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

FORMAT = 1


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
    payload = {
        "v": FORMAT,
        "num_classes": int(num_classes),
        "class_names": class_names,
        "num_layers": int(num_layers),
        "active_layers": list(active_layers),
        "config": config,
        "tensors": refs,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
