"""Writes on an open session, and the lookups they start from. ``TaskStore`` owns the
transactions around them: every function here either runs inside one write transaction or only
reads. Reading tensors back is :mod:`taps_cl.storage.reads`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import delete, insert, literal, select
from sqlalchemy.orm import Session

from taps_cl.errors import UnknownBaseError, UnknownTaskError
from taps_cl.routing.stats import ROUTE_PREFIX, RouteStats
from taps_cl.storage.digest import packed_digest, version_digest
from taps_cl.storage.models import (
    BaseRow,
    BaseTensorRow,
    BlobRow,
    TaskRow,
    VersionPartRow,
    VersionRow,
    VersionTensorRow,
)
from taps_cl.storage.packing import ROUTE, Part, pack
from taps_cl.storage.serialize import sha256, tensor_to_bytes
from taps_cl.taps.patch import TaskPatch

CHUNK = 500  # keeps IN (...) lists well below every driver's parameter limit


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


Parts = dict[str, Part]  # part name -> packed part (storage/packing.py)


@dataclass
class PreparedVersion:
    patch: TaskPatch
    metrics: dict[str, Any]
    config: dict[str, Any]
    parts: Parts  # the patch's tensors, packed (new versions are always packed)
    routable: bool = False  # the patch carries valid route statistics


@dataclass
class RouteTensors:
    """Route statistics to attach to a version, encoded both ways before any lock: per tensor
    (versions stored before packing keep that form) and as a packed ``route`` part."""

    encoded: Encoded
    part: Part
    nbytes: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> RouteTensors:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return cls(Encoded.of(tensors), pack(tensors)[ROUTE], nbytes)


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
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i : i + CHUNK]
        existing.update(session.scalars(select(BlobRow.sha256).where(BlobRow.sha256.in_(chunk))))
    new = [{"sha256": k, "size": len(d), "data": d} for k, d in blobs.items() if k not in existing]
    if new:
        session.execute(insert(BlobRow), new)
    return sum(row["size"] for row in new)


def insert_tensor_rows(session: Session, version_id: int, encoded: Encoded | Parts) -> None:
    """The rows that point a version at its tensors' blobs: one per part of a packed version,
    one per tensor of a version stored before packing."""
    if isinstance(encoded, Encoded):
        rows = [
            {"version_id": version_id, "name": n, "blob_sha256": s, "dtype": d, "shape": shape}
            for n, s, d, shape in encoded.refs
        ]
        session.execute(insert(VersionTensorRow), rows)
        return
    rows = [
        {"version_id": version_id, "part": p.part, "blob_sha256": p.sha256}
        | {"num_tensors": p.num_tensors, "nbytes": p.nbytes}
        for p in encoded.values()
    ]
    if rows:
        session.execute(insert(VersionPartRow), rows)


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
    added = put_blobs(session, {p.sha256: p.data for p in prep.parts.values()})
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
        num_tensors=sum(p.num_tensors for p in prep.parts.values()),
        nbytes=patch.nbytes,
        added_bytes=added,
        routable=prep.routable,
        packed=True,
    )
    row.digest = parts_digest(row, [(p.part, p.sha256) for p in prep.parts.values()])
    session.add(row)
    session.flush()
    insert_tensor_rows(session, row.id, prep.parts)
    task.current_version = task.last_version = version
    task.num_classes, task.class_names = patch.num_classes, patch.class_names
    return version


def lock_task(session: Session, task: TaskRow) -> TaskRow:
    """Re-read ``task`` with a row lock (PostgreSQL ``FOR UPDATE``; SQLite holds its write lock)."""
    return session.scalars(select(TaskRow).where(TaskRow.id == task.id).with_for_update()).one()


def add_route_tensors(
    session: Session, row: VersionRow, route: RouteTensors, replace: bool
) -> None:
    """Attach ``route.*`` tensors to an existing version; its other tensors stay as they are
    (a packed version gets a new ``route`` part, one stored before packing per-tensor rows).

    Existing route tensors are an error unless ``replace``; replaced blobs nobody else uses go.
    """
    swap = _swap_route_part if row.packed else _swap_route_rows
    old, rows, blobs, count = swap(session, row, route, replace)
    added = put_blobs(session, blobs)
    insert_tensor_rows(session, row.id, rows)
    row.num_tensors += count - sum(n for _, n, _ in old)
    row.nbytes += route.nbytes - sum(size for _, _, size in old)
    row.added_bytes += added
    row.routable = True
    session.flush()
    row.digest = current_digest(session, row)  # same transaction as the rows
    session.flush()
    gc_blobs(session, {sha for sha, _, _ in old} - set(blobs))


def _swap_route_part(session: Session, row: VersionRow, route: RouteTensors, replace: bool):  # noqa: ANN202
    """Remove a packed version's ``route`` part row: (old (sha, tensors, bytes), new rows,
    new blobs, new tensor count)."""
    t = VersionPartRow
    mine = (t.version_id == row.id) & (t.part == ROUTE)
    old = list(session.execute(select(t.blob_sha256, t.num_tensors, t.nbytes).where(mine)))
    _refuse_existing(old, row, replace)
    session.execute(delete(t).where(mine))
    part = route.part
    return old, {ROUTE: part}, {part.sha256: part.data}, part.num_tensors


def _swap_route_rows(session: Session, row: VersionRow, route: RouteTensors, replace: bool):  # noqa: ANN202
    """As :func:`_swap_route_part`, for a version stored per tensor."""
    t = VersionTensorRow
    mine = (t.version_id == row.id) & t.name.like(f"{ROUTE_PREFIX}%")
    stmt = select(t.blob_sha256, literal(1), BlobRow.size).join(
        BlobRow, BlobRow.sha256 == t.blob_sha256
    )
    old = list(session.execute(stmt.where(mine)))
    _refuse_existing(old, row, replace)
    session.execute(delete(t).where(mine))
    return old, route.encoded, route.encoded.blobs, len(route.encoded.refs)


def _refuse_existing(old: list, row: VersionRow, replace: bool) -> None:
    if old and not replace:
        raise ValueError(
            f"version {row.version} already has route statistics; pass replace=True to replace"
        )


def delete_versions(session: Session, task: TaskRow, rows: list[VersionRow]) -> None:
    """Delete versions (and the task once it has none), then the blobs nobody references."""
    ids = [r.id for r in rows]
    shas: set[str] = set()
    for table in (VersionTensorRow, VersionPartRow):
        mine = table.version_id.in_(ids)
        shas.update(session.scalars(select(table.blob_sha256).where(mine)))
        session.execute(delete(table).where(mine))
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
    for i in range(0, len(keys), CHUNK):
        used_by_version = select(VersionTensorRow.blob_sha256).where(
            VersionTensorRow.blob_sha256 == BlobRow.sha256
        )
        used_by_part = select(VersionPartRow.blob_sha256).where(
            VersionPartRow.blob_sha256 == BlobRow.sha256
        )
        used_by_base = select(BaseTensorRow.blob_sha256).where(
            BaseTensorRow.blob_sha256 == BlobRow.sha256
        )
        session.execute(
            delete(BlobRow)
            .where(BlobRow.sha256.in_(keys[i : i + CHUNK]))
            .where(~used_by_version.exists(), ~used_by_part.exists(), ~used_by_base.exists()),
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


# -- lookups ---------------------------------------------------------------------------------


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


# -- digests ---------------------------------------------------------------------------------


def _described(row: VersionRow) -> dict:
    """What both digest formats cover of the version row itself."""
    return {
        "num_classes": row.num_classes,
        "class_names": row.class_names,
        "num_layers": row.num_layers,
        "active_layers": row.active_layers,
        "config": row.config,
    }


def row_digest(row: VersionRow, refs: list) -> str:
    """The format-1 digest of a version stored per tensor; ``refs`` = (name, blob sha256,
    dtype, shape)."""
    return version_digest(**_described(row), tensors=refs)


def parts_digest(row: VersionRow, parts: list) -> str:
    """The format-2 digest of a packed version; ``parts`` = (part name, blob sha256)."""
    return packed_digest(**_described(row), parts=parts)


def tensor_refs(session: Session, row: VersionRow) -> list:
    """(name, blob sha256, dtype, shape) of a version stored per tensor."""
    t = VersionTensorRow
    stmt = select(t.name, t.blob_sha256, t.dtype, t.shape).where(t.version_id == row.id)
    return [tuple(r) for r in session.execute(stmt)]


def part_refs(session: Session, row: VersionRow) -> list:
    """(part name, blob sha256) of a packed version."""
    t = VersionPartRow
    stmt = select(t.part, t.blob_sha256).where(t.version_id == row.id)
    return [tuple(r) for r in session.execute(stmt)]


def current_digest(session: Session, row: VersionRow) -> str:
    """The digest a version's rows have now, in the version's format."""
    if row.packed:
        return parts_digest(row, part_refs(session, row))
    return row_digest(row, tensor_refs(session, row))
