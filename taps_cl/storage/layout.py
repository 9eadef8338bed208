"""What a patch may hold for one base, and the checks an imported patch must pass.

A base's *layout* maps every tensor name a patch of that base may carry (``delta.<layer>``,
``score.<layer>``, ``norm.<module>.<key>``, ``head.<key>``) to its dtype and shape; the first
dimension of ``head.*`` tensors is the task's class count and is stored as ``-1``. ``delta.*``
entries give the gated weight's shape: a patch may store the delta dense (``delta.<layer>``, in
float32, bfloat16, float16 or int8 with a per-output-channel ``scale.delta.<layer>``) or as
low-rank factors (``lora_b.<layer>``: out x r, ``lora_a.<layer>``: r x the rest, each optionally
int8 with its ``scale.``), whatever the config of the model that computed the layout. The store
keeps it per base (``bases.layout``) so that a file can be checked against its base without
the model; an :class:`~taps_cl.engine.Engine` computes it from its live model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from taps_cl.errors import InvalidPatchError
from taps_cl.taps.patch import TaskPatch

LAYOUT_FORMAT = 1
_CLASSES = -1  # placeholder for the class count in head shapes
_PROBE = "layout_probe"
_PROBE_CLASSES = 7
_DELTA_FORMS = ("delta", "lora_a", "lora_b", "scale")
_DELTA_DTYPES = ("float32", "bfloat16", "float16", "int8")


def model_layout(model: Any) -> dict[str, Any]:
    """The layout of a :class:`~taps_cl.taps.model.TAPSModel`'s base (every layer adapted, own
    norms), from the patch of a throwaway task that is removed again."""
    model.add_task(_PROBE, _PROBE_CLASSES)
    try:
        patch = model.export_patch(_PROBE)
    finally:
        model.remove_task(_PROBE)
    tensors = {}
    for name, layer in model.layers():
        tensors[f"delta.{name}"] = ["float32", list(layer.base_weight.shape)]
    for key, t in patch.tensors.items():
        if key.split(".", 1)[0] in _DELTA_FORMS:
            continue  # the probe's own delta form; delta.* above holds the weight shapes
        shape = list(t.shape)
        if key.startswith("head.") and shape and shape[0] == _PROBE_CLASSES:
            shape[0] = _CLASSES
        tensors[key] = [str(t.dtype).removeprefix("torch."), shape]
    return {"v": LAYOUT_FORMAT, "num_layers": patch.num_layers, "tensors": tensors}


def validate_layout(layout: object) -> dict[str, Any]:
    """``layout`` if it is a layout this code reads, else ``ValueError``."""
    ok = (
        isinstance(layout, Mapping)
        and layout.get("v") == LAYOUT_FORMAT
        and isinstance(layout.get("num_layers"), int)
        and isinstance(layout.get("tensors"), Mapping)
    )
    if not ok:
        raise ValueError("a base layout must come from taps_cl.storage.layout.model_layout")
    return dict(layout)


def check_values(patch: TaskPatch, where: str) -> None:
    """What holds for every patch of any base: float parameters (integer norm counters
    allowed), 0-d scores, finite values, active layers that carry deltas."""
    for key, t in patch.tensors.items():
        kind = key.split(".", 1)[0]
        quantised = t.dtype == torch.int8 and f"scale.{key}" in patch.tensors
        if kind in ("delta", "lora_a", "lora_b", "score", "head", "scale") and not (
            t.is_floating_point() or quantised
        ):
            raise InvalidPatchError(f"{where}: tensor {key!r} has dtype {t.dtype}, not a float")
        if kind == "score" and t.dim() != 0:
            raise InvalidPatchError(f"{where}: score {key!r} has shape {list(t.shape)}, not 0-d")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise InvalidPatchError(f"{where}: tensor {key!r} holds NaN or infinite values")
    missing = [
        n
        for n in patch.active_layers
        if f"delta.{n}" not in patch.tensors
        and not {f"lora_a.{n}", f"lora_b.{n}"} <= set(patch.tensors)
    ]
    if missing:
        raise InvalidPatchError(f"{where}: active layers without deltas: {missing[:5]}")


def check_layout(patch: TaskPatch, layout: Mapping[str, Any], where: str, base: str) -> None:
    """Every tensor of ``patch`` must be one the base has, with its dtype and shape, and every
    gated layer must have its score; ``InvalidPatchError`` names the first misfit."""
    expected = layout["tensors"]
    hint = (
        f"it does not fit base {base[:12]} (a file relabelled to another base, or a damaged or "
        "edited file)"
    )
    for key, t in patch.tensors.items():
        if key.startswith("route."):
            continue  # statistics of base features; checked by the store against the classes
        if key.split(".", 1)[0] in _DELTA_FORMS:
            _check_delta_form(patch, key, t, expected, f"{where}: tensor {key!r}", hint)
            continue
        if key not in expected:
            raise InvalidPatchError(f"{where}: tensor {key!r} is not a tensor of this base; {hint}")
        dtype, shape = expected[key]
        want = [patch.num_classes if d == _CLASSES else d for d in shape]
        if list(t.shape) != want or str(t.dtype).removeprefix("torch.") != dtype:
            got = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            raise InvalidPatchError(f"{where}: tensor {key!r} is {got}, the base needs "
                                    f"{dtype}{want}; {hint}")  # fmt: skip
    scores = [k for k in expected if k.startswith("score.")]
    lacking = [k for k in scores if k not in patch.tensors]
    if lacking or patch.num_layers != layout["num_layers"]:
        raise InvalidPatchError(
            f"{where}: {patch.num_layers} gated layers and {len(lacking)} missing scores "
            f"(e.g. {lacking[:2]}), the base has {layout['num_layers']}; {hint}"
        )


def _check_delta_form(patch, key, t, expected, what: str, hint: str) -> None:
    """A dense delta, a low-rank factor or an int8 scale must fit its gated weight's shape."""
    kind, rest = key.split(".", 1)
    if kind == "scale":
        kind, rest = rest.split(".", 1)
        owner = patch.tensors.get(f"{kind}.{rest}")
        if owner is None or owner.dtype != torch.int8:
            raise InvalidPatchError(f"{what} scales no int8 tensor; {hint}")
        if list(t.shape) != [owner.shape[0]]:
            raise InvalidPatchError(f"{what} has shape {list(t.shape)}, needs [{owner.shape[0]}]")
        return
    weight = expected.get(f"delta.{rest}")
    if weight is None:
        raise InvalidPatchError(f"{what} names no gated layer of this base; {hint}")
    shape = weight[1]
    if str(t.dtype).removeprefix("torch.") not in _DELTA_DTYPES:
        raise InvalidPatchError(f"{what} has dtype {t.dtype}; deltas are {_DELTA_DTYPES}")
    if kind == "delta":
        want = list(shape)
    else:
        a = patch.tensors.get(f"lora_a.{rest}")
        if a is None or f"lora_b.{rest}" not in patch.tensors:
            raise InvalidPatchError(f"{what} comes without its other low-rank factor; {hint}")
        rank = a.shape[0] if a.dim() == 2 else -1  # the rank both factors must agree on
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        want = [rank, fan_in] if kind == "lora_a" else [shape[0], rank]
    if list(t.shape) != want or (kind != "delta" and want[0] < 1):
        raise InvalidPatchError(f"{what} is {list(t.shape)}, the base needs {want}; {hint}")
