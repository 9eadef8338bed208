"""What a patch may hold for one base, and the checks an imported patch must pass.

A base's *layout* maps every tensor name a patch of that base may carry (``delta.<layer>``,
``score.<layer>``, ``norm.<module>.<key>``, ``head.<key>``) to its dtype and shape; the first
dimension of ``head.*`` tensors is the task's class count and is stored as ``-1``. The store
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


def model_layout(model: Any) -> dict[str, Any]:
    """The layout of a :class:`~taps_cl.taps.model.TAPSModel`'s base (every layer adapted, own
    norms), from the patch of a throwaway task that is removed again."""
    model.add_task(_PROBE, _PROBE_CLASSES)
    try:
        patch = model.export_patch(_PROBE)
    finally:
        model.remove_task(_PROBE)
    tensors = {}
    for key, t in patch.tensors.items():
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
        if kind in ("delta", "score", "head") and not t.is_floating_point():
            raise InvalidPatchError(f"{where}: tensor {key!r} has dtype {t.dtype}, not a float")
        if kind == "score" and t.dim() != 0:
            raise InvalidPatchError(f"{where}: score {key!r} has shape {list(t.shape)}, not 0-d")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise InvalidPatchError(f"{where}: tensor {key!r} holds NaN or infinite values")
    missing = [n for n in patch.active_layers if f"delta.{n}" not in patch.tensors]
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
