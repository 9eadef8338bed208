"""task_versions.routable: whether a version carries route statistics (task-free routing).

Existing versions upgrade in place as not routable (they predate the statistics); statistics
can be added to them later with ``TaskStore.add_route_stats``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


# Plain ALTER TABLE ADD/DROP COLUMN (SQLite >= 3.35 has both): a batch "move and copy" of
# task_versions would fail its foreign keys, which the store turns on.


def upgrade() -> None:
    op.add_column(
        "task_versions",
        sa.Column("routable", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_column("task_versions", "routable")
