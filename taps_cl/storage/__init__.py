"""taps_cl.storage: the SQL task store (SQLAlchemy 2.0 + Alembic; SQLite or PostgreSQL).

Tables: ``bases``, ``tasks``, ``task_versions``, ``blobs`` (content-addressed tensor bytes),
``version_tensors`` and ``base_tensors``. See :class:`TaskStore`.
"""

from taps_cl.storage.database import ENV_VAR, default_store_path, resolve_url
from taps_cl.storage.records import BaseRecord, StoredTask, StoreStats, VersionRecord
from taps_cl.storage.serialize import read_patch_file
from taps_cl.storage.store import TaskStore

__all__ = [
    "ENV_VAR",
    "BaseRecord",
    "StoreStats",
    "StoredTask",
    "TaskStore",
    "VersionRecord",
    "default_store_path",
    "read_patch_file",
    "resolve_url",
]
