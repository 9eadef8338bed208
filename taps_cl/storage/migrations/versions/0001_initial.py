"""Initial schema: bases, tasks, task_versions, blobs, version_tensors, base_tensors.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def _tensor_columns() -> list[sa.Column]:
    return [
        sa.Column("name", sa.String(1000), nullable=False),
        sa.Column("blob_sha256", sa.String(64), nullable=False),
        sa.Column("dtype", sa.String(32), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "bases",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("num_parameters", sa.BigInteger(), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_bases"),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_blobs"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_fingerprint", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("num_classes", sa.Integer(), nullable=False),
        sa.Column("class_names", sa.JSON(), nullable=True),
        sa.Column("current_version", sa.Integer(), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["base_fingerprint"], ["bases.fingerprint"], name="fk_tasks_base_fingerprint_bases"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.UniqueConstraint("base_fingerprint", "name", name="uq_tasks_base_fingerprint_name"),
    )
    op.create_index("ix_tasks_name", "tasks", ["name"])
    op.create_table(
        "task_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("num_classes", sa.Integer(), nullable=False),
        sa.Column("class_names", sa.JSON(), nullable=True),
        sa.Column("num_layers", sa.Integer(), nullable=False),
        sa.Column("active_layers", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("num_parameters", sa.BigInteger(), nullable=False),
        sa.Column("num_tensors", sa.Integer(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("added_bytes", sa.BigInteger(), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_task_versions_task_id_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_task_versions"),
        sa.UniqueConstraint("task_id", "version", name="uq_task_versions_task_id_version"),
    )
    op.create_table(
        "version_tensors",
        sa.Column("version_id", sa.Integer(), nullable=False),
        *_tensor_columns(),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["task_versions.id"],
            name="fk_version_tensors_version_id_task_versions",
        ),
        sa.ForeignKeyConstraint(
            ["blob_sha256"], ["blobs.sha256"], name="fk_version_tensors_blob_sha256_blobs"
        ),
        sa.PrimaryKeyConstraint("version_id", "name", name="pk_version_tensors"),
    )
    op.create_index("ix_version_tensors_blob_sha256", "version_tensors", ["blob_sha256"])
    op.create_table(
        "base_tensors",
        sa.Column("base_fingerprint", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        *_tensor_columns(),
        sa.ForeignKeyConstraint(
            ["base_fingerprint"],
            ["bases.fingerprint"],
            name="fk_base_tensors_base_fingerprint_bases",
        ),
        sa.ForeignKeyConstraint(
            ["blob_sha256"], ["blobs.sha256"], name="fk_base_tensors_blob_sha256_blobs"
        ),
        sa.PrimaryKeyConstraint("base_fingerprint", "name", name="pk_base_tensors"),
    )
    op.create_index("ix_base_tensors_blob_sha256", "base_tensors", ["blob_sha256"])


def downgrade() -> None:
    for index, table in (
        ("ix_base_tensors_blob_sha256", "base_tensors"),
        ("ix_version_tensors_blob_sha256", "version_tensors"),
        ("ix_tasks_name", "tasks"),
    ):
        op.drop_index(index, table_name=table)
    for table in ("base_tensors", "version_tensors", "task_versions", "tasks", "blobs", "bases"):
        op.drop_table(table)
