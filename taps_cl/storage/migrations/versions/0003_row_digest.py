"""task_versions.digest (row integrity) and bases.layout (what a patch of a base may hold).

Existing versions get their digest computed here from their rows, so old stores keep working
and are covered from now on. Existing bases get no layout (it needs the model); an Engine on
the base fills it in when it opens the store.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from taps_cl.storage.digest import version_digest

revision = "0003"
down_revision = "0002"
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
)
_tensors = sa.table(
    "version_tensors",
    sa.column("version_id", sa.Integer),
    sa.column("name", sa.String),
    sa.column("blob_sha256", sa.String),
    sa.column("dtype", sa.String),
    sa.column("shape", sa.JSON),
)


# Plain ALTER TABLE ADD/DROP COLUMN, as in 0002 (a batch copy would fail the foreign keys).


def upgrade() -> None:
    op.add_column("task_versions", sa.Column("digest", sa.String(64), nullable=True))
    op.add_column("bases", sa.Column("layout", sa.JSON(), nullable=True))
    bind = op.get_bind()
    for v in bind.execute(sa.select(_versions)).mappings().all():
        refs = bind.execute(
            sa.select(
                _tensors.c.name, _tensors.c.blob_sha256, _tensors.c.dtype, _tensors.c.shape
            ).where(_tensors.c.version_id == v["id"])
        ).all()
        digest = version_digest(
            num_classes=v["num_classes"],
            class_names=v["class_names"],
            num_layers=v["num_layers"],
            active_layers=v["active_layers"],
            config=v["config"],
            tensors=refs,
        )
        bind.execute(sa.update(_versions).where(_versions.c.id == v["id"]).values(digest=digest))


def downgrade() -> None:
    op.drop_column("bases", "layout")
    op.drop_column("task_versions", "digest")
