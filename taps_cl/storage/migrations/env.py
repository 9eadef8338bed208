"""Alembic environment of the task store.

Migrations run only through ``taps_cl.storage.database.ensure_schema``, which passes an open
connection (inside the transaction that holds the store's write lock) via
``config.attributes["connection"]``; there is no alembic.ini and no offline mode.
"""

from __future__ import annotations

from alembic import context

from taps_cl.storage.models import Model

VERSION_TABLE = "taps_cl_schema_version"

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "taps_cl migrations run when a TaskStore is opened; they need a connection in "
        "config.attributes['connection']"
    )
context.configure(
    connection=connection,
    target_metadata=Model.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
