"""Read-only queries that turn rows into the plain records :class:`TaskStore` returns."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from taps_cl.storage.models import (
    BaseRow,
    BaseTensorRow,
    BlobRow,
    TaskRow,
    VersionRow,
    VersionTensorRow,
)
from taps_cl.storage.records import BaseRecord, StoredTask, StoreStats, VersionRecord, as_utc


def base_record(session: Session, row: BaseRow) -> BaseRecord:
    has = session.scalar(
        select(func.count(BaseTensorRow.name)).where(
            BaseTensorRow.base_fingerprint == row.fingerprint
        )
    )
    return BaseRecord(
        row.fingerprint, row.name, row.source, row.num_parameters, bool(has), as_utc(row.created_at)
    )


def _task_record(task: TaskRow, base_name: str, row: VersionRow, n: int) -> StoredTask:
    return StoredTask(
        name=task.name,
        base_fingerprint=task.base_fingerprint,
        base_name=base_name,
        current_version=task.current_version,
        num_versions=int(n),
        num_classes=row.num_classes,
        class_names=row.class_names,
        num_parameters=row.num_parameters,
        nbytes=row.nbytes,
        created_at=as_utc(task.created_at),
        updated_at=as_utc(row.created_at),
        routable=bool(row.routable),
    )


def version_record(task: TaskRow, row: VersionRow) -> VersionRecord:
    return VersionRecord(
        name=task.name,
        version=row.version,
        base_fingerprint=task.base_fingerprint,
        num_classes=row.num_classes,
        num_layers=row.num_layers,
        active_layers=list(row.active_layers),
        num_parameters=row.num_parameters,
        nbytes=row.nbytes,
        added_bytes=row.added_bytes,
        metrics=dict(row.metrics),
        config=dict(row.config),
        created_at=as_utc(row.created_at),
        routable=bool(row.routable),
    )


def task_records(session: Session, base: str | None) -> list[StoredTask]:
    """Every task (optionally of one base) with its current version, by name."""
    counts = (
        select(VersionRow.task_id, func.count().label("n")).group_by(VersionRow.task_id).subquery()
    )
    stmt = (
        select(TaskRow, BaseRow.name, VersionRow, counts.c.n)
        .join(BaseRow, BaseRow.fingerprint == TaskRow.base_fingerprint)
        .join(VersionRow, VersionRow.task_id == TaskRow.id)
        .where(VersionRow.version == TaskRow.current_version)
        .join(counts, counts.c.task_id == TaskRow.id)
        .order_by(TaskRow.name, TaskRow.base_fingerprint)
    )
    if base is not None:
        stmt = stmt.where(TaskRow.base_fingerprint == base)
    return [_task_record(*row) for row in session.execute(stmt)]


def version_records(session: Session, task: TaskRow) -> list[VersionRecord]:
    rows = session.scalars(
        select(VersionRow).where(VersionRow.task_id == task.id).order_by(VersionRow.version)
    )
    return [version_record(task, row) for row in rows]


def _count(session: Session, column: object) -> int:
    return int(session.scalar(select(func.count(column))) or 0)


def store_stats(session: Session) -> StoreStats:
    blobs, blob_bytes = session.execute(
        select(func.count(BlobRow.sha256), func.coalesce(func.sum(BlobRow.size), 0))
    ).one()
    refs, logical = 0, 0
    for table in (VersionTensorRow, BaseTensorRow):
        n, size = session.execute(
            select(func.count(table.blob_sha256), func.coalesce(func.sum(BlobRow.size), 0))
            .select_from(table)
            .join(BlobRow, BlobRow.sha256 == table.blob_sha256)
        ).one()
        refs, logical = refs + int(n), logical + int(size)
    return StoreStats(
        bases=_count(session, BaseRow.fingerprint),
        tasks=_count(session, TaskRow.id),
        versions=_count(session, VersionRow.id),
        tensors=refs,
        blobs=int(blobs),
        blob_bytes=int(blob_bytes),
        logical_bytes=logical,
        dedup_saved_bytes=logical - int(blob_bytes),
    )
