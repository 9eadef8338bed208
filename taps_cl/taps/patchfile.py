"""Tensors <-> raw bytes, content hashes, and the single-file ``.safetensors`` patch format.

The method's own I/O: :meth:`TaskPatch.save`/:meth:`TaskPatch.load` and the store's export and
import (:mod:`taps_cl.storage.serialize`) all read and write patch files here. It imports
nothing of taps_cl but the errors, so the method never reaches into storage; whoever reads a
file says which patch type to build from it.

Nothing here unpickles: a tensor is its raw little-endian bytes plus a dtype string and a
shape, and everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from taps_cl.errors import StoreIntegrityError, UnsafeTargetError

P = TypeVar("P")

FORMAT = "taps_cl.patch"
FORMAT_VERSION = 1
FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def validate_fingerprint(fingerprint: object) -> str:
    if not isinstance(fingerprint, str) or not FINGERPRINT_RE.fullmatch(fingerprint):
        raise ValueError(
            f"base fingerprint must be 64 lowercase hex digits (sha256), got {fingerprint!r}"
        )
    return fingerprint


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[bytes, str, list[int]]:
    """(raw bytes, dtype name, shape) of a dense CPU copy of ``tensor``."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise TypeError(f"only dense tensors can be stored, got {type(tensor).__name__}")
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"dtype {tensor.dtype} cannot be stored; supported: {sorted(_DTYPES)}")
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return data, name, list(tensor.shape)


def tensor_from_bytes(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; ``ValueError`` if the length does not fit."""
    if dtype not in _DTYPES:
        raise ValueError(f"unknown stored dtype {dtype!r}")
    dt = _DTYPES[dtype]
    numel = math.prod(shape)
    if len(data) != numel * dt.itemsize:
        raise ValueError(f"{len(data)} bytes for {dtype} of shape {shape}")
    if numel == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dt).reshape(shape)


def json_dict(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """A JSON round-tripped copy of ``value``; refuses what JSON (and PostgreSQL) cannot hold."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON (no NaN/inf, str keys): {err}") from err


# -- single-file export --------------------------------------------------------------------


def safe_target(path: Path, allow_symlink: bool = False) -> Path:
    """The file an export may replace: ``path`` itself, or with ``allow_symlink`` what a
    symlink there points to. Refuses anything but a regular file or a free name (devices,
    FIFOs, sockets, directories, and symlinks unless allowed) and a missing directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        if not allow_symlink:
            raise UnsafeTargetError(
                f"{path} is a symlink; refusing to replace it (allow_symlink=True / "
                "--follow-symlinks writes to the file it points to)"
            )
        return safe_target(path.resolve(), allow_symlink=False)
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = _file_kind(st.st_mode)
        raise UnsafeTargetError(f"{path} is {kind}; export only writes regular files")
    if not path.parent.is_dir():
        raise UnsafeTargetError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def write_patch_file(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    allow_symlink: bool = False,
) -> Path:
    """Write ``tensors`` and ``meta`` to one ``.safetensors`` file: to a temporary file in the
    target's directory, then renamed over the target (see :func:`safe_target`), mode 0644
    less the umask."""
    from safetensors.torch import save_file

    path = safe_target(Path(path), allow_symlink)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    meta["tensor_sha256"] = {k: sha256(tensor_to_bytes(v)[0]) for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        save_file(tensors, tmp, metadata={"taps_cl": json.dumps(meta)})
        os.chmod(tmp, 0o644 & ~_umask())
        path = safe_target(path)  # still a regular file or free (it may have changed meanwhile)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it,
    which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_patch_file(
    path: str | os.PathLike, patch_type: Callable[..., P]
) -> tuple[P, dict[str, Any]]:
    """Read a file written by :func:`write_patch_file`; every tensor is checked by sha256.
    ``patch_type`` (e.g. ``TaskPatch``) is called with the patch's fields and tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"patch file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("taps_cl", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, json.JSONDecodeError, OSError) as err:
        raise StoreIntegrityError(f"{path} is not a readable .safetensors file: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a .safetensors file but not a taps_cl task patch")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: patch format {meta.get('format_version')} is not supported")
    hashes = meta.get("tensor_sha256") or {}
    if set(hashes) != set(tensors):
        raise StoreIntegrityError(f"{path}: tensor list does not match its metadata")
    for key, tensor in tensors.items():
        if sha256(tensor_to_bytes(tensor)[0]) != hashes[key]:
            raise StoreIntegrityError(f"{path}: tensor {key!r} fails its sha256 check")
    return _patch_from_meta(path, meta, tensors, patch_type), meta


def _patch_from_meta(
    path: Path, meta: dict[str, Any], tensors: dict, patch_type: Callable[..., P]
) -> P:
    try:
        patch = patch_type(
            name=meta["name"],
            num_classes=int(meta["num_classes"]),
            tensors=tensors,
            active_layers=[str(x) for x in meta["active_layers"]],
            num_layers=int(meta["num_layers"]),
            base_fingerprint=validate_fingerprint(meta["base_fingerprint"]),
            class_names=meta.get("class_names"),
            config=json_dict(meta.get("config"), "config"),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: incomplete taps_cl metadata ({err!r})") from err
    return patch
