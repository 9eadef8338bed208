"""Reads and writes on an open session. ``TaskStore`` owns the transactions around them: every
function here either runs inside one write transaction or only reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from taps_cl.errors import StoreIntegrityError, UnknownBaseError, UnknownTaskError
from taps_cl.routing.stats import ROUTE_PREFIX, RouteStats
from taps_cl.storage.digest import version_digest
from taps_cl.storage.models import (
    BaseRow,
    BaseTensorRow,
    BlobRow,
    TaskRow,
    VersionRow,
    VersionTensorRow,
)
from taps_cl.storage.serialize import sha256, tensor_from_bytes, tensor_to_bytes
from taps_cl.taps.patch import TaskPatch

_CHUNK = 500  # keeps IN (...) lists well below every driver's parameter limit


@dataclass
class Encoded:
    """Tensors turned into row contents (hashing happens before any lock is taken)."""

    refs: list[tuple[str, str, str, list[int]]]  # (tensor name, blob sha256, dtype, shape)
    blobs: dict[str, bytes]  # sha256 -> bytes (identical tensors collapse here already)

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> Encoded:
        refs, blobs = [], {}
        for name, tensor in tensors.items():
            data, dtype, shape = tensor_to_bytes(tensor)
            digest = sha256(data)
            blobs[digest] = data
            refs.append((name, digest, dtype, shape))
        return cls(refs, blobs)


@dataclass
class PreparedVersion:
    patch: TaskPatch
    metrics: dict[str, Any]
    config: dict[str, Any]
    encoded: Encoded
    routable: bool = False  # the patch carries valid route statistics


def check_route_tensors(tensors: dict[str, torch.Tensor], num_classes: int) -> bool:
    """Whether ``tensors`` carry route statistics; ``ValueError`` if they carry broken ones
    or ones for another number of classes (a store never holds statistics it cannot use)."""
    if not RouteStats.has_stats(tensors):
        return False
    stats = RouteStats.from_tensors(tensors)
    if stats.num_classes != num_classes:
        raise ValueError(
            f"route statistics are for {stats.num_classes} classes, the task has {num_classes}"
        )
    if stats.total == 0:
        raise ValueError("route statistics hold no samples")
    return True


# -- writes ----------------------------------------------------------------------------------


def ensure_base(session: Session, fingerprint: str) -> BaseRow:
    """The base row, registered under a placeholder name if this is its first appearance."""
    row = session.get(BaseRow, fingerprint)
    if row is None:
        row = BaseRow(
            fingerprint=fingerprint,
            name=f"base-{fingerprint[:12]}",
            source="unregistered: first seen in a commit",
            num_parameters=None,
        )
        session.add(row)
        session.flush()
    return row


def put_blobs(session: Session, blobs: dict[str, bytes]) -> int:
    """Insert the blobs the store lacks; return how many bytes that added."""
    keys, existing = list(blobs), set()
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        existing.update(session.scalars(select(BlobRow.sha256).where(BlobRow.sha256.in_(chunk))))
    new = [{"sha256": k, "size": len(d), "data": d} for k, d in blobs.items() if k not in existing]
    if new:
        session.execute(insert(BlobRow), new)
    return sum(row["size"] for row in new)


def insert_tensor_rows(session: Session, version_id: int, encoded: Encoded) -> None:
    rows = [
        {"version_id": version_id, "name": n, "blob_sha256": s, "dtype": d, "shape": shape}
        for n, s, d, shape in encoded.refs
    ]
    session.execute(insert(VersionTensorRow), rows)


def insert_version(session: Session, prep: PreparedVersion) -> int:
    """Write one new version of ``prep.patch``'s task; return its number.

    The task row is locked first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write lock
    is already held), so concurrent commits of one task get consecutive numbers.
    """
    patch = prep.patch
    ensure_base(session, patch.base_fingerprint)
    task = session.scalars(
        select(TaskRow)
        .where(TaskRow.base_fingerprint == patch.base_fingerprint, TaskRow.name == patch.name)
        .with_for_update()
    ).one_or_none()
    if task is None:
        task = TaskRow(
            base_fingerprint=patch.base_fingerprint,
            name=patch.name,
            num_classes=patch.num_classes,
            current_version=0,
            last_version=0,
        )
        session.add(task)
        session.flush()
    version = task.last_version + 1
    added = put_blobs(session, prep.encoded.blobs)
    row = VersionRow(
        task_id=task.id,
        version=version,
        num_classes=patch.num_classes,
        class_names=patch.class_names,
        num_layers=patch.num_layers,
        active_layers=list(patch.active_layers),
        config=prep.config,
        metrics=prep.metrics,
        num_parameters=patch.num_parameters,
        num_tensors=len(prep.encoded.refs),
        nbytes=patch.nbytes,
        added_bytes=added,
        routable=prep.routable,
    )
    row.digest = row_digest(row, prep.encoded.refs)
    session.add(row)
    session.flush()
    insert_tensor_rows(session, row.id, prep.encoded)
    task.current_version = task.last_version = version
    task.num_classes, task.class_names = patch.num_classes, patch.class_names
    return version


def lock_task(session: Session, task: TaskRow) -> TaskRow:
    """Re-read ``task`` with a row lock (PostgreSQL ``FOR UPDATE``; SQLite holds its write lock)."""
    return session.scalars(select(TaskRow).where(TaskRow.id == task.id).with_for_update()).one()


def add_route_tensors(
    session: Session, row: VersionRow, encoded: Encoded, nbytes: int, replace: bool
) -> None:
    """Attach ``route.*`` tensors to an existing version; its other tensors stay as they are.

    Existing route tensors are an error unless ``replace``; replaced blobs nobody else uses go.
    """
    route = VersionTensorRow.name.like(f"{ROUTE_PREFIX}%")
    mine = (VersionTensorRow.version_id == row.id) & route
    old = list(
        session.execute(
            select(VersionTensorRow.blob_sha256, BlobRow.size)
            .join(BlobRow, BlobRow.sha256 == VersionTensorRow.blob_sha256)
            .where(mine)
        )
    )
    if old and not replace:
        raise ValueError(
            f"version {row.version} already has route statistics; pass replace=True to replace"
        )
    session.execute(delete(VersionTensorRow).where(mine))
    added = put_blobs(session, encoded.blobs)
    insert_tensor_rows(session, row.id, encoded)
    row.num_tensors += len(encoded.refs) - len(old)
    row.nbytes += nbytes - sum(size for _, size in old)
    row.added_bytes += added
    row.routable = True
    row.digest = row_digest(row, tensor_refs(session, row))  # same transaction as the rows
    session.flush()
    gc_blobs(session, {sha for sha, _ in old} - set(encoded.blobs))


def delete_versions(session: Session, task: TaskRow, rows: list[VersionRow]) -> None:
    """Delete versions (and the task once it has none), then the blobs nobody references."""
    ids = [r.id for r in rows]
    shas = set(
        session.scalars(
            select(VersionTensorRow.blob_sha256).where(VersionTensorRow.version_id.in_(ids))
        )
    )
    session.execute(delete(VersionTensorRow).where(VersionTensorRow.version_id.in_(ids)))
    session.execute(delete(VersionRow).where(VersionRow.id.in_(ids)))
    latest = session.scalars(
        select(VersionRow).where(VersionRow.task_id == task.id).order_by(VersionRow.version.desc())
    ).first()
    if latest is None:
        session.delete(task)
    else:
        task.current_version = latest.version
        task.num_classes, task.class_names = latest.num_classes, latest.class_names
    session.flush()
    gc_blobs(session, shas)


def gc_blobs(session: Session, candidates: set[str]) -> None:
    """Delete the candidate blobs that no version and no base references any more."""
    keys = sorted(candidates)
    for i in range(0, len(keys), _CHUNK):
        used_by_version = select(VersionTensorRow.blob_sha256).where(
            VersionTensorRow.blob_sha256 == BlobRow.sha256
        )
        used_by_base = select(BaseTensorRow.blob_sha256).where(
            BaseTensorRow.blob_sha256 == BlobRow.sha256
        )
        session.execute(
            delete(BlobRow)
            .where(BlobRow.sha256.in_(keys[i : i + _CHUNK]))
            .where(~used_by_version.exists(), ~used_by_base.exists()),
            execution_options={"synchronize_session": False},
        )


def replace_base_weights(session: Session, fingerprint: str, encoded: Encoded) -> None:
    old = set(
        session.scalars(
            select(BaseTensorRow.blob_sha256).where(BaseTensorRow.base_fingerprint == fingerprint)
        )
    )
    session.execute(delete(BaseTensorRow).where(BaseTensorRow.base_fingerprint == fingerprint))
    put_blobs(session, encoded.blobs)
    rows = [
        {"base_fingerprint": fingerprint, "name": n, "position": i, "blob_sha256": s}
        | {"dtype": d, "shape": shape}
        for i, (n, s, d, shape) in enumerate(encoded.refs)
    ]
    session.execute(insert(BaseTensorRow), rows)
    gc_blobs(session, old - set(encoded.blobs))


# -- reads -----------------------------------------------------------------------------------


def find_task(session: Session, name: str, base: str | None, where: str) -> TaskRow:
    stmt = select(TaskRow).where(TaskRow.name == name)
    if base is not None:
        stmt = stmt.where(TaskRow.base_fingerprint == base)
    rows = list(session.scalars(stmt))
    if not rows:
        known = sorted(set(session.scalars(select(TaskRow.name).limit(20))))
        on = f" on base {base[:12]}" if base else ""
        raise UnknownTaskError(f"no task {name!r}{on} in {where}; tasks: {known or 'none'}")
    if len(rows) > 1:
        bases = sorted(r.base_fingerprint for r in rows)
        raise ValueError(f"task {name!r} exists for several bases {bases}; pass base=<fingerprint>")
    return rows[0]


def find_version(session: Session, task: TaskRow, version: int | None) -> VersionRow:
    wanted = task.current_version if version is None else version
    row = session.scalars(
        select(VersionRow).where(VersionRow.task_id == task.id, VersionRow.version == wanted)
    ).one_or_none()
    if row is None:
        have = list(
            session.scalars(select(VersionRow.version).where(VersionRow.task_id == task.id))
        )
        raise UnknownTaskError(f"task {task.name!r} has no version {wanted}; versions: {have}")
    return row


def find_base(session: Session, fingerprint: str) -> BaseRow:
    row = session.get(BaseRow, fingerprint)
    if row is None:
        raise UnknownBaseError(f"the store has never seen base {fingerprint}")
    return row


def row_digest(row: VersionRow, refs: list) -> str:
    """The digest of a version's rows; ``refs`` = (name, blob sha256, dtype, shape)."""
    return version_digest(
        num_classes=row.num_classes,
        class_names=row.class_names,
        num_layers=row.num_layers,
        active_layers=row.active_layers,
        config=row.config,
        tensors=refs,
    )


def tensor_refs(session: Session, row: VersionRow) -> list:
    t = VersionTensorRow
    stmt = select(t.name, t.blob_sha256, t.dtype, t.shape).where(t.version_id == row.id)
    return [tuple(r) for r in session.execute(stmt)]


def check_digest(row: VersionRow, refs: list, where: str) -> None:
    """``StoreIntegrityError`` unless the version's rows match the digest written with them."""
    try:
        actual = row_digest(row, refs)
    except (TypeError, ValueError) as err:  # e.g. a shape edited into a string or a NaN
        raise StoreIntegrityError(f"{where}: stored rows are unreadable ({err})") from err
    if row.digest != actual:
        raise StoreIntegrityError(
            f"{where}: its stored rows (tensor dtypes, shapes or names, classes, layers or "
            "config) do not match their digest; the database was edited or damaged: restore "
            "it from a backup or re-import the task"
        )


def _decode(row: Any, where: str) -> torch.Tensor:
    if row.data is None:
        raise StoreIntegrityError(f"{where}, tensor {row.name!r}: blob {row.sha[:12]} is missing")
    if sha256(row.data) != row.sha:
        raise StoreIntegrityError(
            f"{where}, tensor {row.name!r}: blob {row.sha[:12]} fails its sha256 check "
            "(the stored bytes were changed or truncated)"
        )
    try:
        return tensor_from_bytes(row.data, row.dtype, row.shape)
    except ValueError as err:
        raise StoreIntegrityError(f"{where}, tensor {row.name!r}: {err}") from err


def _tensor_rows(session: Session, table: type, where_clause: Any, order: Any) -> list:
    stmt = (
        select(table.name, table.dtype, table.shape, table.blob_sha256.label("sha"), BlobRow.data)
        .outerjoin(BlobRow, BlobRow.sha256 == table.blob_sha256)
        .where(where_clause)
        .order_by(order)
    )
    return list(session.execute(stmt))


def read_version_tensors(session: Session, row: VersionRow, where: str) -> dict:
    rows = _tensor_rows(
        session, VersionTensorRow, VersionTensorRow.version_id == row.id, VersionTensorRow.name
    )
    if len(rows) != row.num_tensors:
        raise StoreIntegrityError(f"{where}: {len(rows)} tensors found, {row.num_tensors} written")
    check_digest(row, [(r.name, r.sha, r.dtype, r.shape) for r in rows], where)
    return {r.name: _decode(r, where) for r in rows}


def read_route_tensors(session: Session, row: VersionRow, where: str) -> dict:
    """Only the ``route.*`` tensors of a version (the router needs nothing else)."""
    check_digest(row, tensor_refs(session, row), where)
    rows = _tensor_rows(
        session,
        VersionTensorRow,
        (VersionTensorRow.version_id == row.id) & VersionTensorRow.name.like(f"{ROUTE_PREFIX}%"),
        VersionTensorRow.name,
    )
    return {r.name: _decode(r, where) for r in rows}


def read_base_tensors(session: Session, fingerprint: str) -> dict:
    rows = _tensor_rows(
        session,
        BaseTensorRow,
        BaseTensorRow.base_fingerprint == fingerprint,
        BaseTensorRow.position,
    )
    return {r.name: _decode(r, f"base {fingerprint[:12]}") for r in rows}
