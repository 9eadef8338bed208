"""Export of one task version to a ``.safetensors`` file, and the checks a file passes before
it is imported, on any :class:`~taps_cl.storage.protocol.TaskStoreAPI` (the store owns the
transactions)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from taps_cl.errors import UnknownBaseError
from taps_cl.storage.layout import check_layout, check_values, validate_layout
from taps_cl.storage.protocol import TaskStoreAPI
from taps_cl.storage.serialize import read_patch_file, safe_target, write_patch_file
from taps_cl.taps.patch import TaskPatch

BaseLabel = tuple[str, str, int | None]  # (name, source, parameters) of a base a file brings


def export_version(
    store: TaskStoreAPI,
    name: str,
    path: str | os.PathLike,
    version: int | None,
    base: str | None,
    allow_symlink: bool,
) -> Path:
    target = safe_target(Path(path), allow_symlink)  # refuse before reading anything
    patch = store.load(name, version, base=base)
    record = next(
        v for v in store.versions(name, base=patch.base_fingerprint) if v.version == patch.version
    )
    base_rec = store.base(patch.base_fingerprint)
    meta = {
        "name": patch.name,
        "version": patch.version,
        "base_fingerprint": patch.base_fingerprint,
        "base": {
            "name": base_rec.name,
            "source": base_rec.source,
            "num_parameters": base_rec.num_parameters,
        },
        "num_classes": patch.num_classes,
        "class_names": patch.class_names,
        "num_layers": patch.num_layers,
        "active_layers": patch.active_layers,
        "config": patch.config,
        "metrics": record.metrics,
    }
    return write_patch_file(target, patch, meta, allow_symlink=allow_symlink)


def checked_import(
    store: TaskStoreAPI,
    path: str | os.PathLike,
    allow_new_base: bool,
    layout: Mapping[str, Any] | None,
) -> tuple[TaskPatch, dict[str, Any], BaseLabel]:
    """The file's patch, its metrics and the label of its base, checked completely before
    anything is written (the store then commits the patch, and a new base, in one
    transaction)."""
    patch, meta = read_patch_file(path)
    fp = patch.base_fingerprint
    check_values(patch, str(path))
    try:
        known = store.base(fp) is not None
    except UnknownBaseError:
        known = False
    info = meta.get("base") if isinstance(meta.get("base"), dict) else {}
    if not known and not allow_new_base:
        label = f"{info.get('name', '?')} ({info.get('source') or 'unknown source'})"
        raise UnknownBaseError(
            f"{path} holds task {patch.name!r} for base {fp} = {label}, which this store has "
            "never seen; register that base (TaskStore.register_base) or pass "
            "allow_new_base=True"
        )
    if layout is None and known:
        layout = store.base_layout(fp)
    if layout is not None:
        check_layout(patch, validate_layout(layout), str(path), fp)
    num = info.get("num_parameters")
    label = (
        str(info.get("name") or f"base-{fp[:12]}")[:200],
        str(info.get("source") or f"imported from {Path(path).name}"),
        num if isinstance(num, int) and not isinstance(num, bool) and num >= 0 else None,
    )
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    return patch, metrics, label
