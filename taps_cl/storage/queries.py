"""Read-only queries that turn rows into the plain records :class:`TaskStore` returns."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from taps_cl.storage.models import (
    BaseRow,
    BaseTensorRow,
    BlobRow,
    TaskRow,
    VersionPartRow,
    VersionRow,
    VersionTensorRow,
)
from taps_cl.storage.packing import ROUTE
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


ROUTE_PREFIX = "route."  # the patch tensors that are routing statistics (TaskPatch kinds)


def route_bytes(session: Session, version_ids: list[int]) -> dict[int, int]:
    """Version id -> bytes of its routing statistics (``route.*`` tensors; 0 without): the
    ``route`` part of a packed version, the ``route.*`` tensor rows of one stored per tensor."""
    if not version_ids:
        return {}
    rows = session.execute(
        select(VersionTensorRow.version_id, func.sum(BlobRow.size))
        .join(BlobRow, BlobRow.sha256 == VersionTensorRow.blob_sha256)
        .where(VersionTensorRow.version_id.in_(version_ids))
        .where(VersionTensorRow.name.startswith(ROUTE_PREFIX, autoescape=True))
        .group_by(VersionTensorRow.version_id)
    )
    found = {int(v): int(n or 0) for v, n in rows}
    parts = session.execute(
        select(VersionPartRow.version_id, VersionPartRow.nbytes)
        .where(VersionPartRow.version_id.in_(version_ids))
        .where(VersionPartRow.part == ROUTE)
    )
    found.update({int(v): int(n) for v, n in parts})
    return {v: found.get(v, 0) for v in version_ids}


# The columns of a task record: selected as plain columns, not ORM rows (building an ORM row and
# decoding a version's JSON config per task was most of the cost of a listing of many tasks).
_TASK_COLUMNS = (
    TaskRow.name,
    TaskRow.base_fingerprint,
    BaseRow.name,
    TaskRow.current_version,
    VersionRow.num_classes,
    VersionRow.class_names,
    VersionRow.num_parameters,
    VersionRow.nbytes,
    TaskRow.created_at,
    VersionRow.created_at,
    VersionRow.routable,
)


def _task_record(row: tuple, n: int) -> StoredTask:
    (
        name,
        fp,
        base_name,
        current,
        classes,
        class_names,
        params,
        nbytes,
        created,
        updated,
        routable,
    ) = row
    return StoredTask(
        name=name,
        base_fingerprint=fp,
        base_name=base_name,
        current_version=current,
        num_versions=int(n),
        num_classes=classes,
        class_names=class_names,
        num_parameters=params,
        nbytes=nbytes,
        created_at=as_utc(created),
        updated_at=as_utc(updated),
        routable=bool(routable),
    )


def version_record(task: TaskRow, row: VersionRow, routed: int = 0) -> VersionRecord:
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
        route_bytes=routed,
    )


def task_records(session: Session, base: str | None) -> list[StoredTask]:
    """Every task (optionally of one base) with its current version, by name."""
    counts = (
        select(VersionRow.task_id, func.count().label("n")).group_by(VersionRow.task_id).subquery()
    )
    stmt = (
        select(*_TASK_COLUMNS, counts.c.n)
        .join(BaseRow, BaseRow.fingerprint == TaskRow.base_fingerprint)
        .join(VersionRow, VersionRow.task_id == TaskRow.id)
        .where(VersionRow.version == TaskRow.current_version)
        .join(counts, counts.c.task_id == TaskRow.id)
        .order_by(TaskRow.name, TaskRow.base_fingerprint)
    )
    if base is not None:
        stmt = stmt.where(TaskRow.base_fingerprint == base)
    # The split into patch and routing statistics is per version (``versions()``): a listing of
    # every task stays one query.
    return [_task_record(tuple(row[:-1]), row[-1]) for row in session.execute(stmt)]


def version_records(session: Session, task: TaskRow) -> list[VersionRecord]:
    rows = session.scalars(
        select(VersionRow).where(VersionRow.task_id == task.id).order_by(VersionRow.version)
    )
    rows = list(rows)
    routed = route_bytes(session, [row.id for row in rows])
    return [version_record(task, row, routed[row.id]) for row in rows]


def _count(session: Session, column: object) -> int:
    return int(session.scalar(select(func.count(column))) or 0)


def store_stats(session: Session) -> StoreStats:
    blobs, blob_bytes = session.execute(
        select(func.count(BlobRow.sha256), func.coalesce(func.sum(BlobRow.size), 0))
    ).one()
    refs, logical = 0, 0
    parts = func.coalesce(func.sum(VersionPartRow.num_tensors), 0)  # a part holds many tensors
    for table, count in (
        (VersionTensorRow, func.count(VersionTensorRow.blob_sha256)),
        (VersionPartRow, parts),
        (BaseTensorRow, func.count(BaseTensorRow.blob_sha256)),
    ):
        n, size = session.execute(
            select(count, func.coalesce(func.sum(BlobRow.size), 0))
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
