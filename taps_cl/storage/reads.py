"""Reading tensors back, checked: every blob against its sha256 and every version's rows
against their digest, for packed versions (:mod:`taps_cl.storage.packing`) and versions stored
per tensor (before revision 0004) alike. All functions only read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from taps_cl.errors import StoreIntegrityError, UnknownTaskError
from taps_cl.routing.stats import ROUTE_PREFIX
from taps_cl.storage.models import BaseTensorRow, BlobRow, TaskRow, VersionPartRow, VersionRow
from taps_cl.storage.models import VersionTensorRow as Tensors
from taps_cl.storage.ops import CHUNK, parts_digest, row_digest, tensor_refs
from taps_cl.storage.packing import ROUTE, unpack
from taps_cl.storage.serialize import sha256, tensor_from_bytes


def check_digest(row: VersionRow, refs: list, where: str) -> None:
    """``StoreIntegrityError`` unless the version's rows match the digest written with them;
    ``refs`` are its part refs (packed) or tensor refs (per tensor)."""
    try:
        actual = parts_digest(row, refs) if row.packed else row_digest(row, refs)
    except (TypeError, ValueError) as err:  # e.g. a shape edited into a string or a NaN
        raise StoreIntegrityError(f"{where}: stored rows are unreadable ({err})") from err
    if row.digest != actual:
        raise StoreIntegrityError(
            f"{where}: its stored rows (tensor dtypes, shapes or names, parts, classes, layers "
            "or config) do not match their digest; the database was edited or damaged: restore "
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


def _part_rows(session: Session, where_clause: Any, only: str | None = None) -> list:
    """(version_id, part, sha, num_tensors, data) of the part rows ``where_clause`` picks, in
    one query: every row (the digest covers them all), with the blob's bytes only for part
    ``only`` (None: every part; a missing blob reads as None)."""
    t = VersionPartRow
    joined = BlobRow.sha256 == t.blob_sha256
    if only is not None:
        joined = joined & (t.part == only)
    stmt = (
        select(t.version_id, t.part, t.blob_sha256.label("sha"), t.num_tensors, BlobRow.data)
        .outerjoin(BlobRow, joined)
        .where(where_clause)
    )
    return list(session.execute(stmt))


def _unpacked(rows: list, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a packed version's part rows, by name (as a per-tensor read orders them)."""
    tensors: dict[str, torch.Tensor] = {}
    for r in rows:
        found = unpack(r.data, r.part, r.sha, where)
        if len(found) != r.num_tensors:
            raise StoreIntegrityError(
                f"{where}, part {r.part!r}: {len(found)} tensors found, {r.num_tensors} written"
            )
        tensors.update(found)
    return dict(sorted(tensors.items()))


def read_version_tensors(session: Session, row: VersionRow, where: str) -> dict:
    """Every tensor of a version (its patch and its routing statistics)."""
    if row.packed:
        rows = _part_rows(session, VersionPartRow.version_id == row.id)
        check_digest(row, [(r.part, r.sha) for r in rows], where)
        tensors = _unpacked(rows, where)
        if len(tensors) != row.num_tensors:
            raise StoreIntegrityError(
                f"{where}: {len(tensors)} tensors found, {row.num_tensors} written"
            )
        return tensors
    rows = _tensor_rows(session, Tensors, Tensors.version_id == row.id, Tensors.name)
    if len(rows) != row.num_tensors:
        raise StoreIntegrityError(f"{where}: {len(rows)} tensors found, {row.num_tensors} written")
    check_digest(row, [(r.name, r.sha, r.dtype, r.shape) for r in rows], where)
    return {r.name: _decode(r, where) for r in rows}


def read_route_tensors(session: Session, row: VersionRow, where: str) -> dict:
    """Only the ``route.*`` tensors of a version (the router needs nothing else)."""
    if row.packed:
        rows = _part_rows(session, VersionPartRow.version_id == row.id, only=ROUTE)
        check_digest(row, [(r.part, r.sha) for r in rows], where)
        return _unpacked([r for r in rows if r.part == ROUTE], where)
    check_digest(row, tensor_refs(session, row), where)
    mine = (Tensors.version_id == row.id) & Tensors.name.like(f"{ROUTE_PREFIX}%")
    rows = _tensor_rows(session, Tensors, mine, Tensors.name)
    return {r.name: _decode(r, where) for r in rows}


def read_base_tensors(session: Session, fingerprint: str) -> dict:
    rows = _tensor_rows(
        session,
        BaseTensorRow,
        BaseTensorRow.base_fingerprint == fingerprint,
        BaseTensorRow.position,
    )
    return {r.name: _decode(r, f"base {fingerprint[:12]}") for r in rows}


def read_routes_many(
    session: Session, base: str, wanted: Mapping[str, int], url: str
) -> dict[str, tuple[VersionRow, dict[str, torch.Tensor]]]:
    """Task name -> (version row, ``route.*`` tensors) of the given versions of tasks on
    ``base``, checked as one by one, in a few queries per 500 tasks (versions stored per tensor,
    from before packing, are read one by one)."""
    names, out = sorted(wanted), {}
    for i in range(0, len(names), CHUNK):
        chunk = names[i : i + CHUNK]
        stmt = (
            select(TaskRow.name, VersionRow)
            .join(VersionRow, VersionRow.task_id == TaskRow.id)
            .where(TaskRow.base_fingerprint == base, TaskRow.name.in_(chunk))
        )
        rows = {n: r for n, r in session.execute(stmt) if r.version == wanted[n]}
        for name in chunk:
            _check_routable(name, wanted[name], rows.get(name), url)
        packed = {r.id: n for n, r in rows.items() if r.packed}
        parts = _part_rows(session, VersionPartRow.version_id.in_(list(packed)), only=ROUTE)
        by_version: dict[int, list] = {}
        for r in parts:
            by_version.setdefault(r.version_id, []).append(r)
        for name, row in rows.items():
            where = f"task {name!r} version {row.version}"
            if not row.packed:
                out[name] = (row, read_route_tensors(session, row, where))
                continue
            mine = by_version.get(row.id, [])
            check_digest(row, [(r.part, r.sha) for r in mine], where)
            out[name] = (row, _unpacked([r for r in mine if r.part == ROUTE], where))
    return out


def _check_routable(name: str, version: int, row: VersionRow | None, url: str) -> None:
    if row is None:
        raise UnknownTaskError(f"no task {name!r} with version {version} on that base in {url}")
    if not row.routable:
        raise ValueError(
            f"task {name!r} version {version} has no route statistics (add_route_stats adds them)"
        )
