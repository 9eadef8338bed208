"""Merged serving modules that share the frozen base's tensors instead of copying them.

:meth:`TAPSModel.merged` returns a standalone copy (every tensor copied: ~18 MB for
EfficientNet-Lite0), right for users who may go on to modify it. A server keeps one merged
module per loaded task version and never modifies them, so the functions here build the same
module (the same forward, weights with the same bits) where every tensor the task does not
change IS the model's own tensor: a loaded task costs the memory of its patch (its adapted
layers' weights, its norms and head), not of a base copy. Module objects are new (shallow
clones), so nothing of the result is shared mutable *state*.

The result has no task state and nothing in its forward writes to a shared object (eval mode,
no grad), so any number of threads may call it at once.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from taps_cl.errors import BaseMismatchError
from taps_cl.taps.deltas import decode_delta, kind_of, stored_keys
from taps_cl.taps.layer import TaskAdaptiveLayer
from taps_cl.taps.model import TAPSModel, _check_patch_layers, describe_task
from taps_cl.taps.modules import TaskHeads, TaskNorm
from taps_cl.taps.patch import TaskPatch, parameter_kinds
from taps_cl.taps.wrap import Transparent

_FAST = (TaskAdaptiveLayer, TaskNorm, TaskHeads)  # wrappers merge_patch folds without a load


def shared_merged(model: TAPSModel, name: str | None) -> nn.Module:
    """Task ``name`` (loaded in ``model``) as a plain frozen ``nn.Module`` in eval mode
    (``None``: the base), computing what ``model.merged(name)`` computes, sharing every
    unchanged tensor with ``model``. Never modify it in place: ``model.merged`` is for that."""
    if name is not None:
        model.task_info(name)
    return _assemble(model, {id(m): _plain(m, name) for m in _wrappers(model)})


def merge_patch(model: TAPSModel, patch: TaskPatch, *, consume: bool = False) -> nn.Module:
    """``patch`` folded onto ``model``'s base without loading it as a task: what
    ``model.load_patch(patch)`` then ``shared_merged(model, patch.name)`` give (same checks,
    same bits), at the cost of the patch's own tensors only. ``model`` is not modified.
    ``consume=True`` lets the result take over (and overwrite) the patch's tensors instead of
    copying them; only for a patch the caller drops afterwards (e.g. one just read)."""
    if not all(isinstance(m, _FAST) for m in _wrappers(model)):  # e.g. gated attention
        scratch = next(f"{_SCRATCH}{i}" for i in range(len(model.tasks) + 1)
                       if f"{_SCRATCH}{i}" not in model.tasks)  # fmt: skip
        model.load_patch(patch, name=scratch)
        try:
            out = shared_merged(model, scratch)
        finally:
            model.remove_task(scratch)
        describe_task(out, patch.num_classes, patch.class_names)
        return out
    _check_patch(model, patch)
    used: set[str] = set()
    replace: dict[int, nn.Module] = {}
    device = model.heads.base.weight.device
    for where, layer in model.layers():
        replace[id(layer)] = _folded(layer, where, patch, used, consume)
    for where, norm in model.norms():
        own = _own(patch, f"norm.{where}.", used, consume, device)
        replace[id(norm)] = _filled(_clone(norm.base, {}), own, f"norm {where}")
    base = model.heads.base
    head = nn.Linear(base.in_features, patch.num_classes, base.bias is not None, device="meta")
    replace[id(model.heads)] = _filled(head, _own(patch, "head.", used, consume, device), "head")
    kinds = parameter_kinds()
    unused = sorted({k for k in patch.tensors if k.split(".")[0] in kinds} - used)
    if unused:
        raise ValueError(f"patch {patch.name!r} holds tensors this model lacks: {unused[:5]}")
    out = _assemble(model, replace)
    describe_task(out, patch.num_classes, patch.class_names)  # timm/HF class metadata
    return out


_SCRATCH = "merge-scratch-"  # a patch that must be loaded is, under the first free such name


def _wrappers(model: TAPSModel) -> list[Transparent]:
    """The outermost TAPS wrappers of ``model.base``, in module order."""
    out, done = [], []
    for path, module in model.base.named_modules():
        if isinstance(module, Transparent) and not any(path.startswith(d) for d in done):
            out.append(module)
            done.append(path + ".")
    return out


def _check_patch(model: TAPSModel, patch: TaskPatch) -> None:
    if patch.base_fingerprint != model.base_fingerprint:
        raise BaseMismatchError(
            f"patch {patch.name!r} was trained on base {patch.base_fingerprint[:12]}, "
            f"this model's base is {model.base_fingerprint[:12]}; load the matching base"
        )
    if patch.num_layers != model.num_layers:
        raise ValueError(f"patch has {patch.num_layers} gated layers, model has {model.num_layers}")
    _check_patch_layers(model, patch)


def _own(patch: TaskPatch, prefix: str, used: set[str], consume: bool, device) -> dict:
    own = {k[len(prefix) :]: v for k, v in patch.tensors.items() if k.startswith(prefix)}
    used.update(prefix + k for k in own)
    return {k: v.to(device, copy=not consume) for k, v in own.items()}


def _folded(
    layer: TaskAdaptiveLayer, where: str, patch: TaskPatch, used: set, consume: bool
) -> nn.Module:
    """The layer's base module with ``w_base + dw`` (the decoded stored delta, as a frozen
    task computes it) if the patch keeps a delta there, else with the base weight itself."""
    keys = {k: f"{k}.{where}" for k in stored_keys()}
    stored = {k: patch.tensors[p] for k, p in keys.items() if p in patch.tensors}
    used.update(keys[k] for k in stored)
    used.add(f"score.{where}")
    plain = _clone(layer.base_layer, {})
    if kind_of(stored) is not None:
        w = layer.base_weight
        delta = decode_delta(stored, w)  # the one decode a loaded task uses
        delta = delta.to(w.device)
        with torch.no_grad():  # w + dw, as a frozen task computes it (+ commutes bit for bit)
            ptr = delta.untyped_storage().data_ptr()  # a kind may hand back a stored tensor
            own = consume or all(ptr != t.untyped_storage().data_ptr() for t in stored.values())
            weight = delta.add_(w) if own and delta.dtype == w.dtype else w + delta
        setattr(plain, layer.weight_attr, nn.Parameter(weight, requires_grad=False))
    return plain


def _filled(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> nn.Module:
    """``module`` (a clone sharing the base's tensors, or on "meta") holding ``tensors``:
    assigned, never copied into, so the base's own tensors are never written."""
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:  # missing/unexpected keys or shapes: a patch for another model
        raise ValueError(f"patch does not fit {what}: {err}") from err
    return module.requires_grad_(False).eval()


def _plain(module: Transparent, name: str | None) -> nn.Module:
    if isinstance(module, TaskAdaptiveLayer):
        plain = _clone(module.base_layer, {})
        if name is not None and module.is_active(name):
            with torch.no_grad():  # the very sum the gated forward computes: same bits
                weight = module.effective_weight(name).detach()
            setattr(plain, module.weight_attr, nn.Parameter(weight, requires_grad=False))
        return plain
    if isinstance(module, (TaskNorm, TaskHeads)):
        own = name is not None and name in module.tasks
        return _clone(module.tasks[name] if own else module.base, {})
    return module.plain(name)  # other wrappers (attention) make their own full copy


def _assemble(model: TAPSModel, replace: dict[int, nn.Module]) -> nn.Module:
    return _clone(model.base, replace).requires_grad_(False).eval()


def _clone(module: nn.Module, replace: dict[int, nn.Module]) -> nn.Module:
    """A new module tree shaped like ``module``: the same tensors, new module objects and
    containers (so ``.eval()``, hooks or new attributes on it never reach ``module``);
    submodules found in ``replace`` (by id) are swapped for their replacement."""
    if id(module) in replace:
        return replace[id(module)]
    new = object.__new__(type(module))
    new.__dict__ = {k: (copy.copy(v) if isinstance(v, (dict, set)) else v)
                    for k, v in module.__dict__.items()}  # fmt: skip
    new._modules = {k: (None if m is None else _clone(m, replace))
                    for k, m in module._modules.items()}  # fmt: skip
    return new
