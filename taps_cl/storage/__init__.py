"""taps_cl.storage: the task store. :class:`TaskStoreAPI` is what the rest of taps_cl uses of a
store; :class:`TaskStore` implements it in SQL (SQLAlchemy 2.0 + Alembic; SQLite or PostgreSQL).

Tables: ``bases``, ``tasks``, ``task_versions``, ``blobs`` (content-addressed bytes),
``version_parts`` (a version's tensors packed into a few safetensors blobs), ``version_tensors``
(one row per tensor, versions from before packing), ``base_tensors`` and ``store_state`` (the
generation every write bumps). See :class:`TaskStore` and docs/store.md.

May import: the foundation, the method (:mod:`taps_cl.taps`: the patch type and its file I/O)
and routing math (the route statistics a version carries). Must never import: training,
serving, tracking, the engine, integrations or the CLI.
"""

from taps_cl.storage.database import ENV_VAR, default_store_path, resolve_url
from taps_cl.storage.protocol import BulkRouteStats, TaskStoreAPI
from taps_cl.storage.records import (
    BaseRecord,
    RouteStatsRecord,
    StoredTask,
    StoreStats,
    VersionRecord,
)
from taps_cl.storage.serialize import read_patch_file
from taps_cl.storage.store import TaskStore, open_store

__all__ = [
    "ENV_VAR",
    "BaseRecord",
    "BulkRouteStats",
    "RouteStatsRecord",
    "StoreStats",
    "StoredTask",
    "TaskStore",
    "TaskStoreAPI",
    "VersionRecord",
    "default_store_path",
    "open_store",
    "read_patch_file",
    "resolve_url",
]
