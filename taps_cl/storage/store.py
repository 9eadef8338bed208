"""TaskStore: versioned task patches (and optionally base weights) in one SQL database."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

import taps_cl.storage.files as files
import taps_cl.storage.ops as ops
import taps_cl.storage.queries as queries
import taps_cl.storage.reads as reads
from taps_cl.bases import state_fingerprint
from taps_cl.errors import StoreIntegrityError, UnknownBaseError
from taps_cl.routing.stats import RouteStats
from taps_cl.storage.connection import StoreConnection
from taps_cl.storage.database import checkpoint
from taps_cl.storage.failures import translated
from taps_cl.storage.layout import validate_layout
from taps_cl.storage.models import BaseRow, VersionRow
from taps_cl.storage.prepare import base_weights_work, prepared
from taps_cl.storage.protocol import TaskStoreAPI, missing_members
from taps_cl.storage.records import (
    BaseRecord,
    RouteStatsRecord,
    StoredTask,
    StoreStats,
    VersionRecord,
)
from taps_cl.storage.serialize import json_dict, validate_fingerprint
from taps_cl.taps.patch import TaskPatch, validate_task_name, validate_version


class TaskStore(StoreConnection):
    """Versioned task patches in one SQL database (SQLite file or PostgreSQL).

    ``url`` is any SQLAlchemy URL (``postgresql://user@host/db`` uses psycopg 3) or a file
    path for SQLite. When omitted, env ``TAPS_CL_STORE`` is used (URL or path), else the SQLite
    file ``$XDG_DATA_HOME/taps_cl/tasks.db`` (``~/.local/share/taps_cl/tasks.db``).
    Opening creates or upgrades the schema; a store from a newer taps_cl raises
    :class:`~taps_cl.errors.StoreVersionError`. ``create=False`` refuses an SQLite file that
    does not exist (instead of creating it and its directory); ``readonly=True`` opens the
    store without ever writing (SQLite ``mode=ro``, ``immutable`` where the directory is not
    writable; writes raise :class:`~taps_cl.errors.StoreReadOnlyError`), ``readonly=None``
    does so only where SQLite could not write beside the file. Every failure to open, read or
    write is a :class:`~taps_cl.errors.StoreError` saying what to fix.

    Every write is one transaction: a version is visible only once all its rows are
    committed, and an error or a killed process leaves no trace. Concurrent writers are
    serialised (SQLite ``BEGIN IMMEDIATE``; PostgreSQL row lock on the task) and retried on
    transient conflicts, so versions of a task are 1, 2, 3, ... with no gaps from races.
    """

    # -- bases -------------------------------------------------------------------------------

    def register_base(
        self,
        fingerprint: str,
        name: str,
        source: str = "",
        num_parameters: int | None = None,
        *,
        layout: Mapping[str, Any] | None = None,
    ) -> BaseRecord:
        """Record (or relabel) a base; patches trained on it can then be imported. ``layout``
        (:func:`~taps_cl.storage.layout.model_layout`) lets imports be checked against it."""
        validate_fingerprint(fingerprint)
        layout = validate_layout(json_dict(layout, "layout")) if layout is not None else None
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ValueError(f"base name must be a non-empty str of <= 200 chars, got {name!r}")
        if not isinstance(source, str):
            raise TypeError(f"source must be a str, got {type(source).__name__}")
        if num_parameters is not None and (
            not isinstance(num_parameters, int) or num_parameters < 0
        ):
            raise ValueError(f"num_parameters must be a non-negative int, got {num_parameters!r}")

        def work(session: Session) -> None:
            row = ops.ensure_base(session, fingerprint)
            row.name, row.source, row.num_parameters = name, source, num_parameters
            if layout is not None:
                row.layout = layout

        self._write(work)
        return self.base(fingerprint)

    def base_layout(self, fingerprint: str) -> dict[str, Any] | None:
        """What a patch of the base may hold (None if it was registered without a layout)."""
        validate_fingerprint(fingerprint)
        with self._read() as session:
            layout = ops.find_base(session, fingerprint).layout
        return dict(layout) if layout is not None else None

    def set_base_layout(self, fingerprint: str, layout: Mapping[str, Any]) -> None:
        """Record the layout of a known base (e.g. one registered before layouts existed)."""
        validate_fingerprint(fingerprint)
        layout = validate_layout(json_dict(layout, "layout"))

        def work(session: Session) -> None:
            ops.find_base(session, fingerprint).layout = layout

        self._write(work)

    def base(self, fingerprint: str) -> BaseRecord:
        """The record of one base (:class:`UnknownBaseError` if the store never saw it)."""
        validate_fingerprint(fingerprint)
        with self._read() as session:
            return queries.base_record(session, ops.find_base(session, fingerprint))

    def list_bases(self) -> list[BaseRecord]:
        with self._read() as session:
            rows = session.scalars(select(BaseRow).order_by(BaseRow.created_at))
            return [queries.base_record(session, row) for row in rows]

    def save_base_weights(
        self,
        fingerprint: str,
        state_dict: Mapping[str, torch.Tensor],
        *,
        name: str | None = None,
        source: str = "saved weights",
    ) -> BaseRecord:
        """Store a whole base's state_dict (e.g. the new base of joint training), deduplicated
        against every other blob. ``fingerprint`` must be the state_dict's own fingerprint."""
        self._write(base_weights_work(fingerprint, state_dict, name, source))
        return self.base(fingerprint)

    def load_base_weights(self, fingerprint: str) -> dict[str, torch.Tensor]:
        """The state_dict stored by :meth:`save_base_weights`, in its original order, with
        every blob and the overall fingerprint verified."""
        validate_fingerprint(fingerprint)
        with self._read() as session:
            ops.find_base(session, fingerprint)
            state = reads.read_base_tensors(session, fingerprint)
        if not state:
            raise UnknownBaseError(f"the store holds no weights for base {fingerprint}")
        if state_fingerprint(state) != fingerprint:
            raise StoreIntegrityError(f"stored weights of base {fingerprint[:12]} do not match it")
        return state

    # -- tasks -------------------------------------------------------------------------------

    def commit(
        self,
        patch: TaskPatch,
        *,
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> int:
        """Store ``patch`` as the next version of its task; return the version number.

        ``metrics`` (JSON) are stored with the version; ``config`` (JSON) is merged over
        ``patch.config`` (e.g. to add the training settings). The patch's base is recorded by
        fingerprint and registered under a placeholder name the first time it is seen.
        """
        prep = prepared(patch, metrics, config)
        return self._write(lambda session: ops.insert_version(session, prep))

    def commit_many(
        self,
        patches: Iterable[TaskPatch],
        *,
        metrics: Mapping[str, Mapping[str, Any]] | None = None,
        config: Mapping[str, Any] | None = None,
        base_weights: tuple[str, Mapping[str, torch.Tensor], str | None, str] | None = None,
    ) -> list[int]:
        """Commit several patches in ONE transaction: all become visible together or none.

        ``metrics`` maps task name -> metrics; ``config`` is merged into every patch's config.
        ``base_weights = (fingerprint, state_dict, name, source)`` stores a new base in the same
        transaction (joint training with a trained base): the base and its tasks appear together.
        Returns the new version numbers in the order of ``patches``.
        """
        patches = list(patches)
        keys = [(p.base_fingerprint, p.name) for p in patches if isinstance(p, TaskPatch)]
        if len(set(keys)) != len(keys):
            raise ValueError("commit_many got the same task twice; commit one patch per task")
        metrics = metrics or {}
        unknown = sorted(set(metrics) - {name for _, name in keys})
        if unknown:
            raise ValueError(f"metrics given for tasks not in patches: {unknown}")
        preps = [prepared(p, metrics.get(p.name), config) for p in patches]
        # A fixed locking order keeps two concurrent commit_many calls from deadlocking.
        order = sorted(range(len(preps)), key=lambda i: keys[i])
        base_work = base_weights_work(*base_weights) if base_weights else None

        def work(session: Session) -> list[int]:
            if base_work is not None:
                base_work(session)
            versions = [0] * len(preps)
            for i in order:
                versions[i] = ops.insert_version(session, preps[i])
            return versions

        return self._write(work)

    def load(self, name: str, version: int | None = None, *, base: str | None = None) -> TaskPatch:
        """The patch of ``name`` at ``version`` (default: current), every blob verified.

        ``base`` (a fingerprint) is only needed when the name exists for several bases.
        """
        validate_task_name(name)
        version = validate_version(version)
        with self._read() as session:
            task = ops.find_task(session, name, base, self.url)
            row = ops.find_version(session, task, version)
            where = f"task {name!r} version {row.version}"
            tensors = reads.read_version_tensors(session, row, where)
        return TaskPatch(
            name=name,
            num_classes=row.num_classes,
            tensors=tensors,
            active_layers=list(row.active_layers),
            num_layers=row.num_layers,
            base_fingerprint=task.base_fingerprint,
            class_names=row.class_names,
            config=dict(row.config),
            version=row.version,
        )

    def add_route_stats(
        self,
        name: str,
        stats: RouteStats,
        version: int | None = None,
        *,
        base: str | None = None,
        replace: bool = False,
    ) -> VersionRecord:
        """Attach route statistics to an existing version (default: current), e.g. computed
        later from data for a version trained before routing existed; its other tensors do not
        change. One transaction; existing statistics are an error unless ``replace``."""
        validate_task_name(name)
        version = validate_version(version)
        if not isinstance(stats, RouteStats):
            raise TypeError(f"stats must be RouteStats, got {type(stats).__name__}")
        tensors = stats.to_tensors()
        route = ops.RouteTensors.of(tensors)

        def work(session: Session) -> VersionRecord:
            task = ops.lock_task(session, ops.find_task(session, name, base, self.url))
            row = ops.find_version(session, task, version)
            ops.check_route_tensors(tensors, row.num_classes)
            ops.add_route_tensors(session, row, route, replace)
            session.flush()
            return queries.version_record(task, row, queries.route_bytes(session, [row.id])[row.id])

        return self._write(work)

    def route_stats(
        self, name: str, version: int | None = None, *, base: str | None = None
    ) -> RouteStats:
        """The route statistics of a version (default: current), read without its patch."""
        validate_task_name(name)
        version = validate_version(version)
        with self._read() as session:
            task = ops.find_task(session, name, base, self.url)
            row = ops.find_version(session, task, version)
            where = f"task {name!r} version {row.version}"
            if not row.routable:
                raise ValueError(f"{where} has no route statistics (add_route_stats adds them)")
            tensors = reads.read_route_tensors(session, row, where)
        return _route_stats(tensors, where)

    def route_stats_many(
        self, versions: Mapping[str, int], *, base: str
    ) -> dict[str, RouteStatsRecord]:
        """The route statistics and config of many versions of tasks on ``base`` (task name ->
        version) in a few queries, checked as :meth:`route_stats` checks one: what a server
        reads to build a router over every routable task."""
        validate_fingerprint(base)
        wanted = {validate_task_name(n): validate_version(v) for n, v in dict(versions).items()}
        if None in wanted.values():
            raise ValueError("route_stats_many needs a version number for every task")
        with self._read() as session:
            found = reads.read_routes_many(session, base, wanted, self.url)
        out = {}
        for name, (row, tensors) in found.items():
            stats = _route_stats(tensors, f"task {name!r} version {row.version}")
            out[name] = RouteStatsRecord(name, row.version, stats, dict(row.config))
        return out

    def list_tasks(self, *, base: str | None = None) -> list[StoredTask]:
        """Every task (optionally of one base), by name. Read again only when the store changed
        (any process's write moves its generation, :mod:`taps_cl.storage.listing`); the
        records are shared with later calls: treat them as read-only."""
        if base is not None:
            validate_fingerprint(base)
        with self._read() as session:
            return self._listing.tasks(session, base, queries.task_records)

    def versions(self, name: str, *, base: str | None = None) -> list[VersionRecord]:
        """Every stored version of ``name``, oldest first."""
        validate_task_name(name)
        with self._read() as session:
            task = ops.find_task(session, name, base, self.url)
            return queries.version_records(session, task)

    def delete(
        self, name: str, version: int | None = None, *, base: str | None = None
    ) -> list[int]:
        """Delete one version, or the whole task (``version=None``); return the deleted
        version numbers. Blobs no other version or base uses are removed too. Numbers of
        deleted versions are not reused while the task exists."""
        validate_task_name(name)
        version = validate_version(version)

        def work(session: Session) -> list[int]:
            task = ops.find_task(session, name, base, self.url)
            if version is None:
                rows = list(
                    session.scalars(select(VersionRow).where(VersionRow.task_id == task.id))
                )
            else:
                rows = [ops.find_version(session, task, version)]
            ops.delete_versions(session, task, rows)
            return sorted(r.version for r in rows)

        deleted = self._write(work)
        with translated(self.url):
            checkpoint(self._write_engine)  # the WAL must not keep the deleted bytes around
        return deleted

    # -- files -------------------------------------------------------------------------------

    def export(
        self,
        name: str,
        path: str | os.PathLike,
        version: int | None = None,
        *,
        base: str | None = None,
        allow_symlink: bool = False,
    ) -> Path:
        """Write one version to a single ``.safetensors`` file; JSON metadata carries the base
        (fingerprint, name, source), classes, config, metrics, version and gates.

        The file is written beside the target and renamed over it: only a regular file (or
        nothing) is ever replaced; devices, FIFOs, sockets and directories are refused, and a
        symlink too unless ``allow_symlink`` (then the file it points to is replaced).
        """
        return files.export_version(self, name, path, version, base, allow_symlink)

    def import_file(
        self,
        path: str | os.PathLike,
        *,
        allow_new_base: bool = False,
        layout: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        """Commit the patch in a file made by :meth:`export` as the next version of its task.

        The file's base must be known to this store (it was committed to, registered, or
        imported with before); otherwise :class:`UnknownBaseError` names the base it needs.
        ``allow_new_base=True`` registers the base from the file's metadata instead.

        Every tensor must be finite, and must fit the base the file names: its name, dtype and
        shape are checked against ``layout`` (an Engine passes its live model's) or else the
        layout stored with the base. A base without a stored layout (registered before
        layouts existed, or new from the file) gets only the checks that need no model.
        Refusals raise :class:`~taps_cl.errors.InvalidPatchError` and change nothing.
        """
        patch, metrics, label = files.checked_import(self, path, allow_new_base, layout)
        prep = prepared(patch, metrics, None)

        def work(session: Session) -> int:
            if session.get(BaseRow, patch.base_fingerprint) is None:
                row = ops.ensure_base(session, patch.base_fingerprint)
                row.name, row.source, row.num_parameters = label
            return ops.insert_version(session, prep)

        version = self._write(work)  # the base it introduces, if any, in the same transaction
        fp = patch.base_fingerprint
        return next(v for v in self.versions(patch.name, base=fp) if v.version == version)

    def stats(self) -> StoreStats:
        """Counts and bytes; ``dedup_saved_bytes`` is what content addressing saved."""
        with self._read() as session:
            return queries.store_stats(session)


def _route_stats(tensors: dict[str, torch.Tensor], where: str) -> RouteStats:
    try:
        return RouteStats.from_tensors(tensors)
    except ValueError as err:
        raise StoreIntegrityError(f"{where}: stored route statistics are invalid: {err}") from err


def open_store(store: str | os.PathLike | URL | TaskStoreAPI | None) -> TaskStoreAPI:
    """``store`` itself if it implements :class:`TaskStoreAPI`, else the SQL
    :class:`TaskStore` at that URL or path (None: the default store)."""
    if isinstance(store, TaskStoreAPI):
        return store
    if store is None or isinstance(store, (str, os.PathLike, URL)):
        return TaskStore(store)
    raise TypeError(
        f"store must be a URL, a path or a TaskStoreAPI; {type(store).__name__} lacks "
        f"{missing_members(store)}"
    )
