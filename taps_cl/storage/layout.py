"""What a patch may hold for one base, and the checks an imported patch must pass.

A base's *layout* maps every tensor name a patch of that base may carry (``delta.<layer>``,
``score.<layer>``, ``norm.<module>.<key>``, ``head.<key>``) to its dtype and shape; the first
dimension of ``head.*`` tensors is the task's class count and is stored as ``-1``. ``route.*``
tensors (routing statistics) must be one whole form, full or compact, over the head's input
dimension. ``delta.*``
entries give the gated weight's shape: a patch may store a layer's delta as any registered
delta kind (:mod:`taps_cl.taps.deltas`: dense ``delta.<layer>``, low-rank factors
``lora_a.<layer>`` and ``lora_b.<layer>``, ...), each tensor in float32, bfloat16, float16 or
int8 with a per-output-channel ``scale.<key>.<layer>``, whatever the config of the model that
computed the layout; the kind says which shapes fit the weight. The store keeps the layout per
base (``bases.layout``) so that a file can be checked against its base without the model; an
:class:`~taps_cl.engine.Engine` computes it from its live model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from taps_cl.errors import InvalidPatchError
from taps_cl.registry import DELTA_KINDS
from taps_cl.routing.stats import COMPACT_KEYS, FULL_KEYS
from taps_cl.taps.deltas import delta_keys, kind_of, misfit
from taps_cl.taps.patch import TaskPatch

LAYOUT_FORMAT = 1
_CLASSES = -1  # placeholder for the class count in head shapes
_PROBE = "layout_probe"
_PROBE_CLASSES = 7
_DELTA_DTYPES = ("float32", "bfloat16", "float16", "int8")


def _delta_forms() -> tuple[str, ...]:
    """Tensor kinds that hold (part of) a stored delta: every kind's tensors and int8 scales."""
    return (*delta_keys(), "scale")


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
    forms = _delta_forms()
    for key, t in patch.tensors.items():
        if key.split(".", 1)[0] in forms:
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
    floats = (*_delta_forms(), "score", "head")
    for key, t in patch.tensors.items():
        kind = key.split(".", 1)[0]
        quantised = t.dtype == torch.int8 and f"scale.{key}" in patch.tensors
        if kind in floats and not (t.is_floating_point() or quantised):
            raise InvalidPatchError(f"{where}: tensor {key!r} has dtype {t.dtype}, not a float")
        if kind == "score" and t.dim() != 0:
            raise InvalidPatchError(f"{where}: score {key!r} has shape {list(t.shape)}, not 0-d")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise InvalidPatchError(f"{where}: tensor {key!r} holds NaN or infinite values")
    missing = [n for n in patch.active_layers if not _keeps_delta(patch, n)]
    if missing:
        raise InvalidPatchError(f"{where}: active layers without deltas: {missing[:5]}")


def _keeps_delta(patch: TaskPatch, layer: str) -> bool:
    """Whether ``patch`` stores every tensor of some delta kind for ``layer``."""
    return any(all(f"{k}.{layer}" in patch.tensors for k in kind.stored) for kind in DELTA_KINDS)


def check_layout(patch: TaskPatch, layout: Mapping[str, Any], where: str, base: str) -> None:
    """Every tensor of ``patch`` must be one the base has, with its dtype and shape, and every
    gated layer must have its score; ``InvalidPatchError`` names the first misfit."""
    expected = layout["tensors"]
    hint = (
        f"it does not fit base {base[:12]} (a file relabelled to another base, or a damaged or "
        "edited file)"
    )
    forms = _delta_forms()
    _check_route_form(patch, expected, where, hint)
    for key, t in patch.tensors.items():
        if key.startswith("route."):
            continue  # statistics of base features; the store checks their values and classes
        if key.split(".", 1)[0] in forms:
            _check_delta_form(patch, key, t, expected, where, hint)
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


def _check_route_form(patch: TaskPatch, expected: Mapping, where: str, hint: str) -> None:
    """``route.*`` tensors must be one whole form, full or compact (told apart by their names,
    :mod:`taps_cl.routing.stats`), over the base's feature dimension (the head's input)."""
    route = {k: t for k, t in patch.tensors.items() if k.startswith("route.")}
    if not route:
        return
    names = set(route) - {"route.calib"}
    if names not in (FULL_KEYS, COMPACT_KEYS):
        raise InvalidPatchError(
            f"{where}: route tensors {sorted(names)} are neither the full form "
            f"{sorted(FULL_KEYS)} nor the compact form {sorted(COMPACT_KEYS)}"
        )
    head = expected.get("head.weight")
    if head is None or len(head[1]) != 2:
        return  # no linear head in the layout: the feature dimension is not recorded
    dim = head[1][1]
    shapes = {"route.mean": [patch.num_classes, dim], "route.diag": [dim]}
    shapes["route.scatter"] = [dim * (dim + 1) // 2]
    for key, want in shapes.items():
        if key in route and list(route[key].shape) != want:
            got = list(route[key].shape)
            raise InvalidPatchError(
                f"{where}: tensor {key!r} has shape {got}, needs {want}; {hint}"
            )
    basis = route.get("route.basis")
    if basis is not None and (basis.ndim != 2 or basis.shape[1] != dim):
        got = list(basis.shape)
        raise InvalidPatchError(f"{where}: tensor 'route.basis' is {got}, needs [k, {dim}]; {hint}")


def _check_delta_form(patch, key, t, expected, where: str, hint: str) -> None:
    """A delta kind's tensor must fit its gated weight's shape with the kind's other tensors
    (:func:`~taps_cl.taps.deltas.misfit`); an int8 scale must fit the tensor it scales."""
    what = f"{where}: tensor {key!r}"
    kind, rest = key.split(".", 1)
    if kind == "scale":
        kind, rest = rest.split(".", 1)
        owner = patch.tensors.get(f"{kind}.{rest}")
        if owner is None or owner.dtype != torch.int8:
            raise InvalidPatchError(f"{what} scales no int8 tensor; {hint}")
        if list(t.shape) != [owner.shape[0]]:
            raise InvalidPatchError(f"{what} has shape {list(t.shape)}, needs [{owner.shape[0]}]")
        return
    weight = expected.get(f"delta.{rest}")  # the layout keeps every gated weight's shape here
    if weight is None:
        raise InvalidPatchError(f"{what} names no gated layer of this base; {hint}")
    if str(t.dtype).removeprefix("torch.") not in _DELTA_DTYPES:
        raise InvalidPatchError(f"{what} has dtype {t.dtype}; deltas are {_DELTA_DTYPES}")
    present = [k for k in delta_keys() if f"{k}.{rest}" in patch.tensors]
    try:
        delta_kind = kind_of(present)
    except ValueError as err:
        raise InvalidPatchError(f"{what}: layer {rest!r} stores two delta kinds; {hint}") from err
    given = {k: tuple(patch.tensors[f"{k}.{rest}"].shape) for k in present}
    bad = misfit(delta_kind, torch.Size(weight[1]), given)
    if bad:
        raise InvalidPatchError(f"{where}: tensor {f'{bad[0]}.{rest}'!r} {bad[1]}; {hint}")
