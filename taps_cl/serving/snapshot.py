"""A snapshot of a task store: chosen task versions copied into a new SQLite file.

Why a store and not a folder of patch files: the served model then reads it exactly as it
reads a live store (read-only, sha256-checked), and the copy goes through the store's own
export and import, so what is copied is what ``taps-cl export`` writes (patches with their
route statistics), checked against the base's layout on the way in.

Each task becomes version 1 of the snapshot; the returned mapping says which source version
it is, and the served model reports that number.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from taps_cl.storage import TaskStore, TaskStoreAPI

__all__ = ["snapshot_store", "chosen_versions"]


def chosen_versions(
    store: TaskStoreAPI, fingerprint: str, tasks: Iterable[str] | Mapping[str, int] | None
) -> dict[str, int]:
    """Task -> version: every task of the base at its current version (``tasks=None``), the
    named tasks at their current versions, or the mapping as given (checked to exist)."""
    records = {r.name: r for r in store.list_tasks(base=fingerprint)}
    if tasks is None:
        chosen = {n: r.current_version for n, r in records.items()}
    elif isinstance(tasks, Mapping):
        chosen = dict(tasks)
    else:
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = sorted(set(names) - set(records))
        if unknown:
            raise ValueError(f"no task {unknown[0]!r} in {store.url}; known: {sorted(records)}")
        chosen = {n: records[n].current_version for n in names}
    for name, version in chosen.items():
        known = [v.version for v in store.versions(name, base=fingerprint)]
        if version not in known:
            raise ValueError(f"task {name!r} has no version {version!r}; versions: {known}")
    if not chosen:
        raise ValueError(f"no tasks of base {fingerprint[:12]} in {store.url} to snapshot")
    return dict(sorted(chosen.items()))


def snapshot_store(
    store: TaskStoreAPI, fingerprint: str, chosen: Mapping[str, int], path: str | os.PathLike
) -> Path:
    """Write the ``chosen`` versions of ``store`` into a new SQLite store at ``path``."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; a snapshot is written to a new file")
    record = store.base(fingerprint)
    layout = store.base_layout(fingerprint)
    with TaskStore(path) as dst, tempfile.TemporaryDirectory() as tmp:
        dst.register_base(
            fingerprint, record.name, record.source, record.num_parameters, layout=layout
        )
        for name, version in chosen.items():
            file = store.export(name, Path(tmp) / f"{name}-v{version}.safetensors", version,
                                base=fingerprint)  # fmt: skip
            dst.import_file(file, layout=layout)
    return path
