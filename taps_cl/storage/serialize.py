"""The store's side of the patch file format (:mod:`taps_cl.taps.patchfile`): files of
:class:`~taps_cl.taps.patch.TaskPatch`, and the tensor codec and checks storage builds on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from taps_cl.taps.patch import TaskPatch
from taps_cl.taps.patchfile import (
    FINGERPRINT_RE,
    FORMAT,
    FORMAT_VERSION,
    json_dict,
    safe_target,
    sha256,
    tensor_from_bytes,
    tensor_to_bytes,
    validate_fingerprint,
)
from taps_cl.taps.patchfile import read_patch_file as _read
from taps_cl.taps.patchfile import write_patch_file as _write

__all__ = [
    "FINGERPRINT_RE",
    "FORMAT",
    "FORMAT_VERSION",
    "json_dict",
    "read_patch_file",
    "safe_target",
    "sha256",
    "tensor_from_bytes",
    "tensor_to_bytes",
    "validate_fingerprint",
    "write_patch_file",
]


def write_patch_file(
    path: Path, patch: TaskPatch, meta: dict[str, Any], *, allow_symlink: bool = False
) -> Path:
    """Write ``patch``'s tensors and ``meta`` to one ``.safetensors`` file (atomic; see
    :func:`taps_cl.taps.patchfile.write_patch_file`)."""
    return _write(path, patch.tensors, meta, allow_symlink=allow_symlink)


def read_patch_file(path: str | os.PathLike) -> tuple[TaskPatch, dict[str, Any]]:
    """The :class:`TaskPatch` in a file written by :func:`write_patch_file` (every tensor
    checked by sha256) and the file's metadata; the patch carries no version."""
    return _read(path, TaskPatch)
