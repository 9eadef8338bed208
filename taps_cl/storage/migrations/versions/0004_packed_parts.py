"""Packed versions (version_parts, task_versions.packed) and the store generation (store_state).

New versions store their tensors as one safetensors blob per part (``patch``, ``route``; see
``storage/packing.py``) instead of a blob and a ``version_tensors`` row per tensor. Existing
versions stay as they are, per tensor, and keep loading bit for bit beside packed ones.
``store_state.generation`` is bumped by every write, so listings can be cached until it moves.

Downgrading unpacks every packed version into per-tensor rows (with their format-1 digest), so
an older taps_cl reads them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from taps_cl.storage.digest import version_digest
from taps_cl.storage.packing import unpack
from taps_cl.storage.serialize import sha256, tensor_to_bytes

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_versions = sa.table(
    "task_versions",
    sa.column("id", sa.Integer),
    sa.column("num_classes", sa.Integer),
    sa.column("class_names", sa.JSON),
    sa.column("num_layers", sa.Integer),
    sa.column("active_layers", sa.JSON),
    sa.column("config", sa.JSON),
    sa.column("digest", sa.String),
    sa.column("packed", sa.Boolean),
)
_parts = sa.table(
    "version_parts",
    sa.column("version_id", sa.Integer),
    sa.column("part", sa.String),
    sa.column("blob_sha256", sa.String),
)
_tensors = sa.table(
    "version_tensors",
    sa.column("version_id", sa.Integer),
    sa.column("name", sa.String),
    sa.column("blob_sha256", sa.String),
    sa.column("dtype", sa.String),
    sa.column("shape", sa.JSON),
)
_blobs = sa.table(
    "blobs", sa.column("sha256", sa.String), sa.column("size", sa.BigInteger),
    sa.column("data", sa.LargeBinary),
)  # fmt: skip


def upgrade() -> None:
    op.create_table(
        "version_parts",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("part", sa.String(32), nullable=False),
        sa.Column("blob_sha256", sa.String(64), nullable=False),
        sa.Column("num_tensors", sa.Integer(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["task_versions.id"], name="fk_version_parts_version_id_task_versions"
        ),
        sa.ForeignKeyConstraint(
            ["blob_sha256"], ["blobs.sha256"], name="fk_version_parts_blob_sha256_blobs"
        ),
        sa.PrimaryKeyConstraint("version_id", "part", name="pk_version_parts"),
    )
    op.create_index("ix_version_parts_blob_sha256", "version_parts", ["blob_sha256"])
    # Plain ALTER TABLE ADD COLUMN, as in 0002 (a batch copy would fail the foreign keys).
    op.add_column(
        "task_versions",
        sa.Column("packed", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "store_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_store_state"),
    )
    op.execute(sa.text("INSERT INTO store_state (id, generation) VALUES (1, 0)"))


def downgrade() -> None:
    bind = op.get_bind()
    packed = bind.execute(sa.select(_versions).where(_versions.c.packed)).mappings().all()
    for v in packed:
        _unpack_version(bind, v)
    shas = set(bind.execute(sa.select(_parts.c.blob_sha256)).scalars())
    op.execute(_parts.delete())
    used = set(bind.execute(sa.select(_tensors.c.blob_sha256)).scalars())
    used |= set(bind.execute(sa.text("SELECT blob_sha256 FROM base_tensors")).scalars())
    for sha in shas - used:
        bind.execute(_blobs.delete().where(_blobs.c.sha256 == sha))
    op.drop_table("store_state")
    op.drop_column("task_versions", "packed")
    op.drop_index("ix_version_parts_blob_sha256", table_name="version_parts")
    op.drop_table("version_parts")


def _unpack_version(bind, v) -> None:  # noqa: ANN001
    """Per-tensor rows and blobs for one packed version, and its format-1 digest."""
    rows = bind.execute(
        sa.select(_parts.c.part, _parts.c.blob_sha256, _blobs.c.data)
        .join(_blobs, _blobs.c.sha256 == _parts.c.blob_sha256)
        .where(_parts.c.version_id == v["id"])
    ).all()
    refs = []
    for part, sha, data in rows:
        for name, tensor in unpack(data, part, sha, f"version row {v['id']}").items():
            raw, dtype, shape = tensor_to_bytes(tensor)
            key = sha256(raw)
            if (
                bind.execute(sa.select(_blobs.c.sha256).where(_blobs.c.sha256 == key)).first()
                is None
            ):
                bind.execute(_blobs.insert().values(sha256=key, size=len(raw), data=raw))
            refs.append((name, key, dtype, shape))
    if refs:
        bind.execute(
            _tensors.insert(),
            [{"version_id": v["id"], "name": n, "blob_sha256": s, "dtype": d, "shape": sh}
             for n, s, d, sh in refs],
        )  # fmt: skip
    digest = version_digest(
        num_classes=v["num_classes"],
        class_names=v["class_names"],
        num_layers=v["num_layers"],
        active_layers=v["active_layers"],
        config=v["config"],
        tensors=refs,
    )
    bind.execute(sa.update(_versions).where(_versions.c.id == v["id"]).values(digest=digest))
