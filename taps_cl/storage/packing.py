"""The packed form of a task version: its tensors as a few blobs, each a standard safetensors
byte string (no pickle; readable by ``safetensors.torch.load``), one per *part*.

A version's tensors split into two parts: ``"route"`` (the ``route.*`` routing statistics, which
a router reads without the patch and ``add_route_stats`` adds later) and ``"patch"``
(everything else: deltas, scales, scores, norms, head). A part's blob is content-addressed like
any other blob (identical parts are stored once), its sha256 is in the version's digest, and
reading checks the sha256, the safetensors structure, and that every tensor belongs to the part.

Packing replaces one blob and one ``version_tensors`` row per tensor (about 400 for a compact
EfficientNet-Lite0 patch) with one blob and one ``version_parts`` row per part: what the store
holds is then the tensors' bytes plus one safetensors header per part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from taps_cl.errors import StoreIntegrityError
from taps_cl.routing.stats import ROUTE_PREFIX
from taps_cl.storage.serialize import sha256, tensor_from_bytes, tensor_to_bytes

PATCH, ROUTE = "patch", "route"
PARTS = (PATCH, ROUTE)
# torch dtype name (taps_cl.taps.patchfile) <-> safetensors dtype code
_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_NAMES = {code: name for name, code in _CODES.items()}


@dataclass(frozen=True)
class Part:
    """One packed part of a version: its blob and what the ``version_parts`` row records."""

    part: str  # "patch" or "route"
    sha256: str  # of ``data``
    data: bytes  # safetensors byte string of the part's tensors
    num_tensors: int
    nbytes: int  # bytes of the tensors themselves (``data`` adds the safetensors header)


def part_of(name: str) -> str:
    """The part a tensor of a patch belongs to."""
    return ROUTE if name.startswith(ROUTE_PREFIX) else PATCH


def pack(tensors: Mapping[str, torch.Tensor]) -> dict[str, Part]:
    """The parts of ``tensors`` (only parts that hold tensors; none for no tensors)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        groups.setdefault(part_of(name), {})[name] = tensor
    return {part: _pack_part(part, group) for part, group in sorted(groups.items())}


def _pack_part(part: str, tensors: dict[str, torch.Tensor]) -> Part:
    from safetensors.torch import save

    plain, nbytes = {}, 0
    for name, tensor in tensors.items():
        data, dtype, shape = tensor_to_bytes(tensor)  # a dense CPU copy that owns its memory
        if dtype not in _CODES:
            raise TypeError(
                f"tensor {name!r} has dtype {dtype}, which packed storage cannot hold; "
                f"supported: {sorted(_CODES)}"
            )
        plain[name] = tensor_from_bytes(data, dtype, shape)
        nbytes += len(data)
    data = save(plain)  # deterministic: ordered by dtype and name, whatever the dict's order
    return Part(part, sha256(data), data, len(plain), nbytes)


def unpack(data: bytes | None, part: str, sha: str, where: str) -> dict[str, torch.Tensor]:
    """The tensors of one stored part, checked: the blob exists and matches its sha256, is a
    well-formed safetensors byte string, and holds only tensors of ``part``."""
    from safetensors import SafetensorError, deserialize

    what = f"{where}, part {part!r}"
    if data is None:
        raise StoreIntegrityError(f"{what}: blob {sha[:12]} is missing")
    if sha256(data) != sha:
        raise StoreIntegrityError(
            f"{what}: blob {sha[:12]} fails its sha256 check (the stored bytes were changed or "
            "truncated)"
        )
    try:
        items = deserialize(bytes(data))
    except (SafetensorError, ValueError) as err:
        raise StoreIntegrityError(f"{what}: not a readable safetensors blob ({err})") from err
    tensors = {}
    for name, info in items:
        if part_of(name) != part:
            raise StoreIntegrityError(f"{what}: holds tensor {name!r} of another part")
        tensors[name] = _tensor(info, f"{what}, tensor {name!r}")
    return tensors


def _tensor(info: dict, where: str) -> torch.Tensor:
    dtype = _NAMES.get(info["dtype"])
    if dtype is None:
        raise StoreIntegrityError(f"{where}: unsupported dtype {info['dtype']!r}")
    buffer, shape = info["data"], list(info["shape"])
    if not isinstance(buffer, bytearray):
        buffer = bytearray(buffer)  # writable: the caller owns what it loads
    try:
        if not buffer:  # torch.frombuffer refuses empty buffers
            return tensor_from_bytes(b"", dtype, shape)
        flat = torch.frombuffer(buffer, dtype=torch.uint8)  # the buffer is ours: no copy
        return flat.view(getattr(torch, dtype)).reshape(shape)
    except (RuntimeError, ValueError) as err:
        raise StoreIntegrityError(f"{where}: {err}") from err
