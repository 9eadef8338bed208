"""ORM tables of the task store. The schema itself is created by the Alembic migrations in
``migrations/versions``; these classes must match them (a test compares the two).

No ORM relationships on purpose: every query is written out where it is used, so what hits
the database is visible in the code.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so that later migrations can refer to them by name.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Model(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, list[int]: JSON}


class BaseRow(Model):
    """A frozen base model, known by the sha256 fingerprint of its state_dict."""

    __tablename__ = "bases"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)
    num_parameters: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # what a patch of this base may hold (storage/layout.py); None for bases from before 0003
    # until an Engine on the base opens the store
    layout: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class TaskRow(Model):
    """A task on one base; its versions live in ``task_versions``."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("base_fingerprint", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_fingerprint: Mapped[str] = mapped_column(ForeignKey("bases.fingerprint"))
    name: Mapped[str] = mapped_column(String(64), index=True)
    num_classes: Mapped[int] = mapped_column(Integer)  # of the current version
    class_names: Mapped[list[str] | None] = mapped_column(JSON)  # of the current version
    current_version: Mapped[int] = mapped_column(Integer)  # highest existing version
    last_version: Mapped[int] = mapped_column(Integer)  # highest ever given; never reused
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VersionRow(Model):
    """One trained state of a task. Immutable once committed, except that route statistics
    may be added later (``TaskStore.add_route_stats``): they describe data, not the patch."""

    __tablename__ = "task_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    version: Mapped[int] = mapped_column(Integer)
    num_classes: Mapped[int] = mapped_column(Integer)
    class_names: Mapped[list[str] | None] = mapped_column(JSON)
    num_layers: Mapped[int] = mapped_column(Integer)
    active_layers: Mapped[list[str]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    num_tensors: Mapped[int] = mapped_column(Integer)  # detects lost version_tensors rows
    nbytes: Mapped[int] = mapped_column(BigInteger)  # bytes of all its tensors
    added_bytes: Mapped[int] = mapped_column(BigInteger)  # bytes of blobs it added (not deduped)
    # carries route.* statistics (task-free routing); rows from before revision 0002 do not
    routable: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # sha256 over its tensor rows, classes, layers and config (storage/digest.py); checked on
    # every read. Nullable only because SQLite cannot add a NOT NULL column to filled tables.
    digest: Mapped[str | None] = mapped_column(String(64))
    # tensors stored as packed parts (version_parts, revision 0004) instead of one
    # version_tensors row and blob per tensor; the digest is then format 2 (storage/digest.py)
    packed: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)


class BlobRow(Model):
    """Raw tensor bytes, content-addressed: identical tensors are stored once."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class VersionTensorRow(Model):
    """(version, tensor name) -> blob, with the dtype and shape to rebuild the tensor."""

    __tablename__ = "version_tensors"

    version_id: Mapped[int] = mapped_column(ForeignKey("task_versions.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(1000), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    dtype: Mapped[str] = mapped_column(String(32))
    shape: Mapped[list[int]] = mapped_column(JSON)


class VersionPartRow(Model):
    """(version, part) -> the blob holding that part of its tensors as one safetensors byte
    string (storage/packing.py): ``patch`` (the patch) and ``route`` (routing statistics)."""

    __tablename__ = "version_parts"

    version_id: Mapped[int] = mapped_column(ForeignKey("task_versions.id"), primary_key=True)
    part: Mapped[str] = mapped_column(String(32), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    num_tensors: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(BigInteger)  # of the tensors (the blob adds a header)


class StoreStateRow(Model):
    """One row: a generation counter bumped by every write transaction, so that a reader can
    tell with one cheap query whether anything changed since it last listed the store."""

    __tablename__ = "store_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)


class BaseTensorRow(Model):
    """(base, state_dict key) -> blob: a whole base's weights (e.g. a jointly trained base)."""

    __tablename__ = "base_tensors"

    base_fingerprint: Mapped[str] = mapped_column(ForeignKey("bases.fingerprint"), primary_key=True)
    name: Mapped[str] = mapped_column(String(1000), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)  # state_dict order (the fingerprint needs it)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    dtype: Mapped[str] = mapped_column(String(32))
    shape: Mapped[list[int]] = mapped_column(JSON)
