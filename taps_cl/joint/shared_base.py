"""Training the shared base in a joint run: which weights are the base's, the new base they form,
and opening a base whose weights the store keeps."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from taps_cl.bases import Base, fingerprint
from taps_cl.errors import BaseMismatchError
from taps_cl.taps.model import TAPSModel


def base_parameters(model: TAPSModel) -> list[nn.Parameter]:
    """The shared base weights: every parameter of the base that no task owns, minus the base
    norms and head kept for the no-task path (tasks use their own copies, not these)."""
    owned: set[int] = {id(p) for p in model.heads.parameters()}
    for _, layer in model.layers():  # every per-task dict (deltas of any kind, scores)
        per_task = (d for d in layer.children() if isinstance(d, nn.ParameterDict))
        owned |= {id(p) for d in per_task for p in d.parameters()}
    for _, norm in model.norms():
        owned |= {id(p) for p in norm.parameters()}
    return [p for p in model.base.parameters() if id(p) not in owned]


def trained_base(model: TAPSModel, template: nn.Module) -> nn.Module:
    """A plain copy of ``template`` (the original base architecture) holding ``model``'s
    current base weights: wrapped layers' base weights, the base norms and the original head
    (which training leaves alone), and every non-wrapped module. CPU, eval mode, frozen.
    The unwrapping is the model's own (``merged(None)``), not a guess from state_dict keys."""
    plain = model.merged(None).state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in plain.items()}
    new = copy.deepcopy(template).cpu()
    new.load_state_dict(state, strict=True)
    return new.requires_grad_(False).eval()


def stored_base(store: Any, fp: str, like: Base) -> Base:
    """The base kept in ``store`` under fingerprint ``fp`` (e.g. by a ``train_base`` run),
    built on the architecture and preprocessing of ``like``."""
    state = store.load_base_weights(fp)
    module = copy.deepcopy(like.module).cpu()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BaseMismatchError(
            f"stored base {fp[:12]} does not fit the architecture of {like.name!r}: {err}"
        ) from err
    if fingerprint(module) != fp:
        raise BaseMismatchError(f"stored base {fp[:12]} changes when loaded into {like.name!r}")
    record = store.base(fp)
    return Base(module.requires_grad_(False).eval(), record.name, record.source, like.preprocessing)


def new_base_label(base: Base, old_fingerprint: str, names: Sequence[str]) -> tuple[str, str]:
    """(name, source) recorded for the base a ``train_base`` run creates."""
    name = f"{base.name}+joint({','.join(names)})"
    if len(name) > 200:
        name = f"{base.name[:150]}+joint({len(names)} tasks)"
    return name, f"joint training of {list(names)} from base {old_fingerprint} ({base.source})"
