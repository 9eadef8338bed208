"""What a write needs, validated and encoded before any lock is taken: a version's packed
parts, or a base's weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from sqlalchemy.orm import Session

import taps_cl.storage.ops as ops
from taps_cl.bases import state_fingerprint
from taps_cl.storage.models import BaseRow
from taps_cl.storage.packing import pack
from taps_cl.storage.serialize import json_dict, validate_fingerprint
from taps_cl.taps.patch import TaskPatch, validate_task_name


def prepared(
    patch: TaskPatch, metrics: Mapping | None, config: Mapping | None
) -> ops.PreparedVersion:
    """Validate and encode one version before any lock is taken."""
    if not isinstance(patch, TaskPatch):
        raise TypeError(f"expected a TaskPatch, got {type(patch).__name__}")
    validate_task_name(patch.name)
    validate_fingerprint(patch.base_fingerprint)
    merged = {**json_dict(patch.config, "patch.config"), **json_dict(config, "config")}
    routable = ops.check_route_tensors(patch.tensors, patch.num_classes)
    return ops.PreparedVersion(
        patch, json_dict(metrics, "metrics"), merged, pack(patch.tensors), routable
    )


def base_weights_work(
    fingerprint: str,
    state_dict: Mapping[str, torch.Tensor],
    name: str | None,
    source: str,
) -> Callable[[Session], None]:
    """Validate and encode base weights now; return the write to run inside a transaction."""
    validate_fingerprint(fingerprint)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("state_dict must be a non-empty mapping of name -> tensor")
    actual = state_fingerprint(state_dict)
    if actual != fingerprint:
        raise ValueError(f"state_dict has fingerprint {actual[:12]}, not {fingerprint[:12]}")
    encoded = ops.Encoded.of(dict(state_dict))
    num = sum(t.numel() for t in state_dict.values() if t.is_floating_point())

    def work(session: Session) -> None:
        if session.get(BaseRow, fingerprint) is None:
            label = name or f"base-{fingerprint[:12]}"
            session.add(
                BaseRow(fingerprint=fingerprint, name=label, source=source, num_parameters=num)
            )
            session.flush()
        ops.replace_base_weights(session, fingerprint, encoded)

    return work
